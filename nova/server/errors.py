"""OpenAI-style errors: ``OpenAIError`` (status, message, type, param, code) and its JSON body,
and the mapping of a request-validation error to the most specific 400."""

from __future__ import annotations

from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse


class OpenAIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",  # noqa: A002 - the OpenAI field name
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        # messages may quote client input: never let a lone surrogate break the JSON encoding
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# Error codes of 400s for requests the schema cannot rule out (they depend on the model, its
# context and the server's limits); the schemathesis tests accept only these for valid bodies.
CONTEXT_CODE = "context_length_exceeded"
VOCAB_CODE = "token_out_of_vocabulary"
COMBINATION_CODE = "invalid_field_combination"  # fields valid alone, not together
IMAGE_LIMITS_CODE = "image_limits"  # mm_processor_kwargs outside the server's limits
JSON_TEXT_CODE = "invalid_json_text"  # a string field whose text must parse as JSON
# Every code a schema-valid request can still be refused with, and why the schema cannot say
# it: the context length and the vocabulary are the model's, images are only known once
# decoded, and JSON Schema cannot relate two fields.
SCHEMA_INVISIBLE_CODES = frozenset(
    {
        CONTEXT_CODE,
        VOCAB_CODE,
        COMBINATION_CODE,
        IMAGE_LIMITS_CODE,
        JSON_TEXT_CODE,
        "too_many_images",
        "images_not_supported",
        "invalid_image",
        "image_too_large",
        "media_not_allowed",
        # a regex, grammar or JSON schema the grammar engine cannot compile: its text is a
        # plain string to the published schema
        "invalid_grammar",
    }
)


def bad_request(
    message: str, param: str | None = None, code: str | None = "invalid_value"
) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


class GenerationFailed(Exception):
    """The engine failed the request (executor error)."""


class ClientGone(Exception):
    """The client disconnected before the response was ready."""


# discriminator values of the tagged unions in nova.server.protocol (a list item's type)
_UNION_TAGS = frozenset({"system", "developer", "user", "assistant", "tool", "text", "image_url"})
# ... and of tagged union fields (the tag pydantic inserts after the field's name)
_FIELD_UNION_TAGS = {"response_format": frozenset({"text", "json_object", "json_schema"})}
_BRANCH_LABELS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def loc_to_param(loc: tuple[Any, ...]) -> str | None:
    """Pydantic error location -> ``messages[0].content[1].image_url.url``: union branch labels
    (``str``, ``list[...]``) and the tag pydantic inserts after a tagged list item are dropped."""
    out = ""
    prev: Any = None
    for item in loc:
        if item == "body" and not out:
            continue
        if isinstance(item, int):
            out += f"[{item}]"
        elif isinstance(item, str):
            skip = (
                "[" in item
                or item in _BRANCH_LABELS
                or item.startswith("constrained-")
                or (isinstance(prev, int) and item in _UNION_TAGS)
                or (isinstance(prev, str) and item in _FIELD_UNION_TAGS.get(prev, ()))
            )
            prev = item
            if skip:
                continue
            out += f".{item}" if out else item
            continue
        prev = item
    return out or None


def validation_error(exc: RequestValidationError) -> OpenAIError:
    errors = list(exc.errors())
    if not errors:
        return bad_request("invalid request body", code="invalid_request")
    for err in errors:
        if err.get("type") == "json_invalid":
            detail = (err.get("ctx") or {}).get("error", "")
            return bad_request(
                f"the request body is not valid JSON: {detail}".rstrip(": "), code="invalid_json"
            )
    err = max(errors, key=lambda e: len(e.get("loc", ())))  # the most specific problem
    loc = tuple(err.get("loc", ()))
    param = loc_to_param(loc)
    if err.get("type") in ("union_tag_invalid", "union_tag_not_found"):
        tag = str((err.get("ctx") or {}).get("discriminator", "")).strip("'\"")
        if tag:
            param = f"{param}.{tag}" if param else tag
    if loc == ("body",) and err.get("type") == "missing":
        return bad_request("the request body must be a JSON object", code="invalid_request")
    msg = str(err.get("msg", "invalid value"))
    given = err.get("input")
    if isinstance(given, (str, int, float, bool)) and err.get("type") != "missing":
        shown = repr(given)
        msg += f" (got {shown[:60] + '...' if len(shown) > 60 else shown})"
    more = (
        f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
        if len(errors) > 1
        else ""
    )
    where = param or "request body"
    return bad_request(
        f"{where}: {msg}{more}", param=param, code=str(err.get("type") or "invalid_value")
    )


def body_parse_error(cause: BaseException) -> OpenAIError:
    """400 for a body FastAPI could not parse, naming why (invalid UTF-8 above all)."""
    if isinstance(cause, UnicodeDecodeError):
        bad = cause.object[cause.start : cause.start + 1].hex()
        return bad_request(
            f"the request body is not valid UTF-8: byte 0x{bad} at offset {cause.start} "
            f"({cause.reason}); JSON must be UTF-8 encoded",
            code="invalid_utf8",
        )
    return bad_request(
        f"the request body could not be parsed as JSON ({cause.__class__.__name__})",
        code="invalid_json",
    )


def generation_failed(message: str) -> OpenAIError:
    """500 for a request the engine failed (an executor error)."""
    return OpenAIError(500, message, "server_error", code="generation_failed")


def internal_error(exc: BaseException) -> OpenAIError:
    """500 for a bug: names the exception's class only (its message may hold internals)."""
    return OpenAIError(
        500, f"internal error: {exc.__class__.__name__}", "server_error", code="internal_error"
    )
