"""OpenAI's Responses and Conversations APIs with the real `openai` SDK against a real server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.server import running_server

SHORT = {"max_output_tokens": 12, "temperature": 0}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    home: Path = tmp_path_factory.mktemp("responses-home")
    with running_server(home=home, num_parallel=4) as url:
        yield url


@pytest.fixture(scope="module")
def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key="unused")


def streamed(client: openai.OpenAI, **request: object) -> tuple[list[str], openai.types.responses.Response, str]:
    """A streamed response: the event types, the final response, and the text of the deltas."""
    kinds, deltas, final = [], [], None
    for event in client.responses.create(stream=True, **request):
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
        if event.type in ("response.completed", "response.incomplete"):
            final = event.response
    assert final is not None, kinds
    return kinds, final, "".join(deltas)


def test_a_three_turn_chain_by_previous_response_id(client: openai.OpenAI) -> None:
    first = client.responses.create(
        model="smollm2", input="My name is Zed. Reply with one word.", instructions="Be brief.", **SHORT
    )
    assert first.id.startswith("resp_") and first.status in ("completed", "incomplete") and first.output_text
    assert first.output[0].type == "message" and first.output[0].role == "assistant"
    assert first.usage.input_tokens > 0 and first.usage.output_tokens > 0

    kinds, second, text = streamed(
        client, model="smollm2", input="What is my name?", previous_response_id=first.id, **SHORT
    )
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert "response.output_text.delta" in kinds and kinds[-4:-1] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ]
    assert text == second.output_text and second.previous_response_id == first.id
    assert second.usage.input_tokens > first.usage.input_tokens  # the first turn is in its prompt

    third = client.responses.create(
        model="smollm2", input="Say my name again.", previous_response_id=second.id, **SHORT
    )
    assert third.usage.input_tokens > second.usage.input_tokens
    items = client.responses.input_items.list(third.id)
    assert [item.type for item in items.data] == ["message"] and items.data[0].content[0].text == "Say my name again."

    fetched = client.responses.retrieve(second.id)
    assert fetched.id == second.id and fetched.output_text == second.output_text
    client.responses.delete(second.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(second.id)
    branch = client.responses.create(model="smollm2", input="Who am I?", previous_response_id=first.id, **SHORT)
    assert branch.usage.input_tokens < third.usage.input_tokens  # a branch from the first turn


def test_store_false_is_answered_but_not_kept(client: openai.OpenAI) -> None:
    answer = client.responses.create(model="smollm2", input="Say hello.", store=False, **SHORT)
    assert answer.output_text
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(answer.id)


def test_a_conversation_and_its_items(client: openai.OpenAI, base: str) -> None:
    conversation = client.conversations.create(
        items=[{"type": "message", "role": "user", "content": "My favourite fruit is the mango."}],
        metadata={"topic": "fruit"},
    )
    assert conversation.id.startswith("conv_") and conversation.metadata == {"topic": "fruit"}
    response = client.responses.create(
        model="smollm2", input="What is my favourite fruit?", conversation=conversation.id, **SHORT
    )
    assert response.conversation is not None and response.conversation.id == conversation.id
    items = client.conversations.items.list(conversation.id, order="asc")
    assert [(item.type, item.role) for item in items.data] == [("message", "user")] * 2 + [("message", "assistant")]
    assert items.data[2].content[0].text == response.output_text
    newest = client.conversations.items.list(conversation.id, limit=1)
    assert newest.data[0].id == response.output[0].id and newest.has_more
    added = client.conversations.items.create(
        conversation.id, items=[{"type": "message", "role": "user", "content": "Thanks!"}]
    )
    assert added.data[0].content[0].text == "Thanks!"
    assert client.conversations.items.retrieve(added.data[0].id, conversation_id=conversation.id).id == added.data[0].id
    client.conversations.items.delete(added.data[0].id, conversation_id=conversation.id)
    assert len(client.conversations.items.list(conversation.id).data) == 3
    native = httpx.get(f"{base}/api/conversations/{conversation.id}").json()  # the same store
    assert native["conversation"]["origin"] == "responses" and len(native["messages"]) == 3
    assert client.conversations.update(conversation.id, metadata={"topic": "mango"}).metadata == {"topic": "mango"}
    assert client.conversations.delete(conversation.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.conversations.retrieve(conversation.id)


def test_function_tools_and_their_output(client: openai.OpenAI) -> None:
    tools = [
        {
            "type": "function",
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        }
    ]
    call = client.responses.create(
        model="smollm2",
        input="What is the weather in Paris?",
        tools=tools,
        tool_choice="required",
        max_output_tokens=60,
        temperature=0,
    )
    calls = [item for item in call.output if item.type == "function_call"]
    assert calls and calls[0].name == "get_weather" and "city" in json.loads(calls[0].arguments)
    answer = client.responses.create(
        model="smollm2",
        previous_response_id=call.id,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": '{"sky": "sunny"}'}],
        tools=tools,
        **SHORT,
    )
    assert answer.output_text and answer.usage.input_tokens > call.usage.input_tokens


def test_text_format_json_schema(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    answer = client.responses.create(
        model="smollm2",
        input="Invent a person. Give a name and an age.",
        text={"format": {"type": "json_schema", "name": "person", "schema": schema, "strict": True}},
        max_output_tokens=60,
        temperature=0,
    )
    person = json.loads(answer.output_text)
    assert isinstance(person["name"], str) and isinstance(person["age"], int)


def test_truncation_disabled_refuses_an_overflow_and_auto_fits(client: openai.OpenAI) -> None:
    small = {**SHORT, "extra_body": {"options": {"num_ctx": 256}}}  # ember's addition: Ollama's options
    half = "Here are some words to read. " * 20  # about 140 tokens: one fits num_ctx 256, two do not
    first = client.responses.create(model="smollm2", input=half + "Say ok.", **small)
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="smollm2", input=half + "Again.", previous_response_id=first.id, **small)
    assert "num_ctx 256" in str(refused.value) and 'truncation "auto"' in str(refused.value)
    fitted = client.responses.create(
        model="smollm2", input=half + "Again.", previous_response_id=first.id, truncation="auto", **small
    )
    assert fitted.output_text and fitted.context["dropped"] == 2  # the first turn made room
    assert fitted.usage.input_tokens + fitted.usage.output_tokens <= 256


def test_bad_requests_are_clear(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="smollm2", input="x", previous_response_id="resp_" + "0" * 24)
    with pytest.raises(openai.BadRequestError) as both:
        client.responses.create(model="smollm2", input="x", previous_response_id="resp_1", conversation="conv_1")
    assert "not both" in str(both.value)
    with pytest.raises(openai.BadRequestError) as images:
        client.responses.create(
            model="smollm2", input=[{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]
        )
    assert "text only" in str(images.value)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="no-such-model", input="x")
