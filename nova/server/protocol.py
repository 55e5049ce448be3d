"""Request and response bodies of the OpenAI-compatible API (pydantic), and the error body.

Requests are validated strictly (``"5"`` is not an integer, ``1`` is not a boolean); unknown
fields are ignored, as vLLM does. Responses are built as plain dicts in ``nova.server.app`` (hot
path); the response models here document them in the OpenAPI schema.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    TypeAdapter,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import PydanticCustomError

PRIORITY_LIMIT = 2**31
MAX_CHOICES = 16  # n: choices per request (each one a sequence in the engine, decoding)


def _integral(value: object) -> object:
    """JSON Schema counts 2.0 as an integer: integral floats become ints (in lists too)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)

    INT_FIELDS: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="before")
    @classmethod
    def _integral_floats(cls, data: object) -> object:
        if isinstance(data, dict) and cls.INT_FIELDS:
            data = {k: _integral(v) if k in cls.INT_FIELDS else v for k, v in data.items()}
        return data


# --------------------------------------------------------------------------------------------
# Chat messages
# --------------------------------------------------------------------------------------------


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str = Field(
        min_length=1,
        description="data:image/...;base64,... ; http(s):// with --allow-remote-media; "
        "file:// under --allowed-local-media-path",
    )
    detail: Literal["auto", "low", "high"] | None = Field(
        None,
        description="accepted; the resize is the model's (use mm_processor_kwargs to bound it)",
    )


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class SystemMessage(_Strict):
    role: Literal["system", "developer"]
    content: str | list[ContentPart]
    name: str | None = None


class UserMessage(_Strict):
    role: Literal["user"]
    content: str | list[ContentPart]
    name: str | None = None


FUNCTION_NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"


class ToolCallFunction(_Strict):
    name: str
    arguments: str = Field(description="the arguments as a JSON object, serialised")


class ToolCall(_Strict):
    id: str
    type: Literal["function"]
    function: ToolCallFunction


