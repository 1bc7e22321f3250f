"""The model manager: which models are loaded, in which runner, and who may use them when.

A request names a model; the manager loads it on first use (in its own runner process), queues the request
by priority until one of the model's slots is free, streams the answer, and keeps the model loaded for
keep_alive afterwards. A model whose load options differ from the loaded one is loaded again once the old
one is idle; sampling options never cause a reload. A new model that does not fit the memory budget, or
would pass the maximum number of loaded models, first evicts the least recently used idle model. A load
that fails for lack of memory is retried down a ladder (fewer GPU layers, CPU only, smaller num_ctx).
Requests made with `batch=True` (lines of batch jobs) hold at most `batch_slots` of a model's slots at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from ember.errors import CorruptModelError, ModelLoadError, ServerBusyError
from ember.options import LoadOptions
from ember.serve.circuit import CircuitBreakers, CircuitOpenError
from ember.serve.deadlines import Deadlines
from ember.serve.engines import estimate_for, expires, replica_health, start_runner_for
from ember.serve.entries import LoadedModelEntry, Runner, RunningModel
from ember.serve.events import ServerEvents
from ember.serve.fallbacks import next_fallback
from ember.serve.keep_alive import FOREVER, parse_keep_alive
from ember.serve.loading import Lifecycle, RunnerFactory, start_with_retries
from ember.serve.memory import (
    GpuDevice,
    ModelEstimate,
    fallback_ladder,
    gpu_devices,
    memory_budget,
    plan_gpu_layers,
)
from ember.serve.metrics import ServeMetrics
from ember.serve.observe import Observation
from ember.serve.queue import Priority, RequestQueue
from ember.serve.resolve import Limits, Resolved, resolve_request
from ember.serve.response_cache import ResponseCache, through_cache
from ember.serve.stats import ServerStats
from ember.store.resolve import ModelSource, resolve_model
from ember.types import ChatRequest, ChatResponse, EmbedRequest, EmbedResponse, GenerateRequest, GenerateResponse

log = logging.getLogger(__name__)
_MEMORY_ERRORS = ("out of memory", "failed to allocate", "cannot allocate", "unable to allocate", "oom")


class ModelManager:
    """Loads models on demand and serves requests on them. Use from one event loop."""

    def __init__(
        self,
        *,
        runner_factory: RunnerFactory = start_runner_for,
        default_options: dict[str, Any] | None = None,
        keep_alive: float | None = 300.0,
        max_loaded: int = 3,
        max_queued: int = 512,
        aging_seconds: float = 10.0,
        budget: Callable[[], int] = memory_budget,
        devices: Callable[[], Sequence[GpuDevice]] = gpu_devices,
        resolve: Callable[[str], ModelSource] = resolve_model,
        limits: Limits | None = None,
        load_timeout: float = 300.0,
        batch_slots: int | None = None,
        deadlines: Deadlines | None = None,
        metrics: ServeMetrics | None = None,
        events: ServerEvents | None = None,
        log_content: bool = False,
        breakers: CircuitBreakers | None = None,
        fallbacks: dict[str, list[str]] | None = None,
        load_retries: int = 2,
        load_backoff: float = 0.5,
        response_cache: ResponseCache | None = None,
    ) -> None:
        self.runner_factory = runner_factory
        self.default_options = dict(default_options or {})
        self.keep_alive = keep_alive
        self.max_loaded = max_loaded
        self.max_queued = max_queued
        self.aging_seconds = aging_seconds
        self.budget = budget
        self.devices = devices
        self.resolve = resolve
        self.limits = limits or Limits()
        self.load_timeout = load_timeout
        self.batch_slots = batch_slots  # None: all of a model's slots but one
        self.deadlines = deadlines or Deadlines()  # first-token and total timeouts, the shutdown grace
        self.metrics = metrics
        self.events = events or ServerEvents()  # loads, unloads, crashes, circuit changes: logs and alerts
        self.log_content = log_content  # keep prompts and answers in the request records
        self.breakers = breakers or CircuitBreakers(events=self.events)
        self.fallbacks = dict(fallbacks or {})  # model -> models that answer when it cannot (besides its own)
        self.load_retries = load_retries  # a load that failed for a transient reason is tried again ...
        self.load_backoff = load_backoff  # ... after this many seconds, doubling each time
        self.response_cache = response_cache  # None: off (EMBER_RESPONSE_CACHE)
        self._prepared: set[tuple[str, bool]] = set()  # (model name, insertion) resolved once already (_prepare)
        self.entries: dict[str, LoadedModelEntry] = {}
        self._loading: dict[str, tuple[asyncio.Future[LoadedModelEntry], LoadOptions]] = {}
        self._reserved: dict[str, int] = {}  # estimated bytes of the models being loaded
        self.stats = ServerStats()  # answers and tokens over the last minute (/api/stats)
        self._idle = asyncio.Condition()
        self.lifecycle = Lifecycle(self.events, self.breakers, metrics)  # loads, unloads, crashes: events, metrics

    # --- requests ------------------------------------------------------------------------------------
    # `batch=True` marks a batch line's request: it takes a slot in the queue's batch class (EMBER_BATCH_SLOTS).

    async def generate(
        self,
        request: GenerateRequest,
        *,
        priority: str | int | None = None,
        timeout: float | None = None,
        batch: bool = False,
    ) -> AsyncIterator[GenerateResponse]:
        """Stream the answer; a request with an empty prompt only loads (or, with keep_alive 0, unloads)."""
        async for _, chunk in self.generate_choices(request, 1, priority=priority, timeout=timeout, batch=batch):
            yield chunk

    async def chat(
        self,
        request: ChatRequest,
        *,
        priority: str | int | None = None,
        timeout: float | None = None,
        batch: bool = False,
    ) -> AsyncIterator[ChatResponse]:
        """Stream the next assistant message; a request with no messages only loads (or unloads)."""
        async for _, chunk in self.chat_choices(request, 1, priority=priority, timeout=timeout, batch=batch):
            yield chunk

    async def generate_choices(
        self,
        request: GenerateRequest,
        n: int,
        *,
        priority: str | int | None = None,
        timeout: float | None = None,
        batch: bool = False,
    ) -> AsyncIterator[tuple[int, GenerateResponse]]:
        """`n` completions of one prompt, as (choice index, chunk): the runner prefills the prompt once and the
        others copy its KV (choice i samples with seed + i when a seed is set). One place in the queue."""
        resolved = await self._prepare(request, priority, n)
        if not request.prompt and not request.context and not request.suffix:
            loaded = await self._load_only(resolved, GenerateResponse)
            for index in range(n):
                yield index, loaded
            return
        serving = self._serve(resolved, lambda runner, req: runner.generate_choices(req, n), timeout, batch)
        async for item in self._cached(resolved, n, serving):
            yield item

    async def chat_choices(
        self,
        request: ChatRequest,
        n: int,
        *,
        priority: str | int | None = None,
        timeout: float | None = None,
        batch: bool = False,
    ) -> AsyncIterator[tuple[int, ChatResponse]]:
        resolved = await self._prepare(request, priority, n)
        if not request.messages:
            loaded = await self._load_only(resolved, ChatResponse)
            for index in range(n):
                yield index, loaded
            return
        serving = self._serve(resolved, lambda runner, req: runner.chat_choices(req, n), timeout, batch)
        async for item in self._cached(resolved, n, serving):
            yield item

    async def embed(
        self,
        request: EmbedRequest,
        *,
        priority: str | int | None = None,
        timeout: float | None = None,
        batch: bool = False,
    ) -> EmbedResponse:
        """Embeddings of the request's inputs, queued like any request for the model (one slot while it runs);
        no inputs only loads the model (or, with keep_alive 0, unloads it)."""
        resolved = await self._prepare(request, priority)
        if not request.inputs():
            loaded = await self._load_only(resolved, GenerateResponse)
            return EmbedResponse(
                model=request.model, total_duration=loaded.total_duration, load_duration=loaded.load_duration
            )

        async def once(runner: Runner, native: EmbedRequest) -> AsyncIterator[EmbedResponse]:
            yield await runner.embed(native)

        results = [result async for result in self._serve(resolved, once, timeout, batch)]
        return results[0]

    async def _prepare(self, request: Any, priority: str | int | None, choices: int = 1) -> Resolved[Any]:
        # The first request for a model name runs in a worker thread: it reads the GGUF's metadata (the template,
        # the capabilities; ~10 ms, cached after), and its first insertion the vocabulary. Later ones only read the
        # store's small manifest, in well under a millisecond, here: on a busy server the hand-off to a thread and
        # back costs 2 to 8 ms, and a request that reaches the runner after the engine's step has ended waits
        # for a whole next step.
        key = (request.model, bool(getattr(request, "suffix", None)))
        if key in self._prepared:
            return self.prepare(request, priority, choices)
        resolved = await asyncio.to_thread(self.prepare, request, priority, choices)
        self._prepared.add(key)
        return resolved

    def prepare(self, request: Any, priority: str | int | None = None, choices: int = 1) -> Resolved[Any]:
        """Resolve and validate a request (model, options, caps, capabilities, the number of completions)
        before anything is loaded."""
        return resolve_request(
            request,
            find_model=self.resolve,
            default_options=self.default_options,
            limits=self.limits,
            keep_alive=parse_keep_alive(request.keep_alive, self.keep_alive),
            priority=priority,
            choices=choices,
        )

    async def _load_only(self, resolved: Resolved[Any], kind: type) -> Any:
        keep_alive = resolved.keep_alive
        model = resolved.request.model
        if keep_alive == 0:
            await self.stop(resolved.name)
            return kind(model=model, done=True, done_reason="unload")
        started = time.perf_counter_ns()
        entry = await self._entry(resolved.name, resolved.source, resolved.load, keep_alive)
        entry.keep_alive = keep_alive
        self._schedule_expiry(entry)
        load = int(entry.runner.facts.get("load_duration", 0)) if time.time() - entry.loaded_at < 60 else 0
        return kind(
            model=model,
            done=True,
            done_reason="load",
            total_duration=time.perf_counter_ns() - started,
            load_duration=load,
        )

    async def _serve(
        self,
        resolved: Resolved[Any],
        start: Callable[[Runner, Any], AsyncIterator[Any]],
        timeout: float | None,
        batch: bool = False,
    ) -> AsyncIterator[Any]:
        """Serve on the model, or on its fallbacks in order when it cannot load, its circuit is open or its queue
        is full (only before the first chunk: an answer never switches models halfway)."""
        candidate, tried = resolved, [resolved.name]
        while True:
            try:
                entry, ticket, started, probe = await self._admit(candidate, timeout, batch)
                break
            except (CircuitOpenError, ModelLoadError, CorruptModelError, ServerBusyError) as error:
                fallback = await next_fallback(self.prepare, self.fallbacks, resolved, tried)
                if fallback is None:
                    raise
                log.warning("%s cannot serve (%s); %s answers instead", candidate.name, error, fallback.name)
                self.events.emit("fallback", model=candidate.name, fallback=fallback.name, reason=str(error))
                tried.append(fallback.name)
                candidate = fallback
        observation = Observation(self.metrics, candidate.request, entry.name, with_content=self.log_content)
        if observation.record is not None:
            observation.record.fell_back = candidate is not resolved
        observation.admitted()
        failure: BaseException | None = None
        try:
            try:
                async for chunk in self.deadlines.timed(start(entry.runner, candidate.request), started):
                    observation.chunk(chunk)
                    answer = chunk[1] if isinstance(chunk, tuple) else chunk  # (choice index, chunk)
                    if getattr(answer, "done", False):
                        self.stats.record(answer)
                    yield chunk
            finally:
                ticket.release()
        except BaseException as error:
            failure = error
            raise
        finally:
            observation.finished(failure)
            if failure is None or observation.completed:
                self.breakers.succeeded(entry.name)
            elif probe and entry.runner.alive:  # not a crash (that reopens the circuit): let another probe
                self.breakers.abandoned(entry.name)
            await self._release(entry, candidate.keep_alive)

    def _cached(
        self, resolved: Resolved[Any], n: int, serving: AsyncIterator[tuple[int, Any]]
    ) -> AsyncIterator[tuple[int, Any]]:
        return through_cache(self.response_cache, self.metrics, resolved, n, serving)

    async def _admit(
        self, resolved: Resolved[Any], timeout: float | None, batch: bool
    ) -> tuple[LoadedModelEntry, Any, float, bool]:
        """The model's circuit let it through, the model is loaded, and a slot is this request's."""
        probe = self.breakers.admit(resolved.name)
        try:
            entry = await self._entry(resolved.name, resolved.source, resolved.load, resolved.keep_alive)
        except BaseException:
            if probe:
                self.breakers.abandoned(resolved.name)  # a failed load counted itself (see _load_once)
            raise
        entry.active += 1
        self._cancel_expiry(entry)
        started = asyncio.get_running_loop().time()  # time limits count from here: a load has its own
        try:
            wait = self.deadlines.queue_limit(timeout, started)
            ticket = await entry.queue.acquire(resolved.priority, timeout=wait, batch=batch)
        except BaseException:
            if probe:
                self.breakers.abandoned(resolved.name)
            await self._release(entry, resolved.keep_alive)
            raise
        return entry, ticket, started, probe

    async def _release(self, entry: LoadedModelEntry, keep_alive: float | None) -> None:
        entry.active -= 1
        entry.last_used = time.monotonic()
        entry.keep_alive = keep_alive
        if entry.idle:
            await self._became_idle(entry)

    # --- loading -------------------------------------------------------------------------------------
    # Loads never block other models: each model being loaded has a future in `_loading`, and requests for it
    # wait on that future alone. The bookkeeping (entries, futures, reservations) changes only between awaits,
    # so within the one event loop it needs no lock.

    async def _entry(
        self, name: str, source: ModelSource, wanted: LoadOptions, keep_alive: float | None
    ) -> LoadedModelEntry:
        while True:
            entry = self.entries.get(name)
            if entry is not None and not entry.runner.alive:  # it crashed: its requests failed; start afresh
                await self._unload(entry, reason="its runner had crashed")
                continue
            if (
                entry is not None
                and not entry.draining
                and (entry.requested, entry.source.path) == (wanted, source.path)
            ):
                return entry
            pending = self._loading.get(name)
            if pending is None:
                return await self._load_once(name, source, wanted, keep_alive, replacing=entry)
            future, options = pending
            try:
                loaded = await asyncio.shield(future)
            except Exception:
                if options == wanted:  # the load this request waited for failed: so does the request
                    raise
                continue
            if loaded.requested == wanted and loaded.runner.alive:
                return loaded

    async def _load_once(
        self,
        name: str,
        source: ModelSource,
        wanted: LoadOptions,
        keep_alive: float | None,
        replacing: LoadedModelEntry | None,
    ) -> LoadedModelEntry:
        """Load `name` (once the entry it replaces is idle); requests for it meanwhile wait on one future."""
        future: asyncio.Future[LoadedModelEntry] = asyncio.get_running_loop().create_future()
        self._loading[name] = (future, wanted)
        try:
            if replacing is not None:  # other load options: replace it once its requests are done
                replacing.draining = True
                await self._wait_idle(replacing)
                await self._unload(replacing)
            try:
                entry = await asyncio.wait_for(self._load(name, source, wanted, keep_alive), self.load_timeout)
            except TimeoutError:
                raise ModelLoadError(
                    f"loading {name} took longer than {self.load_timeout:g} s (EMBER_LOAD_TIMEOUT); the machine may "
                    "be busy or the model too large for it: try again, or allow more time"
                ) from None
        except BaseException as error:
            failure = error if isinstance(error, Exception) else ModelLoadError(f"loading {name} was interrupted")
            if isinstance(error, ModelLoadError | CorruptModelError):  # counted once, not once per waiting request
                self.breakers.failed(name, f"loading failed: {error}")
                self.events.emit("load_failed", model=name, error=str(error))
            future.set_exception(failure)
            future.exception()  # marked as seen: a failed load that nobody else awaited is no unhandled error
            raise
        else:
            future.set_result(entry)
            return entry
        finally:
            self._loading.pop(name, None)

    async def _wait_idle(self, entry: LoadedModelEntry) -> None:
        async with self._idle:
            await self._idle.wait_for(lambda: entry.idle)

    async def _load(
        self, name: str, source: ModelSource, wanted: LoadOptions, keep_alive: float | None
    ) -> LoadedModelEntry:
        estimate = await estimate_for(source, wanted)
        self._reserved[name] = estimate.total()  # counted by other loads making room at the same time
        try:
            await self._make_room(estimate, name)
            return await self._start_runner(name, source, wanted, keep_alive, estimate)
        finally:
            self._reserved.pop(name, None)

    async def _start_runner(
        self, name: str, source: ModelSource, wanted: LoadOptions, keep_alive: float | None, estimate: ModelEstimate
    ) -> LoadedModelEntry:
        """Start the runner, down the fallback ladder when a load runs out of memory."""
        devices = list(self.devices())
        plan = plan_gpu_layers(estimate, devices, n_layer=estimate.n_layer, requested=wanted.num_gpu)
        first = wanted if wanted.num_gpu >= 0 or not devices else wanted.model_copy(update={"num_gpu": plan.layers})
        attempts = fallback_ladder(first, plan) if wanted.num_gpu < 0 else [(first, "as requested")]
        failures: list[str] = []
        for options, description in attempts:
            try:
                runner = await start_with_retries(
                    self.runner_factory, name, source, options, self.load_retries, self.load_backoff, self.events
                )
            except ModelLoadError as error:
                if not any(marker in str(error).lower() for marker in _MEMORY_ERRORS):
                    raise
                log.warning("loading %s (%s) ran out of memory: %s", name, description, error)
                failures.append(f"{description}: {error}")
                continue
            note = plan.reason if not failures else f"{description} (after running out of memory: {failures[-1]})"
            entry = LoadedModelEntry(
                name=name,
                source=source,
                requested=wanted,
                options=options,
                runner=runner,
                queue=RequestQueue(
                    slots=options.num_parallel,
                    max_queued=self.max_queued,
                    aging_seconds=self.aging_seconds,
                    batch_slots=self.batch_slots,
                ),
                estimate=estimate,
                load_note=note,
                keep_alive=keep_alive,
            )
            self.entries[name] = entry
            log.info("loaded %s: %s", name, note)
            self.lifecycle.loaded(entry)
            return entry
        raise ModelLoadError(f"not enough memory to load {name}; tried " + "; ".join(failures))

    async def _make_room(self, estimate: ModelEstimate, name: str) -> None:
        """Evict least recently used idle models until the new one fits the budget and the model count (loads
        of other models in progress count as if they were loaded)."""
        while self.entries:
            others = {other: size for other, size in self._reserved.items() if other != name}
            used = sum(entry.estimate.total() for entry in self.entries.values()) + sum(others.values())
            if len(self.entries) + len(others) < self.max_loaded and used + estimate.total() <= self.budget():
                return
            idle = [entry for entry in self.entries.values() if entry.idle]
            if not idle:  # everything is busy: wait for something to finish, then look again
                async with self._idle:
                    await self._idle.wait_for(lambda: any(e.idle for e in self.entries.values()))
                continue
            victim = min(idle, key=lambda entry: entry.last_used)
            log.info("unloading %s to make room", victim.name)
            await self._unload(victim, reason=f"evicted to make room for {name}")

    async def _unload(self, entry: LoadedModelEntry, reason: str = "unloaded") -> None:
        self._cancel_expiry(entry)
        if self.entries.get(entry.name) is entry:
            del self.entries[entry.name]
        await entry.runner.stop()
        self.lifecycle.unloaded(entry, reason)

    # --- keep_alive ----------------------------------------------------------------------------------

    async def _became_idle(self, entry: LoadedModelEntry) -> None:
        async with self._idle:
            self._idle.notify_all()
        if entry.draining or entry.keep_alive == 0:
            if not entry.draining and entry.idle and self.entries.get(entry.name) is entry:
                await self._unload(entry)
            return
        self._schedule_expiry(entry)

    def _schedule_expiry(self, entry: LoadedModelEntry) -> None:
        self._cancel_expiry(entry)
        if entry.keep_alive is FOREVER or not expires(entry.source):
            entry.expires_at = None
            return
        entry.expires_at = time.time() + entry.keep_alive
        entry.timer = asyncio.get_running_loop().call_later(
            entry.keep_alive, lambda: asyncio.ensure_future(self._expire(entry))
        )

    def _cancel_expiry(self, entry: LoadedModelEntry) -> None:
        if entry.timer is not None:
            entry.timer.cancel()
            entry.timer = None

    async def _expire(self, entry: LoadedModelEntry) -> None:
        if entry.idle and self.entries.get(entry.name) is entry:
            log.info("keep_alive expired: unloading %s", entry.name)
            await self._unload(entry, reason="keep_alive expired")

    # --- management ----------------------------------------------------------------------------------

    def ps(self) -> list[RunningModel]:
        rows = []
        for entry in sorted(self.entries.values(), key=lambda e: e.last_used, reverse=True):
            layers = entry.options.num_gpu if entry.options.num_gpu >= 0 else 0
            rows.append(
                RunningModel(
                    name=entry.name,
                    digest=entry.source.digest,
                    size=entry.estimate.total(),
                    size_vram=entry.estimate.on_gpu(layers) if layers > 0 else 0,
                    gpu_layers=int(entry.runner.facts.get("gpu_layers", layers)),
                    num_ctx=entry.options.num_ctx,
                    slots=entry.queue.slots,
                    slots_in_use=entry.queue.in_use,
                    queued=entry.queue.queued,
                    expires_at=entry.expires_at,
                    load_note=entry.load_note,
                    replicas=replica_health(entry.runner),
                )
            )
        return rows

    async def stop(self, name: str) -> bool:
        """Unload a model now (its requests in flight are cancelled). False if it was not loaded."""
        entry = self.entries.get(name) or self.entries.get(self.resolve(name).name)
        if entry is None:
            return False
        entry.queue.fail_all(ModelLoadError(f"{entry.name} was unloaded while this request waited"))
        await self._unload(entry)
        return True

    async def close(self) -> None:
        for entry in list(self.entries.values()):
            with contextlib.suppress(Exception):
                await self._unload(entry)


__all__ = ["FOREVER", "ModelManager", "Priority", "RunningModel", "parse_keep_alive"]
