"""The model manager's logic with fake runners: loading, reloading, eviction, keep_alive, queueing, fallbacks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from ember.errors import ModelLoadError, ServerBusyError
from ember.options import LoadOptions
from ember.serve.manager import ModelManager, parse_keep_alive
from ember.serve.memory import GpuDevice
from ember.store.resolve import ModelSource
from ember.types import ChatRequest, ChatResponse, GenerateRequest, GenerateResponse
from tests.gguf_files import write_tiny_gguf


class FakeRunner:
    """Answers with a fixed number of chunks, one per `tick` seconds; can be told to fail its load."""

    started: ClassVar[list[tuple[str, LoadOptions]]] = []
    stopped: ClassVar[list[str]] = []
    fail_when: Any = None  # callable(options) -> error message or None

    def __init__(self, source: ModelSource, options: LoadOptions, tick: float = 0.01) -> None:
        self.source, self.options, self.tick = source, options, tick
        self.facts: dict[str, Any] = {}
        self._alive = False
        self.order: list[str] = []

    @property
    def alive(self) -> bool:
        return self._alive

    async def start(self) -> dict[str, Any]:
        message = FakeRunner.fail_when(self.options) if FakeRunner.fail_when else None
        if message:
            raise ModelLoadError(message)
        FakeRunner.started.append((self.source.name, self.options))
        self._alive = True
        self.facts = {"load_duration": 1000, "gpu_layers": max(self.options.num_gpu, 0)}
        return self.facts

    async def generate_choices(self, request: GenerateRequest, n: int) -> AsyncIterator[tuple[int, GenerateResponse]]:
        for _ in range(3):
            await asyncio.sleep(self.tick)
            for index in range(n):
                yield index, GenerateResponse(model=request.model, response=request.prompt)
        for index in range(n):
            yield index, GenerateResponse(model=request.model, done=True, done_reason="stop")

    async def chat_choices(self, request: ChatRequest, n: int) -> AsyncIterator[tuple[int, ChatResponse]]:
        for index in range(n):
            yield index, ChatResponse(model=request.model, done=True, done_reason="stop")

    async def stop(self, timeout: float = 5.0) -> None:
        if self._alive:
            FakeRunner.stopped.append(self.source.name)
        self._alive = False


@pytest.fixture(autouse=True)
def _reset_fakes() -> None:
    FakeRunner.started, FakeRunner.stopped, FakeRunner.fail_when = [], [], None


@pytest.fixture
def models(tmp_path: Path) -> dict[str, ModelSource]:
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    return {name: ModelSource(name=f"{name}:latest", path=path) for name in ("a", "b", "c")}


def _manager(models: dict[str, ModelSource], **kwargs: Any) -> ModelManager:
    settings: dict[str, Any] = {
        "runner_factory": FakeRunner,
        "resolve": lambda name: models[name.split(":")[0]],
        "devices": lambda: [],
        "budget": lambda: 1 << 40,
        **kwargs,
    }
    return ModelManager(**settings)


async def _ask(manager: ModelManager, model: str, prompt: str = "x", **fields: Any) -> list[GenerateResponse]:
    priority = fields.pop("priority", None)
    timeout = fields.pop("timeout", None)
    request = GenerateRequest(model=model, prompt=prompt, **fields)
    return [chunk async for chunk in manager.generate(request, priority=priority, timeout=timeout)]


def test_parse_keep_alive() -> None:
    assert parse_keep_alive(None, 300.0) == 300.0
    assert parse_keep_alive("5m", 300.0) == 300.0 and parse_keep_alive("1h30m", 1.0) == 5400.0
    assert parse_keep_alive(0, 300.0) == 0 and parse_keep_alive("0", 300.0) == 0
    assert parse_keep_alive(-1, 300.0) is None and parse_keep_alive("-1m", 300.0) is None
    assert parse_keep_alive(None, -1) is None and parse_keep_alive(None, -5.0) is None
    assert parse_keep_alive(12.5, None) == 12.5 and parse_keep_alive("250ms", None) == 0.25
    for bad in ("five minutes", "5x", "m5", True):
        with pytest.raises(Exception, match="keep_alive"):
            parse_keep_alive(bad, 1.0)


def test_load_on_first_use_and_reuse(models: dict[str, ModelSource]) -> None:
    async def scenario() -> None:
        manager = _manager(models)
        first = await _ask(manager, "a", "hi")
        assert "".join(c.response for c in first) == "hihihi" and first[-1].done
        await _ask(manager, "a", options={"temperature": 0.1, "seed": 3})  # sampling options: no reload
        assert len(FakeRunner.started) == 1
        await manager.close()

    asyncio.run(scenario())


def test_reload_only_on_a_load_option_change(models: dict[str, ModelSource]) -> None:
    async def scenario() -> None:
        manager = _manager(models)
        await _ask(manager, "a")
        await _ask(manager, "a", options={"top_k": 5})
        await _ask(manager, "a", options={"num_ctx": 1024})
        assert [opts.num_ctx for _, opts in FakeRunner.started] == [4096, 1024]
        assert FakeRunner.stopped == ["a:latest"]
        await manager.close()

    asyncio.run(scenario())


def test_keep_alive_expiry_and_zero_and_forever(models: dict[str, ModelSource]) -> None:
    async def scenario() -> None:
        manager = _manager(models)
        await _ask(manager, "a", keep_alive=0.05)
        assert "a:latest" in manager.entries and manager.ps()[0].expires_at is not None
        await asyncio.sleep(0.2)
        assert manager.entries == {}
        await _ask(manager, "b", keep_alive=0)
        assert manager.entries == {}
        await _ask(manager, "c", keep_alive=-1)
        await asyncio.sleep(0.1)
        assert "c:latest" in manager.entries and manager.ps()[0].expires_at is None
        unloaded = [c async for c in manager.generate(GenerateRequest(model="c", keep_alive=0))]
        assert unloaded[-1].done_reason == "unload" and manager.entries == {}
        loaded = [c async for c in manager.generate(GenerateRequest(model="a"))]
        assert loaded[-1].done_reason == "load" and "a:latest" in manager.entries
        await manager.close()

    asyncio.run(scenario())


def test_lru_eviction_under_a_memory_budget_and_a_model_count(models: dict[str, ModelSource]) -> None:
    async def scenario() -> None:
        manager = _manager(models, max_loaded=2)
        await _ask(manager, "a")
        await _ask(manager, "b")
        await _ask(manager, "a")  # a is now more recently used than b
        await _ask(manager, "c")
        assert set(manager.entries) == {"a:latest", "c:latest"} and FakeRunner.stopped == ["b:latest"]
        size = manager.entries["a:latest"].estimate.total()
        manager.max_loaded = 10
        manager.budget = lambda: int(size * 1.5)  # room for one model only
        await _ask(manager, "b")
        assert set(manager.entries) == {"b:latest"}
        await manager.close()

    asyncio.run(scenario())


def test_priority_order_and_aging_through_the_manager(models: dict[str, ModelSource]) -> None:
    async def scenario() -> None:
        manager = _manager(models, default_options={"num_parallel": 1})
        finished: list[str] = []

        async def ask(prompt: str, priority: str) -> None:
            await _ask(manager, "a", prompt, priority=priority)
            finished.append(prompt)

        await _ask(manager, "a")  # loaded
        first = asyncio.create_task(ask("running", "normal"))
        await asyncio.sleep(0.005)
        waiting = [
            asyncio.create_task(ask(p, level)) for p, level in (("low", "low"), ("normal", "normal"), ("high", "high"))
        ]
        await asyncio.gather(first, *waiting)
        assert finished == ["running", "high", "normal", "low"]
        await manager.close()

    asyncio.run(scenario())


def test_a_full_queue_refuses_at_once_with_retry_after(models: dict[str, ModelSource]) -> None:
    async def scenario() -> None:
        manager = _manager(models, default_options={"num_parallel": 1}, max_queued=2)
        await _ask(manager, "a")
        tasks = [asyncio.create_task(_ask(manager, "a")) for _ in range(3)]
        await asyncio.sleep(0.005)
        with pytest.raises(ServerBusyError) as caught:
            await _ask(manager, "a")
        assert caught.value.http_status == 503 and caught.value.retry_after >= 1
        assert all(len(result) == 4 for result in await asyncio.gather(*tasks))
        await manager.close()

    asyncio.run(scenario())


def test_cancellation_while_queued_frees_the_place(models: dict[str, ModelSource]) -> None:
    async def scenario() -> None:
        manager = _manager(models, default_options={"num_parallel": 1})
        await _ask(manager, "a")
        running = asyncio.create_task(_ask(manager, "a"))
        await asyncio.sleep(0.005)
        queued = asyncio.create_task(_ask(manager, "a"))
        await asyncio.sleep(0.005)
        entry = manager.entries["a:latest"]
        assert entry.queue.queued == 1
        queued.cancel()
        await asyncio.sleep(0)
        assert entry.queue.queued == 0
        await running
        assert entry.queue.in_use == 0 and entry.active == 0
        await manager.close()

    asyncio.run(scenario())


def test_a_request_timeout_while_queued(models: dict[str, ModelSource]) -> None:
    async def scenario() -> None:
        manager = _manager(models, default_options={"num_parallel": 1})
        await _ask(manager, "a")
        running = asyncio.create_task(_ask(manager, "a"))
        await asyncio.sleep(0.001)
        with pytest.raises(Exception, match="waited") as caught:
            await _ask(manager, "a", timeout=0.005)
        assert caught.value.http_status == 504
        await running
        await manager.close()

    asyncio.run(scenario())


def test_the_out_of_memory_ladder_and_what_was_chosen(models: dict[str, ModelSource]) -> None:
    big_gpu = [GpuDevice(index=0, name="Fake GPU", total=80 << 30, free=80 << 30)]

    def fail(options: LoadOptions) -> str | None:
        if options.num_gpu > 0:
            return "cudaMalloc failed: out of memory"
        if options.num_ctx > 2048:
            return "failed to allocate KV cache buffer"
        return None

    async def scenario() -> None:
        FakeRunner.fail_when = fail
        manager = _manager(models, devices=lambda: big_gpu, default_options={"num_ctx": 8192})
        await _ask(manager, "a")
        options = manager.entries["a:latest"].options
        assert options.num_gpu == 0 and options.num_ctx == 2048
        assert "num_ctx 2048" in manager.entries["a:latest"].load_note
        await manager.close()

        FakeRunner.fail_when = lambda options: "unknown model architecture: 'mamba9'"
        other = _manager(models)
        with pytest.raises(ModelLoadError, match="mamba9"):  # not a memory problem: no ladder
            await _ask(other, "b")

    asyncio.run(scenario())


def test_the_gpu_layer_plan_is_used_when_num_gpu_is_not_set(models: dict[str, ModelSource]) -> None:
    async def scenario() -> None:
        roomy = [GpuDevice(index=0, name="Fake", total=24 << 30, free=20 << 30)]
        manager = _manager(models, devices=lambda: roomy)
        await _ask(manager, "a")
        entry = manager.entries["a:latest"]
        assert entry.options.num_gpu == entry.estimate.n_layer + 1
        assert manager.ps()[0].gpu_layers == entry.estimate.n_layer + 1
        await _ask(manager, "b", options={"num_gpu": 0})
        assert manager.entries["b:latest"].options.num_gpu == 0
        await manager.close()

    asyncio.run(scenario())


def test_stop_unloads_and_ps_reports(models: dict[str, ModelSource]) -> None:
    async def scenario() -> None:
        manager = _manager(models, default_options={"num_parallel": 4})
        await _ask(manager, "a")
        rows = manager.ps()
        assert [row.name for row in rows] == ["a:latest"] and rows[0].slots == 4 and rows[0].slots_in_use == 0
        assert await manager.stop("a") is True
        assert await manager.stop("a") is False
        assert manager.ps() == []

    asyncio.run(scenario())


def test_a_dead_runner_is_replaced_on_the_next_request(models: dict[str, ModelSource]) -> None:
    async def scenario() -> None:
        manager = _manager(models)
        await _ask(manager, "a")
        manager.entries["a:latest"].runner._alive = False  # type: ignore[attr-defined]
        await _ask(manager, "a")
        assert len(FakeRunner.started) == 2
        await manager.close()

    asyncio.run(scenario())


class SlowLoadingRunner(FakeRunner):
    """A FakeRunner whose load of model "b" waits until the test lets it finish."""

    release: asyncio.Event

    async def start(self) -> dict[str, Any]:
        if self.source.name == "b:latest":
            await SlowLoadingRunner.release.wait()
        return await super().start()


def test_loading_one_model_never_blocks_requests_to_another(models: dict[str, ModelSource]) -> None:
    async def scenario() -> None:
        SlowLoadingRunner.release = asyncio.Event()
        manager = _manager(models, runner_factory=SlowLoadingRunner)
        await _ask(manager, "a")
        loading_b = asyncio.create_task(_ask(manager, "b"))
        also_b = asyncio.create_task(_ask(manager, "b"))
        await asyncio.sleep(0.05)
        assert not loading_b.done()
        answered = await asyncio.wait_for(_ask(manager, "a", "during"), 2)  # a is served while b loads
        assert answered[-1].done and not loading_b.done()
        SlowLoadingRunner.release.set()
        await asyncio.gather(loading_b, also_b)
        assert [name for name, _ in FakeRunner.started] == ["a:latest", "b:latest"]  # one load for both requests
        await manager.close()

    asyncio.run(scenario())


def test_a_load_that_takes_too_long_fails_with_a_clear_error(models: dict[str, ModelSource]) -> None:
    async def scenario() -> None:
        SlowLoadingRunner.release = asyncio.Event()
        manager = _manager(models, runner_factory=SlowLoadingRunner, load_timeout=0.1)
        requests = [asyncio.create_task(_ask(manager, "b")) for _ in range(2)]
        results = await asyncio.gather(*requests, return_exceptions=True)
        for result in results:
            assert isinstance(result, ModelLoadError) and "longer than 0.1 s" in str(result)
            assert "EMBER_LOAD_TIMEOUT" in str(result)
        assert manager.entries == {} and not manager._loading
        SlowLoadingRunner.release.set()
        assert (await _ask(manager, "b"))[-1].done  # the next request loads it afresh
        await manager.close()

    asyncio.run(scenario())


def test_a_failed_load_fails_the_requests_that_waited_for_it_once(models: dict[str, ModelSource]) -> None:
    async def scenario() -> None:
        SlowLoadingRunner.release = asyncio.Event()
        manager = _manager(models, runner_factory=SlowLoadingRunner)
        attempts = []

        def fail(options: LoadOptions) -> str:
            attempts.append(options)
            return "unknown model architecture: 'mamba9'"

        prepared = []  # requests resolve in worker threads: wait until all three wait for the one load
        resolve_once = manager.prepare

        def prepare(*args: Any) -> Any:
            resolved = resolve_once(*args)
            prepared.append(resolved)
            return resolved

        manager.prepare = prepare  # type: ignore[method-assign]
        FakeRunner.fail_when = fail
        requests = [asyncio.create_task(_ask(manager, "b")) for _ in range(3)]
        while len(prepared) < 3 or "b:latest" not in manager._loading:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        SlowLoadingRunner.release.set()
        results = await asyncio.gather(*requests, return_exceptions=True)
        assert all(isinstance(result, ModelLoadError) and "mamba9" in str(result) for result in results)
        assert len(attempts) == 1
        await manager.close()

    asyncio.run(scenario())


def test_choices_come_tagged_and_a_load_only_request_answers_each(models: dict[str, ModelSource]) -> None:
    async def scenario() -> None:
        manager = _manager(models)
        items = [item async for item in manager.generate_choices(GenerateRequest(model="a", prompt="x"), 2)]
        assert {index for index, _ in items} == {0, 1} and [index for index, c in items if c.done] == [0, 1]
        assert manager.entries["a:latest"].queue.in_use == 0  # the place the two shared is free again
        loaded = [item async for item in manager.chat_choices(ChatRequest(model="a"), 2)]
        assert [(index, chunk.done_reason) for index, chunk in loaded] == [(0, "load"), (1, "load")]
        assert len(FakeRunner.started) == 1
        await manager.close()

    asyncio.run(scenario())


@pytest.mark.parametrize(("batch_slots", "cap"), [(None, 2), (1, 1)])
def test_batch_requests_hold_at_most_the_batch_slots(
    models: dict[str, ModelSource], batch_slots: int | None, cap: int
) -> None:
    async def scenario() -> None:
        manager = _manager(models, default_options={"num_parallel": 3}, batch_slots=batch_slots)
        await _ask(manager, "a")  # loaded
        queue = manager.entries["a:latest"].queue
        most = 0

        async def line() -> None:
            nonlocal most
            request = GenerateRequest(model="a", prompt="line")
            async for _ in manager.generate(request, priority="low", batch=True):
                most = max(most, queue.batch_in_use)

        lines = [asyncio.create_task(line()) for _ in range(6)]
        await asyncio.sleep(0.005)
        assert queue.batch_in_use == cap and queue.in_use == cap
        interactive = await asyncio.wait_for(_ask(manager, "a", "now"), timeout=1)  # a slot was free for it
        assert interactive[-1].done
        await asyncio.gather(*lines)
        assert most == cap and queue.in_use == 0
        await manager.close()

    asyncio.run(scenario())
