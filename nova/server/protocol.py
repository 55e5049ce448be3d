"""Request and response bodies of the OpenAI-compatible API (pydantic), and the error body.

Requests are validated strictly (``"5"`` is not an integer, ``1`` is not a boolean); unknown
fields are ignored, as vLLM does. Responses are built as plain dicts in ``nova.server.app`` (hot
path); the response models here document them in the OpenAPI schema.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# torch.Generator.manual_seed accepts [-2**63, 2**64 - 1].
SEED_MIN = -(2**63)
SEED_MAX = 2**64 - 1
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
        description="data:image/...;base64,... ; http(s):// with --allow-remote-media; "
        "file:// under --allowed-local-media-path"
    )
    detail: Literal["auto", "low", "high"] | None = None


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


class AssistantMessage(_Strict):
    role: Literal["assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


ChatMessage = Annotated[SystemMessage | UserMessage | AssistantMessage, Field(discriminator="role")]


class StreamOptions(_Strict):
    include_usage: bool = False


# --------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------


class _SamplingFields(_Strict):
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
    )

    model: str | None = Field(None, description="ignored: the server serves one model")
    max_tokens: int | None = Field(None, ge=1, description="default: the rest of the context")
    temperature: float | None = Field(
        None, ge=0.0, le=2.0, description="default 1.0; < 1e-5 is greedy"
    )
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, description="extension; -1 or 0 disables")
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = Field(None, description="up to 16 non-empty strings")
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
    user: str | None = None
    presence_penalty: float | None = Field(None, ge=0.0, le=0.0, description="only 0 is supported")
    frequency_penalty: float | None = Field(None, ge=0.0, le=0.0, description="only 0 is supported")


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(
        None, ge=1, description="takes precedence over max_tokens"
    )
    logprobs: Literal[False] | None = Field(None, description="log probabilities are not supported")
    top_logprobs: Literal[0] | None = Field(None, description="log probabilities are not supported")


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]] = Field(
        description="a string or a list of token ids (a one-element list of either is accepted)"
    )
    max_tokens: int | None = Field(16, ge=1)
    logprobs: Literal[0] | None = Field(None, description="log probabilities are not supported")
    echo: Literal[False] = Field(False, description="echoing the prompt is not supported")
    suffix: None = Field(None, description="suffixes are not supported")
    best_of: int | None = Field(None, ge=1, le=1, description="only 1 is supported")


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


class ResponseMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None


class ChatChoice(BaseModel):
    index: int
    message: ResponseMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length", "abort"] | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
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
