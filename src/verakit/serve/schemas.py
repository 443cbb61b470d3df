"""Request bodies of the HTTP API (pydantic). Imported only by the app, never at `import verakit` time.

Field bounds that depend on server options (inputs per request, max_tokens, n) are checked by the app;
the static ones are here. OpenAI-compatible bodies ignore fields this server does not implement; `raw` is
this server's own.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

__all__ = ["ClassifyRequest", "CompletionRequest", "ChatMessage", "ChatRequest"]

Text = Annotated[str, StringConstraints(min_length=1)]
Pair = Annotated[list[Text], Field(min_length=2, max_length=2)]
Stop = Annotated[list[Text], Field(max_length=4)]


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    adapter: str | None = None  # None: the base model
    inputs: list[Text | Pair] = Field(min_length=1)  # a text, or [text, text_pair]


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str  # an adapter name, or the base model's name
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stop: Text | Stop | None = None
    stream: bool = False
    # Not OpenAI's (clients send it as an extra body field): true sends the prompt / messages as they are,
    # without the prompt format the adapter was trained with (docs/serving.md, "Prompt format").
    raw: bool = False

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(_Sampling):
    prompt: Text | Annotated[list[Text], Field(min_length=1)]
    max_tokens: int = Field(16, ge=1)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # None: the server's max_new_tokens
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer OpenAI name for max_tokens
