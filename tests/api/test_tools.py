"""Tool calling through a real server with the real `openai` and `ollama` clients.

The 135M model is weak: these tests check structure (a call of a given tool, arguments that follow its schema,
the finish reasons, a follow-up turn that answers), not whether it chose well.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import ollama
import openai
import pytest

from tests.server import running_server

GREEDY = {"temperature": 0, "repeat_penalty": 1.0}  # Ollama options
OAI = {"temperature": 0, "seed": 1}
WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "description": "The city, e.g. Paris"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city"],
    "additionalProperties": False,
}
ADD_PARAMETERS = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    "required": ["a", "b"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city",
            "parameters": WEATHER_PARAMETERS,
        },
    },
    {"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": ADD_PARAMETERS}},
]
SCHEMAS = {"get_weather": WEATHER_PARAMETERS, "add": ADD_PARAMETERS}
QUESTION = [{"role": "user", "content": "What is the weather like in Paris today?"}]
FORCE_WEATHER = {"type": "function", "function": {"name": "get_weather"}}


def follows(schema: dict[str, Any], value: Any) -> bool:
    """Enough of JSON schema for the parameters above."""
    if schema.get("type") == "object":
        if not isinstance(value, dict) or any(key not in value for key in schema.get("required", [])):
            return False
        properties = schema.get("properties", {})
        if schema.get("additionalProperties") is False and any(key not in properties for key in value):
            return False
        return all(follows(properties[key], item) for key, item in value.items() if key in properties)
    if "enum" in schema and value not in schema["enum"]:
        return False
    kinds = {"string": str, "integer": int, "number": (int, float), "boolean": bool}
    return schema.get("type") not in kinds or isinstance(value, kinds[schema["type"]])


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    with running_server(num_parallel=2) as url:
        yield url


@pytest.fixture(scope="module")
def oai(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key="unused")


def test_openai_named_tool_choice_returns_a_call_with_schema_valid_arguments(oai: openai.OpenAI) -> None:
    answer = oai.chat.completions.create(
        model="smollm2", messages=QUESTION, tools=TOOLS, tool_choice=FORCE_WEATHER, max_tokens=80, **OAI
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert follows(WEATHER_PARAMETERS, json.loads(call.function.arguments))


def test_openai_named_tool_choice_streamed(oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model="smollm2",
        messages=QUESTION,
        tools=TOOLS,
        tool_choice=FORCE_WEATHER,
        parallel_tool_calls=False,  # accepted, ignored
        max_tokens=80,
        stream=True,
        **OAI,
    )
    calls: dict[int, dict[str, str]] = {}
    content, reasons = "", []
    for chunk in stream:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for part in delta.tool_calls or ():
            entry = calls.setdefault(part.index, {"id": "", "name": "", "arguments": ""})
            entry["id"] += part.id or ""
            entry["name"] += part.function.name or ""
            entry["arguments"] += part.function.arguments or ""
        if chunk.choices[0].finish_reason:
            reasons.append(chunk.choices[0].finish_reason)
    assert reasons == ["tool_calls"] and content == ""  # nothing of the call leaks as text
    assert list(calls) == [0] and calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    assert follows(WEATHER_PARAMETERS, json.loads(calls[0]["arguments"]))


def test_openai_tool_choice_required_calls_one_of_the_tools(oai: openai.OpenAI) -> None:
    answer = oai.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "What is 2 plus 3?"}],
        tools=TOOLS,
        tool_choice="required",
        max_tokens=80,
        **OAI,
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.function.name in SCHEMAS
        assert follows(SCHEMAS[call.function.name], json.loads(call.function.arguments))


def test_openai_tool_choice_none_answers_in_text(oai: openai.OpenAI) -> None:
    answer = oai.chat.completions.create(
        model="smollm2", messages=QUESTION, tools=TOOLS, tool_choice="none", max_tokens=24, **OAI
    )
    choice = answer.choices[0]
    assert choice.message.tool_calls is None and choice.message.content
    assert choice.finish_reason in ("stop", "length")


def test_openai_follow_up_with_the_tool_result_answers(oai: openai.OpenAI) -> None:
    first = oai.chat.completions.create(
        model="smollm2", messages=QUESTION, tools=TOOLS, tool_choice=FORCE_WEATHER, max_tokens=80, **OAI
    )
    call = first.choices[0].message.tool_calls[0]
    messages = [
        *QUESTION,
        first.choices[0].message.model_dump(exclude_none=True),  # as a client sends it back: content None
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "sunny"})},
    ]
    answer = oai.chat.completions.create(model="smollm2", messages=messages, tools=TOOLS, max_tokens=40, **OAI)
    choice = answer.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    assert choice.message.content or choice.message.tool_calls
    assert answer.usage.prompt_tokens > first.usage.prompt_tokens  # the call and its result were rendered


def test_openai_rejects_bad_tool_requests(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="not among the tools"):
        oai.chat.completions.create(
            model="smollm2",
            messages=QUESTION,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "nope"}},
        )
    with pytest.raises(openai.BadRequestError, match="name"):
        oai.chat.completions.create(model="smollm2", messages=QUESTION, tools=[{"type": "function", "function": {}}])


def call_format(name: str) -> dict[str, Any]:
    """A JSON schema for `format` that makes the answer a call of one tool, in the bare-JSON form."""
    return {
        "type": "object",
        "properties": {"name": {"const": name}, "arguments": SCHEMAS[name]},
        "required": ["name", "arguments"],
    }


def test_ollama_chat_with_tools_and_a_forcing_format(base: str) -> None:
    client = ollama.Client(host=base)
    options = {**GREEDY, "num_predict": 80}
    answer = client.chat(
        model="smollm2", messages=QUESTION, tools=TOOLS, format=call_format("get_weather"), options=options
    )
    assert answer.done_reason == "stop" and answer.message.content == ""
    (call,) = answer.message.tool_calls
    assert call.function.name == "get_weather" and follows(WEATHER_PARAMETERS, dict(call.function.arguments))

    parts = list(
        client.chat(
            model="smollm2",
            messages=QUESTION,
            tools=TOOLS,
            format=call_format("get_weather"),
            options=options,
            stream=True,
        )
    )
    streamed = [call for part in parts for call in part.message.tool_calls or ()]
    assert [(c.function.name, c.function.arguments) for c in streamed] == [("get_weather", call.function.arguments)]
    assert "".join(part.message.content or "" for part in parts) == "" and parts[-1].done


def test_ollama_tool_choice_extension_and_follow_up(base: str) -> None:
    response = httpx.post(
        base + "/api/chat",
        json={
            "model": "smollm2",
            "messages": QUESTION,
            "tools": TOOLS,
            "tool_choice": FORCE_WEATHER,
            "stream": False,
            "options": {**GREEDY, "num_predict": 80},
        },
        timeout=120,
    )
    assert response.status_code == 200, response.text
    message = response.json()["message"]
    (call,) = message["tool_calls"]
    assert call["function"]["name"] == "get_weather" and follows(WEATHER_PARAMETERS, call["function"]["arguments"])

    client = ollama.Client(host=base)
    messages = [
        *QUESTION,
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_name": "get_weather", "content": "21 degrees celsius and sunny"},
    ]
    answer = client.chat(model="smollm2", messages=messages, tools=TOOLS, options={**GREEDY, "num_predict": 40})
    assert answer.done and (answer.message.content or answer.message.tool_calls)