class AssistantMessage(_Strict):
    role: Literal["assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None


class ToolMessage(_Strict):
    role: Literal["tool"]
    content: str | list[TextPart]
    tool_call_id: str


ChatMessage = Annotated[
    SystemMessage | UserMessage | AssistantMessage | ToolMessage, Field(discriminator="role")
]


# --------------------------------------------------------------------------------------------
# Structured output and tools
# --------------------------------------------------------------------------------------------


class ResponseFormatText(_Strict):
    type: Literal["text"]


class ResponseFormatJSONObject(_Strict):
    type: Literal["json_object"]


class JSONSchemaFormat(_Strict):
    model_config = ConfigDict(
        strict=True, extra="ignore", allow_inf_nan=False, populate_by_name=True
    )

    name: str = Field(max_length=64, pattern=FUNCTION_NAME_PATTERN)
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(
        None,
        alias="schema",
        description="the JSON schema the output follows (absent: any JSON value)",
    )
    strict: bool | None = Field(
        None,
        description="accepted; output always follows the schema, and objects that list "
        "properties get no other keys unless additionalProperties says so",
    )


class ResponseFormatJSONSchema(_Strict):
    type: Literal["json_schema"]
    json_schema: JSONSchemaFormat


ResponseFormat = Annotated[
    ResponseFormatText | ResponseFormatJSONObject | ResponseFormatJSONSchema,
    Field(discriminator="type"),
]


class StructuredOutputs(_Strict):
    """vLLM's ``structured_outputs`` extension: exactly one of the constraints."""

    json_: dict[str, Any] | str | None = Field(
        None, alias="json", description="a JSON schema (object or its JSON text)"
    )
    regex: str | None = None
    choice: list[Annotated[str, Field(min_length=1)]] | None = Field(
        None, min_length=1, description="one or more non-empty strings"
    )
    grammar: str | None = Field(None, description="a Lark (llguidance dialect) or GBNF grammar")
    json_object: bool | None = None

    model_config = ConfigDict(
        strict=True, extra="ignore", allow_inf_nan=False, populate_by_name=True
    )


class FunctionDefinition(_Strict):
    name: str = Field(pattern=FUNCTION_NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = Field(
        None, description="JSON schema of the arguments object (absent: no arguments)"
    )
    strict: bool | None = None


class ToolDefinition(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = Field(
        False, description="extension (vLLM): usage so far in every chunk"
    )
    include_obfuscation: bool | None = Field(
        None, description="accepted; chunks are never padded (no obfuscation field)"
    )


def _a_bool(value: object) -> object:
    """``Literal[False]`` alone would take 0 (0 == False): only JSON booleans pass."""
    if not isinstance(value, bool):
        raise PydanticCustomError("bool_type", "Input should be a valid boolean")
    return value


OnlyFalse = Annotated[Literal[False], BeforeValidator(_a_bool)]
OnlyTrue = Annotated[Literal[True], BeforeValidator(_a_bool)]


class MMProcessorKwargs(_Strict):
    """Per-request image resizing (dynamic-resolution models): within the server's limits."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)
    INT_FIELDS: ClassVar[tuple[str, ...]] = ("min_pixels", "max_pixels")

    min_pixels: int | None = Field(None, ge=1, le=2**40)
    max_pixels: int | None = Field(None, ge=1, le=2**40)


# token id (decimal, no leading zeros) -> bias in [-100, 100]; at most 300 entries (OpenAI's)
LogitBias = Annotated[
    dict[
        Annotated[str, Field(pattern=r"^(0|[1-9][0-9]{0,8})$")],
        Annotated[float, Field(ge=-100.0, le=100.0)],
    ],
    Field(max_length=300, json_schema_extra={"additionalProperties": False}),
]


# The completion prompt's schema; validated by ``_check_prompt`` (one clear message instead of
# one error per union branch).
_TokenIds = Annotated[list[Annotated[int, Field(ge=0, le=2**31)]], Field(min_length=1)]
_PROMPT_SCHEMA = TypeAdapter(
    Annotated[str, Field(min_length=1)]
    | _TokenIds
    | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=1)]
    | Annotated[list[_TokenIds], Field(min_length=1, max_length=1)]
).json_schema()
_PROMPT_SHAPE = (
    "a non-empty string or a non-empty list of token ids (or a one-element list of either)"
)


def _token_ids(value: list[object]) -> list[int]:
    if not value:
        raise PydanticCustomError("too_short", "prompt must hold at least 1 token id")
    for tok in value:
        if isinstance(tok, bool) or not isinstance(tok, int) or not 0 <= tok <= 2**31:
            raise PydanticCustomError(
                "token_id", f"token ids are integers in [0, 2**31], got {str(tok)[:20]!r}"
            )
    return [t for t in value if isinstance(t, int)]


def _check_prompt(value: object) -> str | list[int] | list[str] | list[list[int]]:
    if isinstance(value, str):
        if not value:
            raise PydanticCustomError(
                "too_short", "prompt must not be empty (at least 1 character)"
            )
        return value
    if not isinstance(value, list):
        raise PydanticCustomError("prompt_type", f"prompt must be {_PROMPT_SHAPE}")
    if not value or not isinstance(value[0], (str, list)):
        return _token_ids(value)
    if len(value) != 1:
        raise PydanticCustomError(
            "too_long",
            f"batched prompts ({len(value)}) are not supported: at most 1 prompt per request",
        )
    inner = value[0]
    if isinstance(inner, str):
        if not inner:
            raise PydanticCustomError(
                "too_short", "prompt must not be empty (at least 1 character)"
            )
        return [inner]
    return [_token_ids(inner)]


Prompt = Annotated[object, PlainValidator(_check_prompt), WithJsonSchema(_PROMPT_SCHEMA)]


class Prediction(_Strict):
    type: Literal["content"]
    content: str | list[TextPart]


class UnsupportedFields(_Strict):
    """OpenAI (and vLLM extension) fields that would change the answer in a way this server
    does not implement: the schema admits only the neutral value, so anything else is a 400
    that names the field."""

    audio: None = Field(None, description="audio output is not supported")
    modalities: list[Literal["text"]] | None = Field(
        None, description="only text output is supported"
    )
    web_search_options: None = Field(None, description="web search is not supported")
    moderation: None = Field(None, description="moderation output is not supported")
    reasoning_effort: None = Field(None, description="the served model has no reasoning control")
    verbosity: None = Field(None, description="verbosity control is not supported")
    functions: None = Field(None, description="deprecated: not supported")
    function_call: None = Field(None, description="deprecated: not supported")
    use_beam_search: OnlyFalse = Field(False, description="extension: not supported")
    prompt_logprobs: None = Field(None, description="extension: not supported")
    allowed_token_ids: None = Field(None, description="extension: not supported")
    bad_words: None = Field(None, description="extension: not supported")
    truncate_prompt_tokens: None = Field(None, description="extension: not supported")
    skip_special_tokens: OnlyTrue = Field(
        True, description="extension: special tokens are always left out of the text"
    )


# --------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------


class _SamplingFields(UnsupportedFields):
    """Fields shared by chat and text completions."""

    INT_FIELDS: ClassVar[tuple[str, ...]] = (
        "max_tokens",
        "max_completion_tokens",
        "top_k",
        "seed",
        "n",
        "priority",
        "best_of",
        "top_logprobs",
        "logprobs",
        "prompt",
        "min_tokens",
        "stop_token_ids",
    )

    model: str | None = Field(
        None, description="the served model id (GET /v1/models); another id is a 404"
    )
    max_tokens: int | None = Field(None, ge=1, description="default: the rest of the context")
    temperature: float | None = Field(
        None,
        ge=0.0,
        le=2.0,
        description="default: the model's generation_config.json, else 1.0; < 1e-5 is greedy",
    )
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, description="extension; -1 or 0 disables")
    min_p: float | None = Field(None, ge=0.0, le=1.0, description="extension")
    seed: int | None = Field(
        None, description="any integer (taken modulo 2**64): the same seed, the same tokens"
    )
    stop: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=16)]
        | None
    ) = Field(None, description="up to 16 non-empty strings")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(
        None,
        ge=1,
        le=MAX_CHOICES,
        description="choices per request: the prompt is prefilled once and its KV cache shared",
    )
    ignore_eos: bool = Field(False, description="extension: do not stop at the model's EOS token")
    priority: int = Field(
        0,
        ge=-PRIORITY_LIMIT,
        le=PRIORITY_LIMIT,
        description="extension: lower values are served first",
    )
    deadline_ms: float | None = Field(
        None, gt=0.0, description="extension: latency target after arrival"
    )
    user: str | None = Field(None, description="accepted; does not change the answer")
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(
        None, gt=0.0, le=100.0, description="extension: > 1 discourages prompt and output tokens"
    )
    logit_bias: LogitBias | None = Field(
        None, description="token id (a decimal string) -> bias added to its logit"
    )
    min_tokens: int | None = Field(
        None, ge=0, description="extension: EOS and stop tokens are not allowed before this many"
    )
    stop_token_ids: list[Annotated[int, Field(ge=0, le=2**31)]] | None = Field(
        None, max_length=64, description="extension: token ids that end the output"
    )
    include_stop_str_in_output: bool = Field(
        False, description="extension: keep the matched stop string at the end of the text"
    )
    # Accepted, do not change the answer (docs/server.md lists them).
    metadata: dict[str, str] | None = Field(None, description="accepted; not stored")
    store: bool | None = Field(None, description="accepted; nothing is stored")
    service_tier: str | None = Field(None, description="accepted; one tier")
    safety_identifier: str | None = Field(None, description="accepted")
    prompt_cache_key: str | None = Field(None, description="accepted; prefix caching is automatic")
    prompt_cache_retention: str | None = Field(None, description="accepted")
    prediction: Prediction | None = Field(None, description="accepted; no speculative decoding")


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(
        None, ge=1, description="takes precedence over max_tokens"
    )
    logprobs: bool | None = Field(None, description="return each output token's logprob")
    top_logprobs: int | None = Field(
        None, ge=0, le=20, description="alternatives per token; needs logprobs=true"
    )
    mm_processor_kwargs: MMProcessorKwargs | None = Field(
        None,
        description="extension: min_pixels/max_pixels bounding this request's image resize "
        "(dynamic-resolution models), within the server's limits",
    )
    echo: OnlyFalse = Field(False, description="extension: not supported")
    add_generation_prompt: OnlyTrue = Field(True, description="extension: not supported")
    continue_final_message: OnlyFalse = Field(False, description="extension: not supported")
    chat_template: None = Field(None, description="extension: the model's template is used")
    chat_template_kwargs: None = Field(None, description="extension: not supported")
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = Field(
        None,
        description="extension (as vLLM): constrain the output; exclusive with response_format",
    )
    guided_json: None = Field(None, description="removed in vLLM: use structured_outputs")
    guided_regex: None = Field(None, description="removed in vLLM: use structured_outputs")
    guided_choice: None = Field(None, description="removed in vLLM: use structured_outputs")
    guided_grammar: None = Field(None, description="removed in vLLM: use structured_outputs")
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description='default "auto" when tools are given, else "none"'
    )
    parallel_tool_calls: bool | None = Field(
        None, description="default true; false: at most one call"
    )


class CompletionRequest(_SamplingFields):
    prompt: Prompt = Field(
        description="a string or a list of token ids (or a one-element list of either)"
    )
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(
        None, ge=0, le=20, description="alternatives per token (the sampled token's is added)"
    )
    echo: OnlyFalse = Field(False, description="echoing the prompt is not supported")
    suffix: None = Field(None, description="suffixes are not supported")
    best_of: int | None = Field(None, ge=1, le=1, description="only 1 is supported")
    response_format: ResponseFormat | None = Field(None, description="extension (as vLLM)")
    structured_outputs: StructuredOutputs | None = Field(
        None,
        description="extension (as vLLM): constrain the output; exclusive with response_format",
    )


# --------------------------------------------------------------------------------------------
# Responses (documentation of the dicts app.py builds)
# --------------------------------------------------------------------------------------------


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="prompt tokens whose KV came from the prefix cache")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = Field(description="all choices together")
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"]
    function: ToolCallFunction


class ResponseMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ResponseToolCall] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float = Field(description="natural log; -9999.0 stands for -inf")
    bytes: list[int] | None = Field(description="the token's UTF-8 bytes")


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class ImageSizeInfo(BaseModel):
    """Extension: one input image as given and as the vision tower saw it (pixels)."""

    width: int
    height: int
    resized_width: int
    resized_height: int


class ChatChoice(BaseModel):
    index: int
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls", "abort"] | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage
    image_sizes: list[ImageSizeInfo] | None = Field(
        None, description="extension: the request's images as resized for the model"
    )


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: str
