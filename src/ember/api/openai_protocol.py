"""The OpenAI API's request bodies (chat completions, completions, embeddings), each with `to_native()`.

Only the fields a request gives become options, so the model's own defaults (and Ollama's) apply otherwise,
as Ollama's OpenAI compatibility does. Fields ember does not use (user, service_tier, metadata, store ...) are
ignored, as Ollama ignores them; the values of the fields it uses are checked, and a bad one is a 400.
`repeat_penalty`, `top_k`, `min_p`, `typical_p`, `repeat_last_n` and `mirostat*` are llama.cpp server's
extensions, taken too.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, model_validator

from ember.api.openai_logprobs import MAX_TOP_LOGPROBS
from ember.errors import InvalidRequestError
from ember.tools import from_openai_message
from ember.types import ChatRequest, GenerateRequest, ThinkLevel

TokenIds = list[int]
# Body fields that are sampling options of the same name.
_SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "repeat_penalty",
    "typical_p",
    "repeat_last_n",
    "mirostat",
    "mirostat_tau",
    "mirostat_eta",
)


class OpenAIBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field("", description="The model's name, such as smollm2.")
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(None, description="Token id (as a string) to a bias, -100 to 100.")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate.")
    n: int = Field(1, ge=1, description="Answers to generate, side by side (each its own choice).")
    seed: int | None = Field(None, description="Seed; choice i uses seed + i.")
    stop: str | list[str] | None = Field(None, description="Up to 4 strings that end the answer.")
    stream: StrictBool | None = False
    stream_options: dict[str, Any] | None = Field(None, description='{"include_usage": true} adds a usage chunk.')
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0, description="llama.cpp server's extension.")
    min_p: float | None = Field(None, ge=0, le=1, description="llama.cpp server's extension.")
    repeat_penalty: float | None = Field(None, gt=0, description="llama.cpp server's extension; 1 turns it off.")
    # llama.cpp server's other sampling extensions (values are checked with the other sampling options), so a
    # batch line made by `ember batch --typical ...` means the same on every way in.
    typical_p: float | None = Field(None, description="llama.cpp server's extension.")
    repeat_last_n: int | None = Field(None, description="llama.cpp server's extension.")
    mirostat: int | None = Field(None, description="llama.cpp server's extension: 0 off, 1 or 2.")
    mirostat_tau: float | None = Field(None, description="llama.cpp server's extension.")
    mirostat_eta: float | None = Field(None, description="llama.cpp server's extension.")
    response_format: dict[str, Any] | None = Field(
        None, description='{"type": "text" | "json_object"} or {"type": "json_schema", "json_schema": {"schema"}}.'
    )
    keep_alive: str | float | None = Field(None, description="ember/Ollama: how long the model stays loaded.")
    priority: str | int | None = Field(None, description="ember: high, normal (default) or low.")

    def max_new_tokens(self) -> int | None:
        return self.max_tokens

    def options(self) -> dict[str, Any]:
        """The sampling options the request gives, by Ollama's names."""
        options: dict[str, Any] = {}
        if self.max_new_tokens() is not None:
            options["num_predict"] = self.max_new_tokens()
        for name in _SAMPLING_FIELDS:
            if getattr(self, name) is not None:
                options[name] = getattr(self, name)
        if self.stop is not None:
            options["stop"] = [self.stop] if isinstance(self.stop, str) else self.stop
        if self.logit_bias:  # token ids are checked with the other sampling options
            options["logit_bias"] = self.logit_bias
        return options

    def answer_format(self) -> str | dict[str, Any] | None:
        """response_format as Ollama's `format`."""
        response_format = self.response_format
        if not response_format:
            return None
        kind = response_format.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            return "json"
        if kind == "json_schema":
            schema = (response_format.get("json_schema") or {}).get("schema")
            if not isinstance(schema, dict):
                raise InvalidRequestError("response_format.json_schema.schema must be a JSON schema object")
            return schema
        raise InvalidRequestError(f"response_format.type must be text, json_object or json_schema, not {kind!r}")

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def _native_fields(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "stream": True,
            "options": self.options(),
            "format": self.answer_format(),
            "keep_alive": self.keep_alive,
            "priority": self.priority,
        }


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None


class OpenAIFunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    arguments: str | dict[str, Any] | None = None


class OpenAIToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str | None = None
    type: str = "function"
    function: OpenAIFunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[OpenAIToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = Field(None, description="An earlier answer's reasoning (thinking models).")

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.type == "image_url":
                raise InvalidRequestError("this model does not support images; send text only")
            if part.type not in ("text", "input_text"):
                raise InvalidRequestError(f'message content parts must be {{"type": "text", ...}}, not {part.type!r}')
            parts.append(part.text or "")
        return "".join(parts)


class OpenAIFunction(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class OpenAITool(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["function"] = "function"
    function: OpenAIFunction


class ChatCompletionRequest(OpenAIBody):
    """POST /v1/chat/completions"""

    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    max_completion_tokens: int | None = Field(None, ge=1, description="Most tokens to generate (newer name).")
    logprobs: StrictBool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[OpenAITool] | None = None
    tool_choice: str | dict[str, Any] | None = Field(None, description='"none", "auto", "required" or a function.')
    parallel_tool_calls: StrictBool | None = Field(None, description="Accepted; calls are read as written.")
    reasoning_effort: ThinkLevel | Literal["none", "minimal"] | None = Field(
        None, description="Thinking models: low, medium or high; none turns thinking off."
    )

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def think(self) -> bool | str | None:
        if self.reasoning_effort in ("none", "minimal"):
            return False
        return self.reasoning_effort

    def to_native(self) -> ChatRequest:
        messages, names_by_id = [], {}
        for message in self.messages:
            raw = message.model_dump(exclude_none=True)
            role = "system" if message.role == "developer" else message.role
            fields = from_openai_message(raw, names_by_id)
            if message.reasoning_content:
                fields["thinking"] = message.reasoning_content
            messages.append({"role": role, "content": message.text(), **fields})
        return ChatRequest(
            **self._native_fields(),
            messages=messages,
            tools=[tool.model_dump(exclude_none=True) for tool in self.tools] if self.tools else None,
            tool_choice=self.tool_choice,
            think=self.think(),
            logprobs=bool(self.logprobs),
            top_logprobs=self.top_logprobs or 0,
        )


class CompletionRequest(OpenAIBody):
    """POST /v1/completions (the legacy text completions)"""

    prompt: str | list[str] | TokenIds | list[TokenIds] = Field(
        "", description="A prompt, a list of prompts, or prompts as token ids of the model's vocabulary."
    )
    suffix: str | None = Field(None, description="Text after the completion: fill in the middle (FIM models).")
    echo: StrictBool | None = Field(None, description="Put the prompt before the completion.")
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="The N most likely tokens too.")
    best_of: int | None = Field(None, ge=1, description="Accepted; each of the n answers is its own sequence.")

    def max_new_tokens(self) -> int | None:
        return self.max_tokens if self.max_tokens is not None else 16  # OpenAI's default for completions

    def prompts(self) -> list[str | TokenIds]:
        """Each prompt, a text or token ids (a list of ints is one prompt, as OpenAI reads it)."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise InvalidRequestError("prompt must not be an empty list")
        if all(isinstance(item, int) for item in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]

    def to_native(self, prompt: str | TokenIds) -> GenerateRequest:
        text, tokens = (prompt, None) if isinstance(prompt, str) else ("", prompt)
        if tokens is not None and not tokens:
            raise InvalidRequestError("a prompt of token ids must not be empty")
        return GenerateRequest(
            **self._native_fields(),
            prompt=text,
            context=tokens,  # raw token ids go in front of the (empty) prompt text
            suffix=self.suffix or None,
            raw=True,
            logprobs=self.logprobs is not None,
            top_logprobs=self.logprobs or 0,
        )


class EmbeddingRequest(BaseModel):
    """POST /v1/embeddings"""

    model_config = ConfigDict(extra="ignore")

    model: str = Field("", description="The model's name, such as smollm2.")
    input: str | list[str] | TokenIds | list[TokenIds] = Field(
        description="A text, a list of texts, or token ids (read as EMBER_OPENAI_TOKEN_ENCODING says)."
    )
    encoding_format: Literal["float", "base64"] | None = "float"
    dimensions: int | None = Field(None, ge=1, description="Keep the first N dimensions (then normalized).")
    keep_alive: str | float | None = Field(None, description="ember/Ollama: how long the model stays loaded.")
    priority: str | int | None = Field(None, description="ember: high, normal (default) or low.")

    def inputs(self) -> list[str | TokenIds]:
        value = self.input
        if isinstance(value, str):
            items: list[str | TokenIds] = [value]
        elif value and all(isinstance(item, int) for item in value):
            items = [list(value)]  # type: ignore[arg-type]
        else:
            items = list(value)  # type: ignore[arg-type]
        if not items:
            raise InvalidRequestError("input must be a string, a non-empty list of strings, or token ids")
        if any(not item for item in items):
            raise InvalidRequestError("input must not contain empty strings or empty token lists")
        return items
