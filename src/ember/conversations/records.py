"""What the conversation store holds: conversations, and messages arranged as a tree.

Each message has a parent (None for the first); editing or regenerating a message adds a sibling, so the old
branch stays. The conversation's `active_leaf` says which branch is current: the active path is the chain of
parents from that leaf to the root. Summaries written by the `summarize` strategy are messages of kind
"summary" outside the tree (no parent); `info["through"]` names the last message they cover.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ember.errors import EmberError, InvalidRequestError
from ember.types import Message, ToolCall

Strategy = Literal["sliding", "summarize", "selective", "none"]
STRATEGIES: tuple[str, ...] = ("sliding", "summarize", "selective", "none")
MessageStatus = Literal["in_progress", "completed", "incomplete"]
_ID = re.compile(r"(conv|msg|resp)_[0-9a-f]{24}")


class ConversationNotFoundError(EmberError):
    """No conversation (or message, or response) has that id."""

    http_status = 404


class ConversationBusyError(EmberError):
    """Another answer is being written into the conversation right now."""

    http_status = 409


def check_id(value: str, prefix: str, what: str) -> str:
    """An id of the given kind, or a 400/404 that says what one looks like (ids reach SQL only as parameters,
    but a malformed one can never name anything, so it fails early with a clear message)."""
    if not isinstance(value, str) or not _ID.fullmatch(value) or not value.startswith(prefix + "_"):
        raise ConversationNotFoundError(f"no {what} {value!r}: ids look like {prefix}_ and 24 hex digits")
    return value


class ContextSettings(BaseModel):
    """How a conversation keeps within num_ctx; stored with it, changed by PATCH."""

    model_config = ConfigDict(extra="forbid")

    warn_at: float = Field(0.8, gt=0, le=1, description="Warn once the context is this full (0 to 1).")
    summary_model: str | None = Field(
        None, description="summarize: the model that writes summaries (default: the chat's)."
    )
    embedding_model: str | None = Field(
        None, description="selective: rank older messages by embeddings from this model (default: BM25 only)."
    )
    keep_last: int = Field(4, ge=1, le=1000, description="Messages at the end always kept in the prompt.")


def context_settings(value: dict[str, Any] | None) -> ContextSettings:
    try:
        return ContextSettings.model_validate(value or {})
    except Exception as error:  # pydantic's ValidationError, said plainly
        raise InvalidRequestError(f"invalid context settings: {error}") from None


def check_strategy(value: str) -> str:
    if value not in STRATEGIES:
        raise InvalidRequestError(f"unknown context strategy {value!r}: use one of {', '.join(STRATEGIES)}")
    return value


@dataclass
class StoredMessage:
    id: str
    conversation_id: str
    parent_id: str | None
    seq: int
    role: str
    content: str = ""
    kind: str = "message"  # "message", or "summary" (outside the tree)
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    tool_name: str | None = None
    status: str = "completed"
    pinned: bool = False
    token_count: int | None = None
    token_model: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    updated_at: float = 0.0

    @property
    def partial(self) -> bool:
        """The answer was cut off (client gone, cancelled, server killed) or is still being written."""
        return self.status != "completed"

    def to_native(self) -> Message:
        calls = [ToolCall.model_validate(call) for call in self.tool_calls] if self.tool_calls else None
        return Message(
            role=self.role,  # type: ignore[arg-type]
            content=self.content,
            tool_calls=calls,
            tool_call_id=self.tool_call_id,
            tool_name=self.tool_name,
        )

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": self.id,
            "parent_id": self.parent_id,
            "role": self.role,
            "content": self.content,
            "status": self.status,
            "partial": self.partial,
            "pinned": self.pinned,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }
        if self.kind != "message":
            data["kind"] = self.kind
        if self.tool_calls:
            data["tool_calls"] = self.tool_calls
        if self.tool_call_id:
            data["tool_call_id"] = self.tool_call_id
        if self.tool_name:
            data["tool_name"] = self.tool_name
        if self.token_count is not None:
            data["tokens"] = self.token_count
        if self.info:
            data["info"] = self.info
        return data


@dataclass
class Conversation:
    id: str
    title: str = ""
    model: str = ""
    system: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    strategy: str = "sliding"
    context: dict[str, Any] = field(default_factory=dict)  # ContextSettings as stored
    context_state: dict[str, Any] = field(default_factory=dict)  # where the strategy stands (window start ...)
    metadata: dict[str, Any] = field(default_factory=dict)
    origin: str = "api"  # api, repl, responses, import
    active_leaf: str | None = None
    created_at: float = 0.0
    updated_at: float = 0.0

    @property
    def settings(self) -> ContextSettings:
        return context_settings(self.context)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "title": self.title,
            "model": self.model,
            "system": self.system,
            "options": self.options,
            "strategy": self.strategy,
            "context_settings": self.settings.model_dump(),
            "metadata": self.metadata,
            "origin": self.origin,
            "active_leaf": self.active_leaf,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


@dataclass(frozen=True)
class ConversationSummary:
    """One row of a listing."""

    id: str
    title: str
    model: str
    origin: str
    message_count: int
    created_at: float
    updated_at: float
    snippet: str | None = None  # with a search: where it matched

    def to_json(self) -> dict[str, Any]:
        data = {
            "id": self.id,
            "title": self.title,
            "model": self.model,
            "origin": self.origin,
            "message_count": self.message_count,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }
        if self.snippet is not None:
            data["snippet"] = self.snippet
        return data
