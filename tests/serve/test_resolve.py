"""Resolving a native request once, before any load: caps, options, capabilities, Ollama's defaults.

The manager's own entry points are what conversations, batches and workers call, so these go through
`ModelManager.generate/chat/embed` with a fake runner factory that records whether anything was loaded.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from ember.errors import InvalidOptionError, InvalidRequestError, ModelNotFoundError
from ember.serve.manager import ModelManager
from ember.serve.resolve import Limits
from ember.store.resolve import ModelSource
from ember.types import ChatRequest, EmbedRequest, GenerateRequest, Message
from tests.gguf_files import write_tiny_gguf
from tests.serve.test_manager import FakeRunner

THINKING_TEMPLATE = (
    "{% for m in messages %}{{ m.content }}{% endfor %}{% if enable_thinking %}<think>{% endif %}"
    "{# a thinking template writes </think> after the reasoning #}"
)


@pytest.fixture
def sources(tmp_path: Path) -> dict[str, ModelSource]:
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    return {
        "plain": ModelSource(name="plain:latest", path=path),
        "thinker": ModelSource(name="thinker:latest", path=path, template=THINKING_TEMPLATE),
        "big": ModelSource(name="big:latest", path=path, parameters={"num_ctx": 1 << 18}),
    }


@pytest.fixture
def manager(sources: dict[str, ModelSource]) -> ModelManager:
    def find(name: str) -> ModelSource:
        if name.split(":")[0] not in sources:
            raise ModelNotFoundError(f"model '{name}' not found")
        return sources[name.split(":")[0]]

    FakeRunner.started, FakeRunner.stopped, FakeRunner.fail_when = [], [], None  # whatever other tests left
    return ModelManager(
        runner_factory=FakeRunner,
        resolve=find,
        devices=lambda: [],
        budget=lambda: 1 << 40,
        limits=Limits(max_num_predict=64, max_num_ctx=2048, max_n=2),
    )


async def _answer(manager: ModelManager, request: Any) -> Any:
    if isinstance(request, EmbedRequest):
        return await manager.embed(request)
    method = manager.chat if isinstance(request, ChatRequest) else manager.generate
    return [chunk async for chunk in method(request)]


async def _drain(stream: Any) -> list[Any]:
    return [item async for item in stream]


def _refused(manager: ModelManager, request: Any, kind: type[Exception] = InvalidRequestError) -> str:
    with pytest.raises(kind) as refused:
        asyncio.run(_answer(manager, request))
    assert FakeRunner.started == [], "nothing may load for a refused request"
    return str(refused.value)


def test_caps_are_enforced_on_every_entry_point_before_loading(manager: ModelManager) -> None:
    many = {"num_predict": 65}
    message = _refused(manager, GenerateRequest(model="plain", prompt="x", options=many))
    assert "num_predict=65" in message and "EMBER_MAX_NUM_PREDICT" in message
    chat = ChatRequest(model="plain", messages=[Message(role="user", content="x")], options={"num_ctx": 4096})
    assert "EMBER_MAX_NUM_CTX" in _refused(manager, chat)
    assert "EMBER_MAX_NUM_CTX" in _refused(manager, EmbedRequest(model="plain", input="x", options={"num_ctx": 4096}))
    # the operator's choices (the server's defaults, a Modelfile's PARAMETER) are not the request's to cap
    assert manager.prepare(GenerateRequest(model="big", prompt="x")).load.num_ctx == 1 << 18
    with pytest.raises(InvalidRequestError, match="from 1 to 2"):  # OpenAI's n: the manager's *_choices calls
        asyncio.run(_drain(manager.chat_choices(chat.model_copy(update={"options": None}), 3)))
    assert FakeRunner.started == []


def test_options_are_validated_before_loading(manager: ModelManager) -> None:
    assert "top_p" in _refused(
        manager, GenerateRequest(model="plain", prompt="x", options={"top_p": 7}), InvalidOptionError
    )
    assert _refused(manager, GenerateRequest(model="plain", prompt="x", priority="urgent"))
    with pytest.raises(ModelNotFoundError):
        manager.prepare(GenerateRequest(model="nothing", prompt="x"))
    assert FakeRunner.started == []


def test_thinking_is_decided_from_the_template(manager: ModelManager) -> None:
    message = _refused(manager, GenerateRequest(model="plain", prompt="x", think=True))
    assert message == '"plain" does not support thinking'  # Ollama's words
    assert _refused(manager, GenerateRequest(model="plain", prompt="x", think="high"))
    assert manager.prepare(GenerateRequest(model="plain", prompt="x", think=False)).request.think is False
    assert manager.prepare(GenerateRequest(model="plain", prompt="x")).request.think is None
    assert manager.prepare(GenerateRequest(model="thinker", prompt="x")).request.think is True  # Ollama's default
    assert manager.prepare(GenerateRequest(model="thinker", prompt="x", think="low")).request.think == "low"
    assert manager.prepare(GenerateRequest(model="thinker", prompt="x", raw=True)).request.think is None


def test_truncation_is_on_unless_turned_off_and_other_capabilities(manager: ModelManager) -> None:
    chat = ChatRequest(model="plain", messages=[Message(role="user", content="x")])
    assert manager.prepare(chat).request.truncate is True
    assert manager.prepare(chat.model_copy(update={"truncate": False})).request.truncate is False
    images = ChatRequest(model="plain", messages=[Message(role="user", content="x", images=["aGk="])])
    assert "does not support images" in _refused(manager, images)
    assert "does not support insert" in _refused(manager, GenerateRequest(model="plain", prompt="x", suffix="y"))


def test_a_valid_request_loads_and_answers(manager: ModelManager) -> None:
    async def scenario() -> list[Any]:
        try:
            return await _answer(manager, GenerateRequest(model="plain", prompt="x"))
        finally:
            await manager.close()

    chunks = asyncio.run(scenario())
    assert chunks[-1].done and FakeRunner.started and FakeRunner.started[0][0] == "plain:latest"


def test_a_requests_own_options_are_checked_before_its_model_is_known(manager: ModelManager) -> None:
    """What queued messages and batch lines are checked with as they arrive: the same caps and values."""
    limits = manager.limits
    with pytest.raises(InvalidRequestError, match="EMBER_MAX_NUM_PREDICT"):
        limits.check_options({"num_predict": 65})
    with pytest.raises(InvalidRequestError, match="EMBER_MAX_NUM_CTX"):
        limits.check_options({"num_ctx": 4096})
    with pytest.raises(InvalidOptionError, match="top_p"):
        limits.check_options({"top_p": 7})
    limits.check_options({"num_predict": 64, "num_ctx": 2048, "temperature": None})  # at the caps: taken
    limits.check_options(None)
    # whatever check_options takes, the resolve step takes too, on any model
    assert manager.prepare(GenerateRequest(model="big", prompt="x", options={"num_ctx": 2048})).load.num_ctx == 2048
