"""The Anthropic Messages API through the real `anthropic` SDK: messages, streaming, tool use, counting."""

from __future__ import annotations

from collections.abc import Iterator

import anthropic
import httpx
import pytest

from tests.server import running_server

GREEDY = {"extra_body": {"temperature": 0}}  # this SDK sends no sampling fields of its own
QUESTION = [{"role": "user", "content": "Which city is the capital of France? Answer in one word."}]
WEATHER = {
    "name": "get_weather",
    "description": "Get the current weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string", "description": "The city, e.g. Paris"}},
        "required": ["city"],
    },
}


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    with running_server(num_parallel=2) as url:
        yield url


@pytest.fixture(scope="module")
def claude(base: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=base, api_key="unused")


def test_a_message_whole_and_streamed(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(
        model="smollm2", max_tokens=16, system="You are terse.", messages=QUESTION, **GREEDY
    )
    assert message.type == "message" and message.role == "assistant" and message.model == "smollm2"
    assert [block.type for block in message.content] == ["text"] and message.content[0].text.strip()
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert message.usage.input_tokens > 10 and 0 < message.usage.output_tokens <= 16

    with claude.messages.stream(
        model="smollm2", max_tokens=16, system="You are terse.", messages=QUESTION, **GREEDY
    ) as stream:
        events = list(stream)
        final = stream.get_final_message()
    kinds = [event.type for event in events]
    assert kinds[0] == "message_start" and "content_block_start" in kinds and "content_block_delta" in kinds
    assert kinds.index("content_block_stop") > kinds.index("content_block_delta")
    assert "message_delta" in kinds and "message_stop" in kinds
    assert final.content[0].text == message.content[0].text  # the same answer, streamed
    assert final.stop_reason == message.stop_reason and final.usage.output_tokens == message.usage.output_tokens


def test_max_tokens_and_stop_sequences(claude: anthropic.Anthropic) -> None:
    counting = [{"role": "user", "content": "Count from 1 to 20, separated by commas."}]
    short = claude.messages.create(model="smollm2", max_tokens=3, messages=counting, **GREEDY)
    assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 3
    stopped = claude.messages.create(model="smollm2", max_tokens=60, messages=counting, stop_sequences=["5"], **GREEDY)
    text = stopped.content[0].text if stopped.content else ""
    assert "5" not in text and stopped.usage.output_tokens < 60
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == "5"
    with claude.messages.stream(
        model="smollm2", max_tokens=60, messages=counting, stop_sequences=["5"], **GREEDY
    ) as stream:
        streamed = stream.get_final_message()
    assert streamed.stop_reason == "stop_sequence" and streamed.stop_sequence == "5"


def test_tool_use_and_the_tool_result_turn(claude: anthropic.Anthropic) -> None:
    question = [{"role": "user", "content": "What is the weather like in Paris today?"}]
    forced = {"type": "tool", "name": "get_weather"}
    message = claude.messages.create(
        model="smollm2", max_tokens=80, messages=question, tools=[WEATHER], tool_choice=forced, **GREEDY
    )
    assert message.stop_reason == "tool_use"
    call = next(block for block in message.content if block.type == "tool_use")
    assert call.name == "get_weather" and isinstance(call.input["city"], str) and call.id

    with claude.messages.stream(
        model="smollm2", max_tokens=80, messages=question, tools=[WEATHER], tool_choice=forced, **GREEDY
    ) as stream:
        streamed = stream.get_final_message()
    streamed_call = next(block for block in streamed.content if block.type == "tool_use")
    assert streamed_call.name == call.name and streamed_call.input == call.input  # input_json_delta, parsed
    assert streamed.stop_reason == "tool_use"

    follow_up = [
        *question,
        {"role": "assistant", "content": [block.model_dump() for block in message.content]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "Sunny, 24 degrees Celsius."}],
        },
    ]
    answer = claude.messages.create(model="smollm2", max_tokens=40, messages=follow_up, tools=[WEATHER], **GREEDY)
    assert answer.stop_reason in ("end_turn", "max_tokens", "tool_use") and answer.content


def test_count_tokens_matches_what_a_request_uses(claude: anthropic.Anthropic) -> None:
    counted = claude.messages.count_tokens(model="smollm2", system="You are terse.", messages=QUESTION)
    used = claude.messages.create(model="smollm2", max_tokens=1, system="You are terse.", messages=QUESTION)
    assert counted.input_tokens == used.usage.input_tokens > 10
    with_tools = claude.messages.count_tokens(model="smollm2", messages=QUESTION, tools=[WEATHER])
    assert with_tools.input_tokens > counted.input_tokens  # the tools are part of the prompt


def test_count_tokens_without_a_model_is_a_400(base: str) -> None:
    response = httpx.post(base + "/v1/messages/count_tokens", json={"model": "", "messages": QUESTION})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_errors_have_anthropics_shape(claude: anthropic.Anthropic, base: str) -> None:
    with pytest.raises(anthropic.NotFoundError) as missing:
        claude.messages.create(model="no-such-model", max_tokens=8, messages=QUESTION)
    assert missing.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.create(model="smollm2", max_tokens=0, messages=QUESTION)
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    with pytest.raises(anthropic.BadRequestError, match="image"):
        claude.messages.create(model="smollm2", max_tokens=8, messages=[{"role": "user", "content": [image]}])
    raw = httpx.post(base + "/v1/messages", json={"model": "smollm2", "messages": QUESTION})  # no max_tokens
    assert raw.status_code == 400 and raw.json()["type"] == "error"
    assert raw.json()["error"]["type"] == "invalid_request_error" and "max_tokens" in raw.json()["error"]["message"]
