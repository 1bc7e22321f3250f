"""Tool calling: offering tools to the model, forcing a call with a grammar, and finding calls in its answer.

One place for both APIs. `ToolPlan` is made per chat request (in `LoadedModel.start_chat`): it decides how
the tools reach the model (the template's own `tools` variable, or a system-prompt preamble in the Hermes
convention when the template never mentions tools), which grammar a `tool_choice` of "required" or a named
function needs, and gives the `ToolCallParser` the request's `Job` feeds the generated text through. So the
runner process already sends parsed results: text that is surely not a call, and complete tool calls.

The parser knows the common formats:

- `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Hermes, Qwen, SmolLM; the closing tag may be missing)
- a bare JSON object `{"name": ..., "arguments"|"parameters": {...}}`, or a list of them (Llama 3.x)
- `[TOOL_CALLS][{...}, ...]` and `[TOOL_CALLS]name[ARGS]{...}` (Mistral)
- `functools[{...}, ...]` (FireFunction)
- `<|python_tag|>{...}` (Llama 3.1)
"""

from __future__ import annotations

import functools
import json
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jinja2.meta

from ember.chat_template import _ENVIRONMENT
from ember.engine.llamacpp import json_schema_grammar
from ember.errors import InvalidRequestError
from ember.types import Message, ToolCall, ToolCallFunction

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
_MARKERS = (TOOL_CALL_OPEN, "[TOOL_CALLS]", "functools", "<|python_tag|>")
_CALL_KEYS = ("name", "function", "arguments", "parameters", "type")
_MISTRAL_NAME = re.compile(r"([A-Za-z_][\w.\-]*)\[ARGS\]")
_MISTRAL_PARTIAL = re.compile(r"[A-Za-z_][\w.\-]*(\[(A(R(G(S)?)?)?)?)?")


# --- the tools of a request ----------------------------------------------------------------------------


def normalize_tools(tools: Sequence[Any] | None) -> list[dict[str, Any]]:
    """Tools as {"type": "function", "function": {"name", "description", "parameters"}}; a bare function
    object ({"name": ..., "parameters": ...}) is wrapped. Anything else is refused with a clear message."""
    result = []
    for index, tool in enumerate(tools or ()):
        if not isinstance(tool, Mapping):
            raise InvalidRequestError(f'tools[{index}] must be an object {{"type": "function", "function": ...}}')
        if tool.get("type", "function") != "function":
            raise InvalidRequestError(f"tools[{index}].type must be 'function', not {tool.get('type')!r}")
        function = tool.get("function", tool if "name" in tool else None)
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str) or not function["name"]:
            raise InvalidRequestError(f"tools[{index}].function.name must be a non-empty string")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, Mapping):
            raise InvalidRequestError(f"tools[{index}].function.parameters must be a JSON schema object")
        result.append({"type": "function", "function": {k: v for k, v in function.items() if v is not None}})
    return result


@functools.lru_cache(maxsize=64)
def template_uses_tools(source: str) -> bool:
    """Whether a chat template reads the `tools` variable (and so renders tools itself)."""
    try:
        return "tools" in jinja2.meta.find_undeclared_variables(_ENVIRONMENT.parse(source))
    except jinja2.TemplateSyntaxError:
        return False


def _choice(choice: Any, names: Sequence[str]) -> str | None:
    """tool_choice as "none", "auto", "required", or the name of the one function to call."""
    if choice is None or choice in ("auto", "none", "required"):
        return choice or "auto"
    if isinstance(choice, Mapping):
        function = choice.get("function") if choice.get("type", "function") == "function" else None
        name = function.get("name") if isinstance(function, Mapping) else choice.get("name")
        if isinstance(name, str) and name:
            if name not in names:
                raise InvalidRequestError(f"tool_choice names the function {name!r}, which is not among the tools")
            return "name:" + name
    raise InvalidRequestError(
        'tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}'
    )


def tool_preamble(tools: Sequence[Mapping[str, Any]]) -> str:
    """The system-prompt text that offers tools to a model whose template knows nothing about them."""
    listing = "\n".join(json.dumps(tool["function"], ensure_ascii=False) for tool in tools)
    return (
        "You can call functions (tools). Their signatures, as JSON:\n"
        f"<tools>\n{listing}\n</tools>\n"
        "To call one, reply with only a JSON object naming the function and its arguments, inside "
        "<tool_call></tool_call> tags:\n"
        '<tool_call>\n{"name": <function name>, "arguments": <arguments as a JSON object>}\n</tool_call>\n'
        "If no function is needed, answer normally."
    )


