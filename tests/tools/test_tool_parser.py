"""The tool-call parser on its own: each format, any split of the stream, and text that must pass unchanged."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ember.chat_template import CHATML_TEMPLATE
from ember.errors import InvalidRequestError
from ember.tools import ToolCallParser, ToolPlan, template_uses_tools

NAMES = ["get_weather", "add"]
WEATHER = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
CALL = ("call", "get_weather", {"city": "Paris", "unit": "celsius"})
ROME = ("call", "get_weather", {"city": "Rome", "unit": "celsius"})
ADD = ("call", "add", {"a": 1, "b": 2})
OPENAI_SHAPE = {"type": "function", "function": {"name": "get_weather", "arguments": json.dumps(WEATHER["arguments"])}}


def parse(pieces: list[str], names: list[str] = NAMES) -> list[tuple[Any, ...]]:
    """The parser's output for text fed in these pieces: text runs merged, calls in order."""
    parser = ToolCallParser(names)
    items: list[tuple[Any, ...]] = []
    results = [parser.feed(piece) for piece in pieces] + [parser.finish()]
    for item in (item for result in results for item in result.items):
        if not isinstance(item, str):
            items.append(("call", item.function.name, item.function.arguments))
        elif items and items[-1][0] == "text":
            items[-1] = ("text", items[-1][1] + item)
        else:
            items.append(("text", item))
    return items


def splits(text: str) -> list[list[str]]:
    """The text whole, one character at a time, and split in two at every point."""
    return [[text], list(text)] + [[text[:i], text[i:]] for i in range(1, len(text))]


def assert_any_split(text: str, expected: list[tuple[Any, ...]], names: list[str] = NAMES) -> None:
    for pieces in splits(text):
        assert parse(pieces, names) == expected, pieces


HERMES = f"<tool_call>\n{json.dumps(WEATHER)}\n</tool_call>"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (HERMES, [CALL]),
        ("Let me look.\n" + HERMES, [("text", "Let me look."), CALL]),
        (HERMES + "\nDone.", [CALL, ("text", "Done.")]),
        (f"<tool_call>{json.dumps(WEATHER)}", [CALL]),  # the closing tag missing at the end
        (HERMES + "\n" + HERMES.replace("Paris", "Rome"), [CALL, ROME]),
        ('<tool_call>{"name": "add"}</tool_call>', [("call", "add", {})]),
        # Llama 3.x: a bare object, "parameters" or "arguments", alone or in a list
        ('{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}', [CALL]),
        (json.dumps([WEATHER, {"name": "add", "arguments": {"a": 1, "b": 2}}]), [CALL, ADD]),
        # OpenAI's shape, arguments as a JSON string
        (json.dumps(OPENAI_SHAPE), [CALL]),
        # Mistral, both generations
        ("[TOOL_CALLS]" + json.dumps([WEATHER]), [CALL]),
        ('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "celsius"}', [CALL]),
        # FireFunction, Llama 3.1's python tag
        ("functools" + json.dumps([WEATHER]), [CALL]),
        ("<|python_tag|>" + json.dumps(WEATHER), [CALL]),
        # braces inside strings do not confuse the scan
        (
            '<tool_call>{"name": "add", "arguments": {"a": "}{][\\"", "b": 2}}</tool_call>',
            [("call", "add", {"a": '}{]["', "b": 2})],
        ),
    ],
)
def test_each_format_gives_the_same_calls_however_split(text: str, expected: list[tuple[Any, ...]]) -> None:
    assert_any_split(text, expected)


PLAIN_TEXTS = [
    "The sky is blue because of Rayleigh scattering.",
    'Use a dict like {"a": 1} or a list [1, 2, 3].',
    'function f() { return "name"; }  // functional, funct',
    "x < y and <b>bold</b> and <tool_call without its bracket",
    "[TOOL_CALLS] alone, then [TOOL_CALLS]nothing[ARG",
    "ends with whitespace   \n\n",
    "  starts with whitespace, and ünïcödé ✓",
    '{"name": "Alice", "age": 3}',  # a JSON object, but not a call of a given tool
    '{"name": "get_weather"}',  # a bare object needs its arguments to count
    "functools",
    "ends inside a marker <tool_",
    "",
]


