"""Native request and response types, with Ollama's field names.

Results can be read as attributes (`response.response`) or as a dict (`response["response"]`), the way the
`ollama` client's results can, so code written against Ollama's Python library reads the same here.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ember.errors import InvalidRequestError

Role = Literal["system", "user", "assistant", "tool"]


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


class _Subscriptable(BaseModel):
    def __getitem__(self, key: str) -> Any:
        if key not in type(self).model_fields:
            raise KeyError(key)
        return getattr(self, key)

    def __contains__(self, key: object) -> bool:
        return key in type(self).model_fields

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default) if key in type(self).model_fields else default


class ToolCallFunction(_Subscriptable):
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)
    index: int | None = None  # the call's place among the answer's calls (Ollama's function.index)


class ToolCall(_Subscriptable):
    function: ToolCallFunction
    id: str | None = None  # OpenAI's call id, for templates that pair calls with their results


class Message(_Subscriptable):
    """One chat message."""

    model_config = ConfigDict(extra="ignore")

    role: Role
    content: str = ""
    thinking: str | None = None  # the model's reasoning, apart from its answer (a thinking model's <think> part)
    images: list[str] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_name: str | None = None
    tool_call_id: str | None = None  # OpenAI: the call a tool message answers

    def template_view(self) -> dict[str, Any]:
        """The message as a chat template expects it."""
        view: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.thinking:  # Ollama's templates read .Thinking; Hugging Face ones reasoning_content
            view["thinking"] = view["reasoning_content"] = self.thinking
        if self.tool_calls:
            # Hugging Face templates expect {"type": "function", "function": {"name", "arguments": {...}}}
            view["tool_calls"] = [{"type": "function", **c.model_dump(exclude_none=True)} for c in self.tool_calls]
        if self.tool_name:
            view["name"] = self.tool_name
        if self.tool_call_id:
            view["tool_call_id"] = self.tool_call_id
        return view


def to_messages(messages: Any) -> list[Message]:
    """Validate chat messages given as dicts or Message objects."""
    if isinstance(messages, (str, bytes)) or not hasattr(messages, "__iter__"):
        raise InvalidRequestError("messages must be a list of {'role': ..., 'content': ...} objects")
    result = []
    for index, message in enumerate(messages):
        if isinstance(message, Message):
            result.append(message)
            continue
        if not isinstance(message, Mapping):
            raise InvalidRequestError(f"message {index} must be an object with 'role' and 'content'")
        try:
            result.append(Message.model_validate(dict(message)))
        except ValidationError as error:
            detail = error.errors()[0]
            where = ".".join(str(part) for part in detail["loc"])
            raise InvalidRequestError(f"message {index}: {where}: {detail['msg']}") from None
    return result


FormatSpec = str | dict[str, Any] | None
ThinkLevel = Literal["low", "medium", "high", "max"]
ThinkSpec = bool | ThinkLevel | None


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = ""
    format: FormatSpec = Field(None, description='"json", or a JSON schema the answer must follow.')
    options: dict[str, Any] | None = Field(None, description="Load and sampling options (Ollama's names).")
    stream: bool = Field(True, description="Stream the answer in chunks.")
    keep_alive: str | float | None = Field(None, description="How long the model stays loaded afterwards.")
    truncate: bool | None = Field(
        None,
        description="Drop the oldest part of an over-long prompt instead of failing; not set (null) means true, "
        "as in Ollama.",
    )
    think: ThinkSpec = Field(
        None,
        description="A thinking model thinks first (true, or low/medium/high/max); false asks it not to. "
        "Not set: a thinking model thinks.",
    )
    priority: str | int | None = Field(None, description="high, normal (default) or low: the order in the queue.")
    logprobs: bool = Field(False, description="Return the log-probability of each generated token.")
    top_logprobs: int = Field(0, ge=0, le=20, description="With logprobs: the most likely tokens at each position.")
    grammar: str | None = Field(None, description="A GBNF grammar the answer follows (llama-cpp-python's calls).")


class GenerateRequest(_Request):
    """A completion of one prompt, by default wrapped in the model's chat template (raw=False)."""

    prompt: str = ""
    suffix: str | None = Field(None, description="Text after the insertion point: fill in the middle (FIM).")
    system: str | None = Field(None, description="System prompt, replacing the model's own.")
    template: str | None = Field(None, description="Chat template (Jinja), replacing the model's own.")
    raw: bool = Field(False, description="Send the prompt as is, without the chat template.")
    images: list[str] | None = None
    context: list[int] | None = Field(None, description="Tokens of an earlier answer to continue from.")


class ChatRequest(_Request):
    """The next assistant message of a conversation."""

    messages: list[Message] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = Field(
        None, description='ember\'s addition: "auto" (default), "none", "required" or {"function": {"name": ...}}.'
    )
    template: str | None = Field(None, description="Chat template (Jinja), replacing the model's own.")
    continue_final: bool = Field(
        False,
        description="ember's addition: when the last message is the assistant's, continue its text instead of "
        "starting a new answer (the prompt ends inside that message).",
    )
    report_prefill: bool = Field(
        False,
        description="ember's addition: stream chunks with `prefill` (prompt tokens decoded so far, of all) while a "
        "long prompt is read, before the first token.",
    )


RequestT = TypeVar("RequestT", bound=BaseModel)


