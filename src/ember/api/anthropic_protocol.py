"""The Anthropic Messages API's request bodies (/v1/messages, /v1/messages/count_tokens), with `to_native()`.

Read from the `anthropic` SDK's types and from Ollama's translation (anthropic/anthropic.go): the system
prompt is a string or text blocks; a message's content is a string or blocks of text, tool_use, tool_result
and thinking (images are refused: ember's models read text); a user message's tool_result blocks become tool
messages before its text, as Ollama orders them. Fields ember has no use for (metadata, service_tier,
container, mcp_servers ...) are ignored.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from ember.errors import InvalidRequestError
from ember.types import ChatRequest, Message, ToolCall, ToolCallFunction


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextBlock(_Lenient):
    type: Literal["text"]
    text: str


class ContentBlock(_Lenient):
    """One block of a message: text, tool_use, tool_result, thinking (image and document are refused)."""

    type: Literal["text", "image", "document", "tool_use", "tool_result", "thinking", "redacted_thinking"]
    text: str | None = None
    id: str | None = Field(None, description="tool_use: the call's id.")
    name: str | None = Field(None, description="tool_use: the tool's name.")
    input: dict[str, Any] | None = Field(None, description="tool_use: the arguments.")
    tool_use_id: str | None = Field(None, description="tool_result: the call it answers.")
    content: str | list[TextBlock] | None = Field(None, description="tool_result: the result, as text.")
    is_error: StrictBool | None = None
    thinking: str | None = None
    signature: str | None = None


class MessageParam(_Lenient):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]


class Tool(_Lenient):
    name: str = Field(min_length=1)
    description: str | None = None
    input_schema: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})
    type: str | None = Field(None, description="custom (the default); server tools are not available here.")


class ToolChoice(_Lenient):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: StrictBool | None = None


class ThinkingConfig(_Lenient):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(None, ge=0)


class OutputConfig(_Lenient):
    effort: str | None = Field(None, description="low, medium, high (xhigh, max): how hard a thinking model thinks.")


class _Conversation(_Lenient):
    model: str = Field("", description="The model's name, such as smollm2.")
    messages: list[MessageParam] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None
    output_config: OutputConfig | None = None

    def native_messages(self) -> list[Message]:
        messages: list[Message] = []
        system = self.system if isinstance(self.system, str) else "".join(block.text for block in self.system or ())
        if system:
            messages.append(Message(role="system", content=system))
        names_by_id: dict[str, str] = {}
        for message in self.messages:
            messages.extend(_convert(message, names_by_id))
        return messages

    def native_tools(self) -> list[dict[str, Any]] | None:
        if not self.tools:
            return None
        for tool in self.tools:
            if tool.type not in (None, "custom"):
                raise InvalidRequestError(f"tool {tool.name!r}: server tools ({tool.type}) are not available here")
        return [
            {
                "type": "function",
                "function": {"name": t.name, "description": t.description or "", "parameters": t.input_schema},
            }
            for t in self.tools
        ]

    def native_tool_choice(self) -> str | dict[str, Any] | None:
        choice = self.tool_choice
        if choice is None:
            return None
        if choice.type == "tool":
            if not choice.name:
                raise InvalidRequestError('tool_choice {"type": "tool"} needs the name of the tool')
            return {"type": "function", "function": {"name": choice.name}}
        return {"auto": "auto", "any": "required", "none": "none"}[choice.type]

    def think(self, model_thinks: bool) -> bool | str | None:
        """Anthropic's thinking setting as `think`. Clients such as Claude Code ask every model to think; as
        Ollama does for this API, a model that cannot think then just answers (no 400)."""
        if self.thinking is not None and self.thinking.type == "disabled":
            return False
        if not model_thinks:
            return None
        effort = ((self.output_config and self.output_config.effort) or "").strip().lower()
        if effort in ("low", "medium", "high", "xhigh", "max"):  # as Ollama reads it: xhigh is high
            return "high" if effort == "xhigh" else effort
        if self.thinking is not None and self.thinking.type == "enabled":
            return True
        return None


class MessagesRequest(_Conversation):
    """POST /v1/messages"""

    max_tokens: int = Field(ge=1, description="Most tokens to generate.")
    stop_sequences: list[str] | None = None
    stream: StrictBool | None = False
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)
    metadata: dict[str, Any] | None = Field(None, description="Accepted and ignored.")

    def to_native(self, *, model_thinks: bool) -> ChatRequest:
        options: dict[str, Any] = {"num_predict": self.max_tokens}
        for name in ("temperature", "top_p", "top_k"):
            if getattr(self, name) is not None:
                options[name] = getattr(self, name)
        if self.stop_sequences:
            options["stop"] = self.stop_sequences
        return ChatRequest(
            model=self.model,
            messages=self.native_messages(),
            options=options,
            tools=self.native_tools(),
            tool_choice=self.native_tool_choice(),
            think=self.think(model_thinks),
            stream=True,
        )


class CountTokensRequest(_Conversation):
    """POST /v1/messages/count_tokens"""

    def to_native(self, *, model_thinks: bool) -> ChatRequest:
        return ChatRequest(
            model=self.model,
            messages=self.native_messages(),
            tools=self.native_tools(),
            tool_choice=self.native_tool_choice(),
            think=self.think(model_thinks),
        )


def _result_text(content: str | list[TextBlock] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(block.text for block in content)


def _convert(message: MessageParam, names_by_id: dict[str, str]) -> list[Message]:
    """One Anthropic message as native messages (tool results each their own, before the user's text)."""
    if isinstance(message.content, str):
        return [Message(role=message.role, content=message.content)]
    text, thinking, calls, results = [], [], [], []
    for block in message.content:
        if block.type == "text":
            text.append(block.text or "")
        elif block.type in ("image", "document"):
            raise InvalidRequestError(f"this model does not support {block.type} blocks; send text only")
        elif block.type == "tool_use":
            if not block.id or not block.name:
                raise InvalidRequestError("a tool_use block needs its id and name")
            names_by_id[block.id] = block.name
            calls.append(ToolCall(id=block.id, function=ToolCallFunction(name=block.name, arguments=block.input or {})))
        elif block.type == "tool_result":
            content = _result_text(block.content)
            if block.is_error:
                content = json.dumps({"error": content})
            name = names_by_id.get(block.tool_use_id or "")
            results.append(Message(role="tool", content=content, tool_call_id=block.tool_use_id, tool_name=name))
        elif block.type == "thinking":
            thinking.append(block.thinking or "")
    messages = list(results) if message.role == "user" else []
    if text or calls or thinking:
        messages.append(
            Message(
                role=message.role,
                content="".join(text),
                thinking="".join(thinking) or None,
                tool_calls=calls or None,
            )
        )
    if message.role != "user":
        messages.extend(results)
    return messages