def _as_text_history(message: Message) -> Message:
    """A tool-call or tool-result message written out as text, for templates without tool support."""
    if message.role == "tool":
        return Message(role="user", content=f"<tool_response>\n{message.content}\n</tool_response>")
    if message.role == "assistant" and message.tool_calls:
        calls = [
            f"{TOOL_CALL_OPEN}\n"
            + json.dumps({"name": c.function.name, "arguments": c.function.arguments}, ensure_ascii=False)
            + f"\n{TOOL_CALL_CLOSE}"
            for c in message.tool_calls
        ]
        content = "\n".join(([message.content] if message.content else []) + calls)
        return Message(role="assistant", content=content)
    return message


@dataclass
class ToolPlan:
    """How one chat request's tools are offered, forced and read back."""

    tools: list[dict[str, Any]]
    choice: str  # "none", "auto", "required" or "name:<function>"
    native: bool  # the template renders the tools itself
    style: str  # how a forced call is written: "hermes" (<tool_call>...</tool_call>) or "json" (bare object)

    @classmethod
    def for_request(cls, tools: Sequence[Any] | None, tool_choice: Any, template_source: str) -> ToolPlan:
        normalized = normalize_tools(tools)
        choice = _choice(tool_choice, [tool["function"]["name"] for tool in normalized])
        if choice != "auto" and choice != "none" and not normalized:
            raise InvalidRequestError("tool_choice asks for a tool call, but the request gives no tools")
        native = template_uses_tools(template_source)
        style = "hermes" if not native or TOOL_CALL_OPEN in template_source else "json"
        return cls(normalized, choice, native, style)

    @property
    def offered(self) -> bool:
        """Whether the model sees the tools (and its answer is read for calls)."""
        return bool(self.tools) and self.choice != "none"

    @property
    def names(self) -> list[str]:
        return [tool["function"]["name"] for tool in self.tools]

    def template_tools(self) -> list[dict[str, Any]] | None:
        """What the template gets as `tools`."""
        return self.tools if self.offered and self.native else None

    def conversation(self, messages: Sequence[Message]) -> list[Message]:
        """The conversation to render: for a template without tool support, the tools go into the system
        prompt and earlier tool calls and results are written out as text."""
        if self.native:
            return list(messages)
        conversation = [_as_text_history(message) for message in messages]
        if not self.offered:
            return conversation
        preamble = tool_preamble(self.tools)
        if conversation and conversation[0].role == "system":
            first = conversation[0]
            text = f"{first.content}\n\n{preamble}" if first.content else preamble
            conversation[0] = first.model_copy(update={"content": text})
        else:
            conversation.insert(0, Message(role="system", content=preamble))
        return conversation

    def grammar(self) -> str | None:
        """The grammar that forces a call, for tool_choice "required" or a named function; else None."""
        if not self.offered or self.choice == "auto":
            return None
        chosen = [self.choice[5:]] if self.choice.startswith("name:") else self.names
        schemas = [_call_schema(tool) for tool in self.tools if tool["function"]["name"] in chosen]
        schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
        call = json_schema_grammar(json.dumps(schema))
        if self.style != "hermes":
            return call
        # The schema's start rule becomes `tool-call-json`, wrapped in the tags the preamble asks for.
        call = re.sub(r"^root ::=", "tool-call-json ::=", call, count=1, flags=re.MULTILINE)
        open_, close = json.dumps(TOOL_CALL_OPEN + "\n"), json.dumps("\n" + TOOL_CALL_CLOSE)
        return f"root ::= {open_} tool-call-json {close}\n{call}"

    def parser(self) -> ToolCallParser | None:
        return ToolCallParser(self.names) if self.offered else None