def build_request(kind: type[RequestT], **fields: Any) -> RequestT:
    """Construct a request type, turning validation failures into a clear InvalidRequestError."""
    try:
        return kind(**fields)
    except ValidationError as error:
        problems = []
        for detail in error.errors():
            where = ".".join(str(part) for part in detail["loc"]) or "request"
            problems.append(f"{where}: {detail['msg']}")
        raise InvalidRequestError("invalid request: " + "; ".join(problems)) from None


class Metrics(_Subscriptable):
    """Timings in nanoseconds, as Ollama reports them."""

    total_duration: int = 0
    load_duration: int = 0
    prompt_eval_count: int = 0  # prompt tokens evaluated; those reused from the KV cache are not counted
    prompt_cached_count: int = 0  # ember's addition: prompt tokens whose KV was reused
    prompt_eval_duration: int = 0
    eval_count: int = 0
    eval_duration: int = 0

    @property
    def prompt_eval_rate(self) -> float:
        """Prompt tokens per second."""
        return self.prompt_eval_count / (self.prompt_eval_duration / 1e9) if self.prompt_eval_duration else 0.0

    @property
    def eval_rate(self) -> float:
        """Generated tokens per second."""
        return self.eval_count / (self.eval_duration / 1e9) if self.eval_duration else 0.0


class TopLogprob(_Subscriptable):
    """A token and its log-probability (natural log) at one position of the answer."""

    token: str  # the token's text (its bytes decoded as UTF-8, a part of a character replaced)
    logprob: float
    bytes: list[int] | None = None  # the token's UTF-8 bytes


class TokenLogprob(TopLogprob):
    """A generated token's log-probability, and the most likely tokens at its position (when asked for).

    From the model's raw logits, before logit_bias, penalties, temperature and truncation (as OpenAI reports).
    """

    top_logprobs: list[TopLogprob] = Field(default_factory=list)


DoneReasonName = Literal["stop", "length", "cancelled", "load", "unload"]


class GenerateResponse(Metrics):
    """A chunk of a streamed generation, or the whole of one (`done` is True on the last)."""

    model: str
    created_at: str = Field(default_factory=now_rfc3339)
    response: str = ""
    thinking: str | None = None  # a thinking model's reasoning, apart from the response
    done: bool = False
    done_reason: DoneReasonName | None = None
    stop_sequence: str | None = None  # ember's addition, on the last chunk: the stop string that ended it
    context: list[int] | None = None
    logprobs: list[TokenLogprob] | None = None  # the tokens of this chunk, when the request asked for them
    tokens: int | None = None  # ember's addition, on a streamed chunk: the generated tokens its text covers


class PrefillProgress(_Subscriptable):
    """How far the prompt has been read: `done` of `total` tokens in the KV cache (reused ones included)."""

    done: int
    total: int


class ChatResponse(Metrics):
    """A chunk of a streamed chat answer, or the whole of one (`done` is True on the last)."""

    model: str
    created_at: str = Field(default_factory=now_rfc3339)
    message: Message = Field(default_factory=lambda: Message(role="assistant"))
    done: bool = False
    done_reason: DoneReasonName | None = None
    logprobs: list[TokenLogprob] | None = None  # the tokens of this chunk, when the request asked for them
    truncated_messages: int | None = None  # ember's addition, on the last chunk: oldest messages dropped to fit
    stop_sequence: str | None = None  # ember's addition, on the last chunk: the stop string that ended it
    prefill: PrefillProgress | None = None  # with report_prefill: a chunk without text, while the prompt is read
    tokens: int | None = None  # ember's addition, on a streamed chunk: the generated tokens its text covers


class EmbedRequest(BaseModel):
    """Embeddings of one text or several (Ollama's /api/embed)."""

    model_config = ConfigDict(extra="forbid")

    model: str = ""
    input: str | list[str | list[int]] = Field(
        "", description="A text, or a list of inputs to embed: texts, or token ids of the model's vocabulary."
    )
    truncate: bool = Field(True, description="Cut an input longer than the context instead of failing.")
    dimensions: int | None = Field(None, ge=1, description="Keep the first N dimensions (then normalized).")
    options: dict[str, Any] | None = Field(None, description="Load options (Ollama's names).")
    keep_alive: str | float | None = Field(None, description="How long the model stays loaded afterwards.")
    priority: str | int | None = Field(None, description="high, normal (default) or low: the order in the queue.")

    def inputs(self) -> list[str | list[int]]:
        """The inputs to embed: an empty string alone means none (the request only loads the model)."""
        if isinstance(self.input, str):
            return [self.input] if self.input else []
        return list(self.input)


class EmbedResponse(_Subscriptable):
    """One vector per input, in order; timings in nanoseconds. The runner sends them as the model pooled them;
    the API routes normalize them (L2) where Ollama and OpenAI do."""

    model: str
    embeddings: list[list[float]] = Field(default_factory=list)
    total_duration: int = 0
    load_duration: int = 0
    prompt_eval_count: int = 0


class Priority(enum.IntEnum):
    """Lower values are served first."""

    HIGH = 0
    NORMAL = 1
    LOW = 2


def parse_priority(value: str | int | None) -> Priority:
    """Read a priority as an API request gives it: a name in any case, 0/1/2, or nothing (NORMAL)."""
    if value is None:
        return Priority.NORMAL
    if isinstance(value, str):
        try:
            return Priority[value.strip().upper()]
        except KeyError:
            pass
    # bool is an int subclass: True must not quietly mean NORMAL.
    elif isinstance(value, int) and not isinstance(value, bool) and value in Priority._value2member_map_:
        return Priority(value)
    raise InvalidRequestError(f"invalid priority {value!r}: use 'high', 'normal' or 'low' (or 0, 1, 2)")