@pytest.mark.parametrize("text", PLAIN_TEXTS)
def test_text_without_calls_passes_unchanged(text: str) -> None:
    assert_any_split(text, [("text", text)] if text else [])


@pytest.mark.parametrize(
    "text",
    [
        '<tool_call>{"name": "launch_missiles", "arguments": {}}</tool_call>',  # unknown tool
        '{"name": "rm_rf", "arguments": {"path": "/"}}',
        "[TOOL_CALLS]" + json.dumps([{"name": "unknown", "arguments": {}}]),
        '<tool_call>{"name": "get_weather", "arguments": {city: Paris}}</tool_call>',  # malformed JSON
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Pa',  # cut off
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"]]</tool_call>',  # brackets do not match
        '<tool_call>{"name": "get_weather", "arguments": "not json"}</tool_call>',
        '<tool_call>"just a string"</tool_call>',
    ],
)
def test_unknown_names_and_malformed_json_stay_text(text: str) -> None:
    assert_any_split(text, [("text", text)])


def test_only_known_calls_of_a_list_count() -> None:
    text = json.dumps([{"name": "unknown", "arguments": {}}, WEATHER])
    assert_any_split(text, [CALL])


def test_plain_text_is_not_held_back_longer_than_needed() -> None:
    parser = ToolCallParser(NAMES)
    assert parser.feed("Hello world").text == "Hello world"
    assert parser.feed(", how").text == ", how"
    assert parser.feed(" are you? ").text == " are you?"  # trailing whitespace waits: a call may follow
    assert parser.feed("Fine").text == " Fine"
    assert parser.feed(' {"a": 1').text == ' {"a": 1'  # not a call's first key: released at once
    assert parser.feed("} [1, 2").text == "} [1, 2"
    assert parser.feed("] func").text == "]"  # could become "functools"
    assert parser.feed("tion <").text == " function"
    assert parser.feed("b>").text == " <b>"
    assert parser.feed(' {"na').text == ""  # could be {"name": ...
    assert parser.feed('me": "Bob", "age": 1}').text == ' {"name": "Bob", "age": 1}'
    assert parser.finish().text == ""


def test_a_call_is_released_as_soon_as_it_is_complete() -> None:
    parser = ToolCallParser(NAMES)
    assert parser.feed("<tool_call>\n" + json.dumps(WEATHER)[:-1]).calls == []
    result = parser.feed("}\n</tool_call>")
    assert [call.function.name for call in result.calls] == ["get_weather"] and result.text == ""
    assert parser.feed("\n").text == "" and parser.finish().text == ""
    assert len(parser.calls) == 1


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                "<tool_call>",
                "</tool_call>",
                "[TOOL_CALLS]",
                "functools",
                "{",
                "}",
                "[",
                "]",
                '"',
                '"name"',
                ": ",
                '"add"',
                '"arguments"',
                ", ",
                "{}",
                " ",
                "\n",
                "a",
                "\\",
                "<",
                "[ARGS]",
            ]
        ),
        max_size=14,
    ),
    st.data(),
)
def test_any_text_splits_alike_and_without_tools_passes_unchanged(parts: list[str], data: st.DataObject) -> None:
    text = "".join(parts)
    cuts = sorted(data.draw(st.sets(st.integers(0, len(text)), max_size=4)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    assert parse(pieces, []) == ([("text", text)] if text else [])
    assert parse(pieces, ["add"]) == parse([text], ["add"])


# --- the plan: how tools are offered and forced ----------------------------------------------------------

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
            },
        },
    },
]
NATIVE = "{% if tools %}{{ tools | tojson }}{% endif %}{% for m in messages %}{{ m.content }}{% endfor %}"
PLAIN = "{% for m in messages %}{{ m.content }}{% endfor %}"