def _call_schema(tool: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON schema of one call of a tool; parameters the grammar converter cannot do become any object."""
    function = tool["function"]
    parameters = function.get("parameters") or {"type": "object"}
    try:
        json_schema_grammar(json.dumps(parameters))
    except InvalidRequestError:
        parameters = {"type": "object"}
    return {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, "arguments": parameters},
        "required": ["name", "arguments"],
    }


# --- reading calls back ----------------------------------------------------------------------------------


@dataclass
class ParseResult:
    """What one piece of generated text came to, in order: text that is surely not a call, and complete calls.

    From `feed`, any text comes before the calls (text after a call waits for the next piece)."""

    items: list[str | ToolCall] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(item for item in self.items if isinstance(item, str))

    @property
    def calls(self) -> list[ToolCall]:
        return [item for item in self.items if isinstance(item, ToolCall)]


class ToolCallParser:
    """Finds tool calls in generated text fed piece by piece.

    Text that may still turn out to be a call is held back until it is clearly not one, or until the call is
    complete; the rest comes out at once (only a trailing run of whitespace waits, since whitespace next to a
    call is dropped). Calls of functions not among `tool_names`, and malformed JSON, stay plain text. The
    result does not depend on how the text is split.

    >>> parser = ToolCallParser(["add"])
    >>> parser.feed('Sure. <tool_call>{"name": "add", ').text
    'Sure.'
    >>> [(c.function.name, c.function.arguments) for c in parser.feed('"arguments": {"a": 1}}</tool_call>').calls]
    [('add', {'a': 1})]
    """

    def __init__(self, tool_names: Iterable[str]) -> None:
        self.names = frozenset(tool_names)
        self.calls: list[ToolCall] = []  # every call found so far
        self._buffer = ""
        self._after_call = False

    def feed(self, text: str) -> ParseResult:
        self._buffer += text
        return self._scan(final=False)

    def finish(self) -> ParseResult:
        """The end of the text: whatever is held back is decided now."""
        return self._scan(final=True)

    def push(self, text: str, *, final: bool = False) -> tuple[str, list[ToolCall]]:
        """feed, and finish when `final`: the text and calls both give."""
        result = self.feed(text)
        if final:
            result.items += self.finish().items
        return result.text, result.calls

    # --- scanning --------------------------------------------------------------------------------------

    def _scan(self, *, final: bool) -> ParseResult:
        items: list[str | ToolCall] = []

        def emit(text: str) -> None:
            if text:
                items.append(text)
                self._after_call = False

        while True:
            buffer = self._buffer
            if self._after_call:
                buffer = self._buffer = buffer.lstrip()
                if not buffer:
                    break
            start = _candidate(buffer)
            if start is None:
                keep = len(buffer) if final else len(buffer.rstrip())
                emit(buffer[:keep])
                self._buffer = buffer[keep:]
                break
            decision = self._decide(buffer, start, final)
            if decision is None:  # undecided: hold the candidate and the whitespace before it
                keep = len(buffer[:start].rstrip())
                emit(buffer[:keep])
                self._buffer = buffer[keep:]
                break
            end, found = decision
            self._buffer = buffer[end:]
            if not found:
                emit(buffer[:end])
                continue
            emit(buffer[:start].rstrip())
            for call in found:  # numbered in the order they come, as Ollama's function.index
                call.function.index = len(self.calls)
                self.calls.append(call)
            items.extend(found)
            self._after_call = True
            if not final:  # what follows waits for the next piece, so that text never comes after calls
                break
        return ParseResult(items)

    def _decide(self, buffer: str, start: int, final: bool) -> tuple[int, list[ToolCall]] | None:
        """At a possible call: None to wait for more text, or (end, calls); no calls means buffer[:end] is text."""
        rest = buffer[start:]
        for marker in _MARKERS:
            if rest.startswith(marker):
                return self._after_marker(buffer, start, marker, final)
        if not final and any(marker.startswith(rest) for marker in _MARKERS):
            return None
        if rest[0] not in "{[":
            return start + 1, []
        verdict = _looks_like_call(rest)
        if verdict == "no" or (verdict == "maybe" and final):
            return start + 1, []
        if verdict == "maybe":
            return None
        end = _json_end(buffer, start)
        if end is None:
            return None if not final else (len(buffer), [])
        if end < 0:
            return start + 1, []
        return end, self._calls(buffer[start:end], None, require_arguments=True)

    def _after_marker(self, buffer: str, start: int, marker: str, final: bool) -> tuple[int, list[ToolCall]] | None:
        after = start + len(marker)
        json_start = _skip_space(buffer, after)
        if json_start == len(buffer):
            return None if not final else (len(buffer), [])
        name = None
        if marker == "[TOOL_CALLS]" and buffer[json_start] not in "{[":
            match = _MISTRAL_NAME.match(buffer, json_start)
            if match is None:
                if not final and _MISTRAL_PARTIAL.fullmatch(buffer, json_start):
                    return None
                return after, []
            name, json_start = match.group(1), _skip_space(buffer, match.end())
            if json_start == len(buffer):
                return None if not final else (len(buffer), [])
        if buffer[json_start] not in "{[":
            return after, []
        end = _json_end(buffer, json_start)
        if end is None:
            return None if not final else (len(buffer), [])
        if end < 0:
            return after, []
        calls = self._calls(buffer[json_start:end], name, require_arguments=False)
        if calls and marker == TOOL_CALL_OPEN:
            close = _skip_space(buffer, end)
            tail = buffer[close:]
            if tail.startswith(TOOL_CALL_CLOSE):
                end = close + len(TOOL_CALL_CLOSE)
            elif not final and TOOL_CALL_CLOSE.startswith(tail):
                return None
        return end, calls

    def _calls(self, text: str, name: str | None, *, require_arguments: bool) -> list[ToolCall]:
        """The calls a JSON text stands for; [] when it is not JSON or names no known function."""
        try:
            value = json.loads(text)
        except ValueError:
            return []
        if name is not None:
            value = {"name": name, "arguments": value}
        calls = []
        for item in value if isinstance(value, list) else [value]:
            call = self._call(item, require_arguments)
            if call is not None:
                calls.append(call)
        return calls

    def _call(self, item: Any, require_arguments: bool) -> ToolCall | None:
        if not isinstance(item, dict):
            return None
        if isinstance(item.get("function"), dict):  # {"type": "function", "function": {...}}
            item = item["function"]
        name = item.get("name")
        if name is None and isinstance(item.get("function"), str):
            name = item["function"]
        if "arguments" in item:
            arguments = item["arguments"]
        elif "parameters" in item:
            arguments = item["parameters"]
        elif require_arguments:
            return None
        else:
            arguments = {}
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except ValueError:
                return None
        if not isinstance(name, str) or name not in self.names or not isinstance(arguments, dict):
            return None
        return ToolCall(function=ToolCallFunction(name=name, arguments=arguments))


def _skip_space(text: str, index: int) -> int:
    while index < len(text) and text[index].isspace():
        index += 1
    return index


def _candidate(buffer: str) -> int | None:
    """Where the first possible call starts: a marker, `{` or `[`, or the start of a marker at the very end."""
    found = [index for index in (buffer.find(char) for char in ("{", "[", *_MARKERS)) if index != -1]
    longest = max(len(marker) for marker in _MARKERS)
    for index in range(max(0, len(buffer) - longest + 1), len(buffer)):
        if any(marker.startswith(buffer[index:]) for marker in _MARKERS):
            found.append(index)
            break
    return min(found, default=None)


def _looks_like_call(text: str) -> str:
    """Whether a bare `{...` or `[{...` is a call object's start: "yes", "no" or "maybe" (not enough text)."""
    index = 0
    if text[0] == "[":
        index = _skip_space(text, 1)
        if index == len(text):
            return "maybe"
        if text[index] != "{":
            return "no"
    index = _skip_space(text, index + 1)
    if index == len(text):
        return "maybe"
    if text[index] != '"':
        return "no"
    close = text.find('"', index + 1)
    if close == -1:
        key = text[index + 1 :]
        return "maybe" if any(k.startswith(key) for k in _CALL_KEYS) else "no"
    return "yes" if text[index + 1 : close] in _CALL_KEYS else "no"


_PAIRS = {"}": "{", "]": "["}


def _json_end(text: str, start: int) -> int | None:
    """The end of the JSON object or array that starts at `start`: None while incomplete, -1 if brackets
    do not match (so it cannot be JSON)."""
    stack: list[str] = []
    in_string = escaped = False
    for index in range(start, len(text)):
        char = text[index]
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "{[":
            stack.append(char)
        elif char in "}]":
            if not stack or stack.pop() != _PAIRS[char]:
                return -1
            if not stack:
                return index + 1
    return None


# --- the OpenAI wire shape -------------------------------------------------------------------------------


def openai_tool_call(call: ToolCall, index: int | None = None) -> dict[str, Any]:
    """A call as OpenAI writes it: an id, and the arguments as a JSON string."""
    result: dict[str, Any] = {} if index is None else {"index": index}
    result.update(
        id=call.id or f"call_{uuid.uuid4().hex[:24]}",
        type="function",
        function={"name": call.function.name, "arguments": json.dumps(call.function.arguments, ensure_ascii=False)},
    )
    return result


def from_openai_message(message: Mapping[str, Any], names_by_id: dict[str, str]) -> dict[str, Any]:
    """The tool fields of an OpenAI message in native form: an assistant's tool_calls (arguments parsed),
    a tool message's tool_call_id and the function name (looked up by id when the message has none)."""
    fields: dict[str, Any] = {}
    role = message.get("role")
    if role == "assistant" and message.get("tool_calls"):
        calls = []
        for call in message["tool_calls"]:
            function = call.get("function") if isinstance(call, Mapping) else None
            if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
                raise InvalidRequestError("each tool call must be {'type': 'function', 'function': {'name', ...}}")
            arguments = function.get("arguments") or {}
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments) if arguments.strip() else {}
                except ValueError:
                    raise InvalidRequestError(
                        f"the arguments of the call of {function['name']} are not valid JSON"
                    ) from None
            entry: dict[str, Any] = {"function": {"name": function["name"], "arguments": arguments}}
            if isinstance(call.get("id"), str):
                entry["id"] = call["id"]
                names_by_id[call["id"]] = function["name"]
            calls.append(entry)
        fields["tool_calls"] = calls
    elif role == "tool":
        call_id = message.get("tool_call_id")
        name = message.get("name") or names_by_id.get(call_id or "")
        if name:
            fields["tool_name"] = name
        if isinstance(call_id, str):
            fields["tool_call_id"] = call_id
    return fields
