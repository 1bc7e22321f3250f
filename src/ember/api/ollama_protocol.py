"""The Ollama API's request bodies (ollama/ollama api/types.go, docs/api.md), each with `to_native()`.

Ollama's leniency, on purpose: a field it does not know is ignored (its JSON decoding drops it), and an
unknown option name is logged and ignored (`Options.FromMap` warns "invalid option provided"), because clients
such as Open WebUI send their own parameters there. The value of a known field or option is still checked,
and a bad one is a 400 naming it. "Not set" (null or absent) stays apart from false and zero: `think`,
`truncate` and `stream` left out get Ollama's defaults when the request is resolved.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator

from ember.options import known_options
from ember.types import (
    ChatRequest,
    EmbedRequest,
    GenerateRequest,
    Message,
    ThinkLevel,
    ToolCall,
    ToolCallFunction,
)

Duration = str | float | None  # Ollama's keep_alive: a Go duration ("5m", "1h30m") or a number of seconds


class OllamaBody(BaseModel):
    """Fields every Ollama request body may carry; others are ignored, as Ollama does."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field("", description="The model's name, such as smollm2 or smollm2:135m.")
    options: dict[str, Any] | None = Field(
        None, description="Load and sampling options by Ollama's names; unknown names are logged and ignored."
    )
    keep_alive: Duration = Field(None, description='How long the model stays loaded afterwards ("5m", 0, -1).')
    priority: str | int | None = Field(None, description="ember: high, normal (default) or low, the queue order.")


class _Answering(OllamaBody):
    stream: StrictBool | None = Field(None, description="Stream the answer as NDJSON lines (default true).")
    format: str | dict[str, Any] | None = Field(None, description='"json", or a JSON schema the answer follows.')
    think: StrictBool | ThinkLevel | None = Field(
        None, description="Thinking models: think first (true, low, medium, high, max) or not (false)."
    )
    truncate: StrictBool | None = Field(
        None, description="Drop the oldest part of an over-long prompt (default true); false: a 400 instead."
    )
    shift: StrictBool | None = Field(None, description="Accepted for Ollama's clients; ember never shifts the context.")
    logprobs: StrictBool | None = Field(None, description="Return each generated token's log-probability.")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="With logprobs: the most likely tokens too.")

    @field_validator("format", mode="after")
    @classmethod
    def _empty_format_is_none(cls, value: Any) -> Any:
        return None if value == "" else value

    def _native_fields(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "options": known_options(self.options),
            "keep_alive": self.keep_alive,
            "priority": self.priority,
            "stream": self.stream is not False,
            "format": self.format,
            "think": self.think,
            "truncate": self.truncate,
            "logprobs": bool(self.logprobs),
            "top_logprobs": self.top_logprobs or 0,
        }


class OllamaGenerateRequest(_Answering):
    """POST /api/generate"""

    prompt: str = Field("", description="The prompt; empty only loads the model (keep_alive 0 unloads it).")
    suffix: str | None = Field(None, description="Text after the insertion point: fill in the middle.")
    system: str | None = Field(None, description="A system prompt, instead of the model's own.")
    template: str | None = Field(None, description="A chat template (Jinja), instead of the model's own.")
    context: list[int] | None = Field(None, description="The context of an earlier answer, to continue it.")
    raw: StrictBool | None = Field(None, description="Send the prompt as it is, without the chat template.")
    images: list[str] | None = Field(None, description="Base64 images, for models that see.")

    def to_native(self) -> GenerateRequest:
        return GenerateRequest(
            **self._native_fields(),
            prompt=self.prompt,
            suffix=self.suffix or None,
            system=self.system or None,
            template=self.template or None,
            context=self.context or None,
            raw=bool(self.raw),
            images=self.images or None,
        )


class OllamaFunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)
    index: int | None = None


class OllamaToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str | None = None
    function: OllamaFunctionCall


class OllamaMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str = Field(description="system, user, assistant or tool (any case, as Ollama lowercases it).")
    content: str | None = ""
    thinking: str | None = None
    images: list[str] | None = None
    tool_calls: list[OllamaToolCall] | None = None
    tool_name: str | None = None
    tool_call_id: str | None = None

    @field_validator("role", mode="after")
    @classmethod
    def _known_role(cls, value: str) -> str:
        role = value.lower()
        if role not in ("system", "user", "assistant", "tool"):
            raise ValueError(f"role must be system, user, assistant or tool, not {value!r}")
        return role

    def to_native(self) -> Message:
        calls = [
            ToolCall(id=call.id, function=ToolCallFunction(name=call.function.name, arguments=call.function.arguments))
            for call in self.tool_calls or ()
        ]
        return Message(
            role=self.role,  # type: ignore[arg-type]  # checked by _known_role
            content=self.content or "",
            thinking=self.thinking or None,
            images=self.images or None,
            tool_calls=calls or None,
            tool_name=self.tool_name or None,
            tool_call_id=self.tool_call_id or None,
        )


class OllamaFunction(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class OllamaTool(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["function"] = "function"
    function: OllamaFunction


class OllamaChatRequest(_Answering):
    """POST /api/chat"""

    messages: list[OllamaMessage] = Field(default_factory=list, description="The conversation; empty only loads.")
    tools: list[OllamaTool] | None = Field(None, description="Functions the model may call.")
    tool_choice: str | dict[str, Any] | None = Field(
        None, description='ember: "auto" (default), "none", "required" or {"function": {"name": ...}}.'
    )
    template: str | None = Field(None, description="ember: a chat template (Jinja), instead of the model's own.")

    def to_native(self) -> ChatRequest:
        return ChatRequest(
            **self._native_fields(),
            messages=[message.to_native() for message in self.messages],
            tools=[tool.model_dump(exclude_none=True) for tool in self.tools] if self.tools else None,
            tool_choice=self.tool_choice,
            template=self.template or None,
        )


class OllamaEmbedRequest(OllamaBody):
    """POST /api/embed"""

    input: str | list[str] = Field("", description="A text or a list of texts; empty only loads the model.")
    truncate: StrictBool | None = Field(None, description="Cut an input longer than num_ctx (default true).")
    dimensions: int | None = Field(None, ge=1, description="Keep the first N dimensions (then normalized).")

    def to_native(self) -> EmbedRequest:
        return EmbedRequest(
            model=self.model,
            input=self.input,
            truncate=self.truncate is not False,
            dimensions=self.dimensions,
            options=known_options(self.options),
            keep_alive=self.keep_alive,
            priority=self.priority,
        )


class OllamaEmbeddingsRequest(OllamaBody):
    """POST /api/embeddings (the legacy route: one prompt, a vector that is not normalized)"""

    prompt: str = Field("", description="The text; empty only loads the model.")

    def to_native(self) -> EmbedRequest:
        return EmbedRequest(
            model=self.model,
            input=self.prompt,
            options=known_options(self.options),
            keep_alive=self.keep_alive,
            priority=self.priority,
        )


class OllamaModelRequest(BaseModel):
    """POST /api/show and /api/stop: a model by `model` (or the older `name`)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="The model's name.")
    name: str | None = Field(None, description="The model's name (older clients).")
    verbose: StrictBool | None = Field(None, description="/api/show: accepted; long arrays are left out anyway.")

    def model_name(self) -> str | None:
        return self.model or self.name or None