def test_templates_that_read_tools_are_recognised() -> None:
    assert template_uses_tools(NATIVE) and not template_uses_tools(PLAIN)
    assert not template_uses_tools("{{ 'tools' }}")


def test_the_choice_none_offers_nothing_and_named_choices_must_exist() -> None:
    plan = ToolPlan.for_request(TOOLS, "none", NATIVE)
    assert plan.template_tools() is None and plan.parser() is None and plan.grammar() is None
    with pytest.raises(InvalidRequestError, match="not among the tools"):
        ToolPlan.for_request(TOOLS, {"type": "function", "function": {"name": "nope"}}, NATIVE)
    with pytest.raises(InvalidRequestError, match="gives no tools"):
        ToolPlan.for_request(None, "required", NATIVE)
    with pytest.raises(InvalidRequestError, match="tool_choice"):
        ToolPlan.for_request(TOOLS, "sometimes", NATIVE)
    with pytest.raises(InvalidRequestError, match="name"):
        ToolPlan.for_request([{"type": "function", "function": {}}], None, NATIVE)


def test_forcing_grammars_wrap_the_call_in_the_format_the_model_was_shown() -> None:
    hermes = ToolPlan.for_request(TOOLS, {"type": "function", "function": {"name": "add"}}, PLAIN).grammar()
    assert hermes is not None and hermes.startswith('root ::= "<tool_call>\\n" tool-call-json "\\n</tool_call>"')
    assert '"\\"add\\""' in hermes and "get_weather" not in hermes
    bare = ToolPlan.for_request(TOOLS, "required", NATIVE).grammar()
    assert bare is not None and "<tool_call>" not in bare and "get_weather" in bare and '"\\"add\\""' in bare
    assert ToolPlan.for_request(TOOLS, "auto", NATIVE).grammar() is None


# --- rendering: tools and tool turns reach the template ---------------------------------------------------

QWEN_LIKE = """{%- if tools %}<|im_start|>system
<tools>{% for tool in tools %}
{{ tool | tojson }}{% endfor %}
</tools><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls %}<|im_start|>assistant
{% for tool_call in message.tool_calls %}{% if tool_call.function is defined %}{% set tool_call = tool_call.function %}\
{% endif %}<tool_call>
{"name": "{{ tool_call.name }}", "arguments": {{ tool_call.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% elif message.role == "tool" %}<|im_start|>user
<tool_response name="{{ message.name }}" id="{{ message.tool_call_id }}">
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}{% endfor %}<|im_start|>assistant
"""
HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"id": "call_1", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
    },
    {"role": "tool", "tool_name": "get_weather", "tool_call_id": "call_1", "content": "21 C, sunny"},
]


def render(template: str, tool_choice: Any = None) -> str:
    from ember.chat_template import ChatTemplate
    from ember.types import to_messages

    plan = ToolPlan.for_request(TOOLS, tool_choice, template)
    conversation = plan.conversation(to_messages(HISTORY))
    return ChatTemplate(template).render([m.template_view() for m in conversation], tools=plan.template_tools())


def test_a_template_with_tool_support_gets_the_tools_calls_and_results() -> None:
    text = render(QWEN_LIKE)
    assert json.dumps(TOOLS[0]) in text and json.dumps(TOOLS[1]) in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert '<tool_response name="get_weather" id="call_1">\n21 C, sunny\n</tool_response>' in text
    assert "<tools>" not in render(QWEN_LIKE, "none")


def test_a_template_without_tools_gets_a_preamble_and_the_history_as_text() -> None:
    text = render(CHATML_TEMPLATE)
    system, rest = text.split("<|im_end|>\n", 1)
    assert system.startswith("<|im_start|>system\n") and json.dumps(TOOLS[0]["function"]) in system
    assert "<tool_call>" in system  # the reply format is explained
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
        in rest
    )
    assert "<|im_start|>user\n<tool_response>\n21 C, sunny\n</tool_response>" in rest
    assert "<|im_start|>tool" not in rest
    offered_nothing = render(CHATML_TEMPLATE, "none")
    assert "<tools>" not in offered_nothing and "<tool_response>" in offered_nothing
