"""OpenAI's Responses and Conversations APIs: request bodies (pydantic) and the translation to and from ember's
conversation store.

Read from openai-python's types (src/openai/types/responses, src/openai/types/conversations). Items map onto
stored messages: a `message` item is a message, a `function_call` is an assistant message's tool call, a
`function_call_output` is a tool message. A stored message keeps its id as the item id (`msg_...`); a function
call's item id is `fc_` and its message's hex, then its index.

Fields of OpenAI's that have no meaning for a local model (reasoning, service_tier, prompt_cache_key, user,
safety_identifier, include ...) are accepted and ignored, as Ollama's and vLLM's Responses endpoints do;
`background: true` is refused, since ember answers while the request waits.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ember.conversations.records import StoredMessage
from ember.conversations.store import NewMessage
from ember.errors import InvalidRequestError

_FUNCTION_CALL_ID = re.compile(r"fc_([0-9a-f]{24})_(\d{1,4})")
_TEXT_PARTS = ("input_text", "output_text", "text", "summary_text")


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")

    format: TextFormat | None = None
    verbosity: str | None = None


class ConversationRef(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str = Field(max_length=100)


class ResponseCreate(BaseModel):
    """POST /v1/responses."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(max_length=200, description="The model that answers (as for /v1/chat/completions).")
    input: str | list[dict[str, Any]] = Field("", description="Text, or a list of input items.")
    instructions: str | None = Field(None, max_length=1_000_000, description="This response's system prompt.")
    previous_response_id: str | None = Field(None, max_length=100)
    conversation: str | ConversationRef | None = None
    store: bool = True
    stream: bool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    truncation: Literal["auto", "disabled"] | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    metadata: dict[str, str] | None = None
    background: bool | None = None
    options: dict[str, Any] | None = Field(
        None, description="ember's addition: load and sampling options (Ollama's names), under the fields above."
    )

    def conversation_id(self) -> str | None:
        if isinstance(self.conversation, ConversationRef):
            return self.conversation.id
        return self.conversation

    def native_options(self) -> dict[str, Any]:
        options: dict[str, Any] = dict(self.options or {})
        if self.max_output_tokens is not None:
            options["num_predict"] = self.max_output_tokens
        if self.temperature is not None:
            options["temperature"] = self.temperature
        if self.top_p is not None:
            options["top_p"] = self.top_p
        return options

    def native_format(self) -> Any:
        spec = self.text.format if self.text else None
        if spec is None or spec.type == "text":
            return None
        if spec.type == "json_object":
            return "json"
        if not isinstance(spec.schema_, dict):
            raise InvalidRequestError("text.format.schema must be a JSON schema object")
        return spec.schema_

    def native_tools(self) -> list[dict[str, Any]] | None:
        """Responses tools ({"type": "function", "name", "parameters"}) as chat tools."""
        if not self.tools:
            return None
        tools = []
        for index, tool in enumerate(self.tools):
            if tool.get("type") != "function":
                raise InvalidRequestError(
                    f"tools[{index}].type {tool.get('type')!r} is not supported here; only function tools are"
                )
            if not isinstance(tool.get("name"), str) or not tool["name"]:
                raise InvalidRequestError(f"tools[{index}].name must be a non-empty string")
            function = {key: tool[key] for key in ("name", "description", "parameters") if tool.get(key) is not None}
            tools.append({"type": "function", "function": function})
        return tools

    def native_tool_choice(self) -> Any:
        choice = self.tool_choice
        if isinstance(choice, dict) and choice.get("type") == "function":
            return {"type": "function", "function": {"name": choice.get("name")}}
        return choice


class ConversationCreateBody(BaseModel):
    """POST /v1/conversations."""

    model_config = ConfigDict(extra="ignore")

    items: list[dict[str, Any]] | None = Field(None, max_length=20)
    metadata: dict[str, str] | None = None


class ConversationUpdateBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    metadata: dict[str, str]


class ItemsCreateBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    items: list[dict[str, Any]] = Field(max_length=20)


# --- items in ------------------------------------------------------------------------------------------


