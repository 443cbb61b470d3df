"""Request and error bodies of the HTTP API (pydantic). Imported only by the app, never at `import verakit` time.

The request models are built per server by `request_models(options, base_name)`, so that every bound a
server enforces on a body (inputs per request, max_tokens, n, the adapter-name pattern) is a constraint of
the model: pydantic enforces it and the OpenAPI document states it, from one definition. The bounds that
JSON Schema cannot express (tokens per input, the request body size) are stated in the fields' and
operations' descriptions. OpenAI-compatible bodies ignore fields this server does not implement; `raw` is
this server's own.

No `from __future__ import annotations` here: the models are defined inside a function, and pydantic must
see their annotations as objects, not as strings naming the function's locals.
"""

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from .options import ServeOptions
from .store import NAME_PATTERN, check_name

__all__ = ["NAME_SCHEMA", "ErrorBody", "ErrorDetail", "RequestModels", "error_responses", "name_type", "request_models"]

Text = Annotated[str, StringConstraints(min_length=1)]
Pair = Annotated[list[Text], Field(min_length=2, max_length=2)]
Stop = Annotated[list[Text], Field(max_length=4)]

# The store's rule as JSON Schema (ECMA regex, anchored). The validator stays `check_name`, so a refusal
# quotes the rule in words; `pattern` only states it (the two agree: the regex is the store's own).
NAME_SCHEMA: dict[str, Any] = {
    "type": "string", "minLength": 1, "maxLength": 128, "pattern": f"^{NAME_PATTERN.pattern}$",
    "description": "an adapter name: 1-128 characters from A-Z a-z 0-9 . _ -, not starting with '.'",
}


def _state_name_rule(schema: dict[str, Any]) -> None:
    schema.update(NAME_SCHEMA)


def name_type(base_name: str | None = None) -> Any:
    """An adapter name (or `base_name`, the base model's name, which may break the rule: it is a folder's
    name), validated by the store's `check_name` and stated in the schema as NAME_SCHEMA."""
    name = Annotated[str, AfterValidator(check_name), Field(json_schema_extra=_state_name_rule)]
    if base_name is None or NAME_PATTERN.fullmatch(base_name):
        return name
    return Literal[base_name] | name  # type: ignore[valid-type]


class ErrorDetail(BaseModel):
    message: str = Field(description="what is wrong, naming the field, adapter or limit at fault")
    type: str = Field(description="a short machine-readable kind, e.g. not_found, invalid_request, too_large")
    code: int = Field(description="the HTTP status, repeated")


class ErrorBody(BaseModel):
    """Every error answer, whatever its status: {"error": {"message", "type", "code"}}."""

    error: ErrorDetail


@dataclass(frozen=True)
class RequestModels:
    """The request bodies of one server."""

    classify: type[BaseModel]
    completion: type[BaseModel]
    chat: type[BaseModel]


def request_models(options: ServeOptions, base_name: str) -> RequestModels:
    """Request models carrying this server's bounds (`options`) and base model name."""
    Name = name_type(base_name)
    tokens = f"at most {options.max_input_tokens} tokens (or the model's context, if shorter; 422 beyond)"

    class ClassifyRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")

        adapter: Name | None = Field(None, description="an adapter name; null or the base model's name: the base model")
        inputs: list[Text | Pair] = Field(
            min_length=1, max_length=options.max_inputs,
            description=f"texts, or [text, text_pair] pairs; each {tokens}",
        )

    class ChatMessage(BaseModel):
        model_config = ConfigDict(extra="ignore")

        role: Literal["system", "user", "assistant"]
        content: str

    class _Sampling(BaseModel):
        model_config = ConfigDict(extra="ignore")

        model: Name = Field(description="an adapter name, or the base model's name")
        temperature: float = Field(1.0, ge=0.0, le=2.0)
        top_p: float = Field(1.0, gt=0.0, le=1.0)
        n: int = Field(1, ge=1, le=options.max_n)
        stop: Text | Stop | None = None
        stream: bool = False
        # Not OpenAI's (clients send it as an extra body field): true sends the prompt / messages as they
        # are, without the prompt format the adapter was trained with (docs/serving.md, "Prompt format").
        raw: bool = False

        def stops(self) -> tuple[str, ...]:
            if self.stop is None:
                return ()
            return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def new_tokens(default: int | None) -> Any:
        return Field(default, ge=1, le=options.max_new_tokens,
                     description="new tokens at most; prompt tokens + max_tokens must fit the model's context")

    class CompletionRequest(_Sampling):
        prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=options.max_inputs)] = Field(
            description=f"a prompt or a list of prompts; each {tokens}"
        )
        # OpenAI's default of 16, unless this server allows fewer.
        max_tokens: int = new_tokens(min(16, options.max_new_tokens))

    class ChatRequest(_Sampling):
        messages: list[ChatMessage] = Field(min_length=1, description=f"the rendered conversation is {tokens}")
        max_tokens: int | None = new_tokens(None)  # None: the server's max_new_tokens
        max_completion_tokens: int | None = new_tokens(None)  # OpenAI's newer name

    return RequestModels(ClassifyRequest, CompletionRequest, ChatRequest)


_STATUS_TEXT = {
    400: "the body could not be parsed at all (e.g. bytes that are not UTF-8 text)",
    401: "missing or wrong bearer token (header WWW-Authenticate: Bearer)",
    403: "admin endpoints are disabled (the server was started without --admin-token)",
    404: "no adapter of that name",
    409: "the adapter cannot be served by this server (corrupt, or made for another base model or projection), "
         "the base model has no trained head (classify without an adapter), or the name is taken (upload)",
    413: "the request body exceeds the server's limit (--max-body-bytes, --max-upload-bytes for uploads)",
    422: "the request breaks a rule stated in this document, or one it states in words (tokens per input, the "
         "model's context; chat: one user message for an adapter trained on plain prompts, unless raw), or the "
         "uploaded file is not a valid adapter",
    500: "internal error (logged by the server)",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """FastAPI `responses=` entries: each status with its meaning and the error body."""
    return {s: {"model": ErrorBody, "description": _STATUS_TEXT[s]} for s in statuses}
