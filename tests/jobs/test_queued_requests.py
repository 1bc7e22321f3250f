"""Reading queued messages into native requests: formats, request ids, priorities, errors that say what to do."""

from __future__ import annotations

import json

import pytest

from ember.config import Settings
from ember.jobs.queued_requests import MalformedMessageError, ember_priority, parse_queued_request
from ember.types import ChatRequest, GenerateRequest


def _parse(body: object, **properties: object):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_queued_request(data, settings=Settings(), default_model="smollm2", **properties)


def test_a_native_prompt_with_options() -> None:
    item = _parse({"request_id": "r1", "model": "m", "prompt": "Hi", "options": {"num_predict": 5}, "stream": True})
    assert isinstance(item.request, GenerateRequest) and item.request.prompt == "Hi"
    assert (item.request_id, item.api, item.stream, item.request.model) == ("r1", "ollama", True, "m")
    assert item.request.options == {"num_predict": 5}


def test_native_messages_and_the_workers_default_model() -> None:
    item = _parse({"request_id": 7, "messages": [{"role": "user", "content": "Hi"}], "format": "json"})
    assert isinstance(item.request, ChatRequest) and item.request.model == "smollm2"
    assert (item.request_id, item.stream, item.request.format) == ("7", False, "json")


def test_an_openai_body_is_translated_and_answered_as_openai() -> None:
    body = {"model": "m", "messages": [{"role": "developer", "content": "Be brief"}], "max_tokens": 9, "temperature": 0}
    item = _parse(body, message_id="m-1")
    assert item.api == "openai" and item.request_id == "m-1"
    assert isinstance(item.request, ChatRequest) and item.request.messages[0].role == "system"
    assert item.request.options == {"num_predict": 9, "temperature": 0}
    plain = {"messages": [{"role": "user", "content": "Hi"}]}
    assert _parse(plain, correlation_id="c", message_type="openai").api == "openai"  # asked for by the type
    assert _parse(plain, correlation_id="c").api == "ollama"


def test_amqp_priorities_map_to_embers_classes_and_a_body_priority_wins() -> None:
    assert [ember_priority(p) for p in (None, 0, 1, 4, 5, 9)] == ["low", "low", "normal", "normal", "high", "high"]
    assert _parse({"request_id": "a", "prompt": "x"}, amqp_priority=7).priority == "high"
    assert _parse({"request_id": "a", "prompt": "x", "priority": "normal"}, amqp_priority=0).priority == "normal"


@pytest.mark.parametrize(
    ("body", "properties", "says"),
    [
        (b"\xff\xfe", {}, "not JSON"),
        ([1, 2], {}, "JSON object"),
        ({"prompt": "x"}, {}, "no request_id"),
        ({"request_id": "has space", "prompt": "x"}, {}, "printable"),
        ({"request_id": "a"}, {}, "give a prompt"),
        ({"request_id": "a", "prompt": "x", "messages": []}, {}, "not both"),
        ({"request_id": "a", "prompt": "x", "options": {"num_predict": 10**9}}, {}, "limit"),
        ({"request_id": "a", "prompt": "x", "bogus": 1}, {}, "bogus"),
        ({"request_id": "a", "prompt": "x", "stream": "yes"}, {}, "stream"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 2}, {"message_id": "m"}, "n must be 1"),
    ],
)
def test_malformed_messages_are_refused_with_a_reason(body: object, properties: dict, says: str) -> None:
    with pytest.raises(MalformedMessageError, match=says):
        _parse(body, **properties)