def input_messages(value: str | list[dict[str, Any]]) -> list[NewMessage]:
    """Input items as messages to store, in order (consecutive function calls become one assistant message)."""
    if isinstance(value, str):
        return [NewMessage(role="user", content=value)]
    messages: list[NewMessage] = []
    for index, item in enumerate(value):
        kind = item.get("type") or ("message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise InvalidRequestError(f"input[{index}].role must be user, assistant, system or developer")
            messages.append(
                NewMessage(role="system" if role == "developer" else role, content=_text(item.get("content"), index))
            )
        elif kind == "function_call":
            call = _function_call(item, index)
            last = messages[-1] if messages else None
            if last is not None and last.role == "assistant" and last.tool_calls is not None:
                last.tool_calls.append(call)
            else:
                messages.append(NewMessage(role="assistant", content="", tool_calls=[call]))
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if not isinstance(call_id, str) or not call_id:
                raise InvalidRequestError(f"input[{index}].call_id must name the function call it answers")
            output = item.get("output")
            content = output if isinstance(output, str) else _text(output, index)
            messages.append(NewMessage(role="tool", content=content, tool_call_id=call_id))
        elif kind == "item_reference":
            raise InvalidRequestError(
                f"input[{index}]: item references are not supported; send the item, or use previous_response_id"
            )
        else:
            raise InvalidRequestError(
                f"input[{index}].type {kind!r} is not supported: use message, function_call or function_call_output"
            )
    return messages


def _text(content: Any, index: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in _TEXT_PARTS:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise InvalidRequestError(
                    f"input[{index}]: content of type {kind!r} is not supported; this model reads text only"
                )
            parts.append(str(part.get("text") or ""))
        return "".join(parts)
    raise InvalidRequestError(f"input[{index}].content must be text or a list of text parts")


def _function_call(item: dict[str, Any], index: int) -> dict[str, Any]:
    name, arguments = item.get("name"), item.get("arguments") or "{}"
    if not isinstance(name, str) or not name:
        raise InvalidRequestError(f"input[{index}].name must name the function that was called")
    try:
        parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
    except ValueError:
        raise InvalidRequestError(f"input[{index}].arguments must be a JSON object in a string") from None
    if not isinstance(parsed, dict):
        raise InvalidRequestError(f"input[{index}].arguments must be a JSON object in a string")
    call_id = item.get("call_id") or item.get("id") or ""
    return {"id": str(call_id), "function": {"name": name, "arguments": parsed}}


# --- items out -----------------------------------------------------------------------------------------


def function_call_item_id(message_id: str, index: int) -> str:
    return f"fc_{message_id.removeprefix('msg_')}_{index}"


def parse_item_id(item_id: str) -> tuple[str, int | None]:
    """The message an item id names, and the tool call's index for a function call item."""
    match = _FUNCTION_CALL_ID.fullmatch(item_id)
    if match:
        return f"msg_{match.group(1)}", int(match.group(2))
    return item_id, None


def message_items(message: StoredMessage, *, output: bool = False) -> list[dict[str, Any]]:
    """The items of one stored message: a message item, and an item per tool call of an assistant."""
    status = "completed" if message.status == "completed" else "incomplete" if output else message.status
    if message.role == "tool":
        return [
            {
                "id": message.id,
                "type": "function_call_output",
                "call_id": message.tool_call_id or "",
                "output": message.content,
                "status": "completed",
            }
        ]
    items: list[dict[str, Any]] = []
    if message.role != "assistant" or message.content or not message.tool_calls:
        part = "output_text" if message.role == "assistant" else "input_text"
        content: dict[str, Any] = {"type": part, "text": message.content}
        if part == "output_text":
            content.update(annotations=[], logprobs=[])
        items.append(
            {"id": message.id, "type": "message", "role": message.role, "status": status, "content": [content]}
        )
    for index, call in enumerate(message.tool_calls or ()):
        function = call.get("function", {})
        items.append(
            {
                "id": function_call_item_id(message.id, index),
                "type": "function_call",
                "call_id": call.get("id") or function_call_item_id(message.id, index),
                "name": function.get("name", ""),
                "arguments": json.dumps(function.get("arguments", {}), ensure_ascii=False),
                "status": "completed",
            }
        )
    return items


def usage(final: Any) -> dict[str, Any]:
    prompt = final.prompt_eval_count + final.prompt_cached_count
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": final.prompt_cached_count, "cache_write_tokens": 0},
        "output_tokens": final.eval_count,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + final.eval_count,
    }


def response_object(
    response_id: str,
    body: ResponseCreate,
    *,
    model: str,
    created_at: float,
    status: str,
    output: list[dict[str, Any]],
    conversation_id: str | None,
    usage_: dict[str, Any] | None = None,
    context: dict[str, Any] | None = None,
    error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A Response as openai-python's `Response` type reads it (the fields it requires, and the request's)."""
    data: dict[str, Any] = {
        "id": response_id,
        "object": "response",
        "created_at": int(created_at),
        "status": status,
        "error": error,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "model": model,
        "output": output,
        "parallel_tool_calls": body.parallel_tool_calls if body.parallel_tool_calls is not None else True,
        "previous_response_id": body.previous_response_id,
        "conversation": {"id": conversation_id} if conversation_id else None,
        "store": body.store,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "text": {
            "format": (
                body.text.format.model_dump(by_alias=True, exclude_none=True)
                if body.text and body.text.format
                else {"type": "text"}
            )
        },
        "tool_choice": body.tool_choice if body.tool_choice is not None else "auto",
        "tools": body.tools or [],
        "truncation": body.truncation or "disabled",
        "usage": usage_,
        "metadata": body.metadata or {},
    }
    if status == "completed":
        data["completed_at"] = int(time.time())
    if context is not None:
        data["context"] = context  # ember's addition: the context report of the turn
    return data
