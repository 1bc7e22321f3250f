"""Request bodies of the native conversation routes (/api/conversations ...), as pydantic models.

They describe the routes in the OpenAPI document and are checked by FastAPI before a route runs (a bad body is
a 400 that names the field). `to_new_messages()` and `turn_request()` turn them into the conversation layer's
own types.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ember.conversations.records import ContextSettings, Strategy
from ember.conversations.store import NewMessage
from ember.conversations.turns import TurnRequest

_NAME = Field(None, max_length=200, description="A model name; default: the conversation's.")


class MessageIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "tool"] = "user"
    content: str = Field("", max_length=10_000_000)
    pinned: bool = Field(False, description="Always keep this message in the prompt.")
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = Field(None, max_length=200)
    tool_name: str | None = Field(None, max_length=200)

    def to_new(self) -> NewMessage:
        return NewMessage(
            role=self.role,
            content=self.content,
            pinned=self.pinned,
            tool_calls=self.tool_calls,
            tool_call_id=self.tool_call_id,
            tool_name=self.tool_name,
        )


class ConversationCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: str = Field("", max_length=1000)
    model: str | None = Field(None, max_length=200, description="Default: the server's default model.")
    system: str | None = Field(None, max_length=1_000_000, description="The system prompt, kept in every prompt.")
    options: dict[str, Any] | None = Field(None, description="Load and sampling options for every turn.")
    strategy: Strategy = Field("sliding", description="What to do when the conversation outgrows num_ctx.")
    context_settings: ContextSettings | None = None
    metadata: dict[str, Any] | None = None
    messages: list[MessageIn] = Field(default_factory=list, max_length=100_000, description="A history to start with.")
    origin: Literal["api", "repl"] = Field("api", description="Who started it (the REPL says so).")


class ConversationUpdate(BaseModel):
    """Rename, or change what the next turns use; fields left out stay as they are."""

    model_config = ConfigDict(extra="forbid")

    title: str | None = Field(None, max_length=1000)
    model: str | None = Field(None, max_length=200)
    system: str | None = Field(None, max_length=1_000_000, description='"" removes the system prompt.')
    options: dict[str, Any] | None = None
    strategy: Strategy | None = None
    context_settings: ContextSettings | None = None
    metadata: dict[str, Any] | None = None


class _Answering(BaseModel):
    """What every route that answers takes, besides its messages."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = _NAME
    options: dict[str, Any] | None = Field(None, description="This turn's options, over the conversation's.")
    format: str | dict[str, Any] | None = Field(None, description='"json", or a JSON schema the answer must follow.')
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    stream: bool = True
    keep_alive: str | float | None = None
    priority: Literal["high", "normal", "low"] | None = None
    return_prompt: bool = Field(False, description="Send back the prompt's tokens (context.prompt_tokens).")

    def turn_request(self, conversation_id: str, **fields: Any) -> TurnRequest:
        return TurnRequest(
            conversation_id=conversation_id,
            model=self.model,
            options=dict(self.options or {}),
            format=self.format,
            tools=self.tools,
            tool_choice=self.tool_choice,
            keep_alive=self.keep_alive,
            priority=self.priority,
            return_prompt=self.return_prompt,
            **fields,
        )


class ChatBody(_Answering):
    """The next turn: a user message (`content`), or several messages (`messages`, e.g. tool results); with
    neither, the conversation's last message (a question left unanswered) is answered."""

    content: str | None = Field(None, max_length=10_000_000, description="A user message.")
    messages: list[MessageIn] | None = Field(None, max_length=10_000)
    pinned: bool = Field(False, description="Pin the new user message.")

    def to_new_messages(self) -> list[NewMessage]:
        new = [message.to_new() for message in self.messages or ()]
        if self.content is not None:
            new.append(NewMessage(role="user", content=self.content, pinned=self.pinned))
        return new


class RegenerateBody(_Answering):
    """Answer the question of an assistant message again; the new answer is its sibling."""


class EditBody(_Answering):
    """A message's new text, written as its sibling (the old one stays on its branch). A user message is
    answered again at once (streamed like /chat); another kind is only replaced."""

    content: str = Field(max_length=10_000_000)


class MessagePatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pinned: bool


class ForkBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    message_id: str = Field(max_length=100, description="Where the branch starts (that message stays on it).")
    new_conversation: bool = Field(
        False, description="Copy the branch into a new conversation instead of continuing from there in this one."
    )
    title: str | None = Field(None, max_length=1000, description="With new_conversation: its title.")
