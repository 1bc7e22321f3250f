"""One OpenAI body read as its route reads it (batch lines, queued messages): requests, caps, response shape.

The answers here are written by hand: what is under test is the translation and the shaping around the model,
which the batch and worker tests run end to end with the real model.
"""

from __future__ import annotations

import pytest

from ember.api.openai_calls import native_call
from ember.config import Settings
from ember.errors import InvalidRequestError
from ember.types import ChatResponse, GenerateResponse, Message

CHAT = "/v1/chat/completions"


def test_a_chat_body_becomes_one_request_with_its_choices_and_the_routes_answer() -> None:
    body = {"model": "smollm2", "messages": [{"role": "developer", "content": "Hi"}], "n": 2, "seed": 3}
    call = native_call(CHAT, body | {"max_tokens": 5, "typical_p": 0.5}, Settings())
    # n = 2: one request whose two completions share its prefill (the engine seeds choice i with seed + i)
    assert call.kind == "chat" and len(call.requests) == 1 and call.choices == 2 and call.answers == 2
    assert call.requests[0].options["seed"] == 3
    assert call.requests[0].messages[0].role == "system" and call.requests[0].options["typical_p"] == 0.5
    answers = [
        ChatResponse(model="smollm2", message=Message(role="assistant", content=text), done=True, done_reason=why)
        for text, why in (("Hello", "stop"), ("Hel", "length"))
    ]
    reply = call.body(answers)
    assert reply["object"] == "chat.completion" and reply["id"].startswith("chatcmpl-")
    assert [c["message"]["content"] for c in reply["choices"]] == ["Hello", "Hel"]
    assert [c["finish_reason"] for c in reply["choices"]] == ["stop", "length"]


def test_a_completions_body_with_prompts_and_echo() -> None:
    body = {"model": "smollm2", "prompt": ["a", "b"], "echo": True, "n": 2}
    call = native_call("/v1/completions", body, Settings())
    assert call.kind == "generate" and [r.prompt for r in call.requests] == ["a", "b"] and call.answers == 4
    answers = [GenerateResponse(model="smollm2", response=text, done=True, done_reason="stop") for text in "!?.,"]
    assert [c["text"] for c in call.body(answers)["choices"]] == ["a!", "a?", "b.", "b,"]  # n choices per prompt


def test_bad_bodies_and_caps_are_refused_as_the_route_refuses_them() -> None:
    settings = Settings(max_num_predict=100, max_n=2)
    messages = [{"role": "user", "content": "Hi"}]
    with pytest.raises(InvalidRequestError, match="EMBER_MAX_NUM_PREDICT"):
        native_call(CHAT, {"model": "m", "messages": messages, "max_tokens": 101}, settings)
    with pytest.raises(InvalidRequestError, match="from 1 to 2"):
        native_call(CHAT, {"model": "m", "messages": messages, "n": 3}, settings)
    with pytest.raises(InvalidRequestError, match="messages"):
        native_call(CHAT, {"model": "m", "messages": []}, settings)
    with pytest.raises(InvalidRequestError, match="mirostat"):
        native_call(CHAT, {"model": "m", "messages": messages, "mirostat": 7}, settings)
    with pytest.raises(InvalidRequestError, match="/v1/embeddings"):
        native_call("/v1/responses", {"model": "m"}, settings)
