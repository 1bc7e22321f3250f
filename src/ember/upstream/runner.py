"""UpstreamRunner: the Runner (serve/entries.py) of an upstream model, whose tokens come from OpenAI-compatible
servers (vLLM, trtllm-serve, llama-server, another ember) over HTTP instead of a local runner process.

Requests arrive resolved and capped by serve/resolve.py and queued by the manager (the model's slots are its
`num_parallel`: the requests in flight to the upstream at once, over all replicas). Each one is sent streamed
and each SSE chunk is passed on as it arrives. A connection error or a 5xx before the first chunk moves the
request to the next replica; a 4xx goes back to the client with the upstream's message and status (a 401/403
is the upstream refusing ember's own key: a 502, so that a client does not take it for its own). Closing the
stream (the client went away) closes the upstream request.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx

from ember.config import Settings
from ember.errors import EmberError, ModelLoadError
from ember.options import LoadOptions
from ember.store.resolve import ModelSource
from ember.types import (
    ChatRequest,
    ChatResponse,
    EmbedRequest,
    EmbedResponse,
    GenerateRequest,
    GenerateResponse,
    Message,
)
from ember.upstream import wire
from ember.upstream.replicas import Replica, ReplicaPool


class UpstreamError(EmberError):
    """An upstream server refused or failed a request; `http_status` is what the client gets."""

    def __init__(self, message: str, http_status: int = 502) -> None:
        super().__init__(message)
        self.http_status = http_status


def _describe(error: Exception) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


class UpstreamRunner:
    """One upstream model's connection pool, replicas and health checks. Use from one event loop."""

    def __init__(self, source: ModelSource, options: LoadOptions, *, health_interval: float | None = None) -> None:
        if source.upstream is None:
            raise ModelLoadError(f"{source.name} is not an upstream model")
        self.source = source
        self.spec = source.upstream
        self.options = options
        self.facts: dict[str, Any] = {}
        self.on_crash = None  # an upstream never crashes here: its failures are per request
        self.health_interval = health_interval or Settings().upstream_health_interval
        self._client: httpx.AsyncClient | None = None
        self.pool: ReplicaPool | None = None

    @property
    def alive(self) -> bool:
        return self._client is not None

    async def start(self) -> dict[str, Any]:
        """Read the key from the environment and find at least one replica that answers."""
        started = time.perf_counter_ns()
        headers: dict[str, str] = {}
        if self.spec.key_env:
            key = os.environ.get(self.spec.key_env)
            if not key:
                raise ModelLoadError(
                    f"{self.source.name} reads its upstream key from the environment variable {self.spec.key_env}, "
                    "which is not set where ember serve runs; set it and try again"
                )
            headers["Authorization"] = f"Bearer {key}"
        client = httpx.AsyncClient(
            timeout=httpx.Timeout(connect=5.0, read=None, write=60.0, pool=None),  # an answer may think for minutes
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        )
        pool = ReplicaPool(self.spec.replicas, client, headers, self.spec.model, interval=self.health_interval)
        await pool.check_all()
        if not any(replica.healthy for replica in pool.replicas):
            await client.aclose()
            reasons = "; ".join(f"{replica.url}: {replica.error}" for replica in pool.replicas)
            failure = ModelLoadError(f"no upstream replica of {self.source.name} answers ({reasons})")
            raise failure
        pool.start()
        self._client, self.pool = client, pool
        self.facts = {
            "load_duration": time.perf_counter_ns() - started,
            "upstream_model": self.spec.model,
            "max_model_len": pool.max_model_len(),
            "num_parallel": self.options.num_parallel,
        }
        return self.facts

    def replica_status(self) -> list[dict[str, Any]]:
        """Each replica's URL, health, requests in flight and last error (for /api/ps and `ember ps`)."""
        return self.pool.status() if self.pool is not None else []

    async def stop(self, timeout: float = 5.0) -> None:
        client, pool = self._client, self.pool
        self._client = None
        if pool is not None:
            await pool.stop()
        if client is not None:
            await client.aclose()

    # --- requests ------------------------------------------------------------------------------------

    async def _open(self, path: str, body: dict[str, Any], tried: set[str], errors: list[str]) -> tuple[Replica, Any]:
        """A response (status < 400, streaming) from the least busy replica not tried yet."""
        if self._client is None or self.pool is None:
            raise UpstreamError(f"{self.source.name} was unloaded; send the request again", 503)
        while (replica := self.pool.choose(tried)) is not None:
            tried.add(replica.url)
            replica.outstanding += 1
            try:
                request = self._client.build_request("POST", replica.url + path, json=body, headers=self.pool.headers)
                response = await self._client.send(request, stream=True)
            except httpx.HTTPError as error:
                replica.outstanding -= 1
                self.pool.failed(replica, _describe(error))
                errors.append(f"{replica.url}: {_describe(error)}")
                continue
            except BaseException:
                replica.outstanding -= 1
                raise
            if response.status_code < 400:
                return replica, response
            try:
                text = (await response.aread()).decode(errors="replace")
            except httpx.HTTPError:
                text = ""
            finally:
                await response.aclose()
                replica.outstanding -= 1
            try:
                message = wire.error_message(json.loads(text), text[:500])
            except ValueError:
                message = text[:500]
            status = response.status_code
            if status >= 500:
                self.pool.failed(replica, f"answered {status}: {message}")
                errors.append(f"{replica.url} answered {status}: {message}")
                continue
            if status in (401, 403):
                raise UpstreamError(f"the upstream {replica.url} refused ember's key ({status}): {message}", 502)
            raise UpstreamError(f"the upstream refused the request: {message}", status)
        raise UpstreamError(f"no upstream replica of {self.source.name} could answer: " + "; ".join(errors), 502)

    async def _events(self, path: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The stream's JSON chunks, as they arrive; on to another replica if one fails before its first."""
        tried: set[str] = set()
        errors: list[str] = []
        while True:
            replica, response = await self._open(path, body, tried, errors)
            sent = False
            try:
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    payload = json.loads(data)
                    if payload.get("error") and not payload.get("choices"):
                        message = wire.error_message(payload, "an error")
                        raise UpstreamError(f"the upstream {replica.url} failed during the answer: {message}", 502)
                    sent = True
                    yield payload
                return
            except (httpx.HTTPError, ValueError) as error:
                if sent or self.pool is None:
                    raise UpstreamError(
                        f"the upstream {replica.url} broke off the answer ({_describe(error)}); send it again", 502
                    ) from None
                self.pool.failed(replica, _describe(error))
                errors.append(f"{replica.url}: {_describe(error)}")
            finally:
                await response.aclose()
                replica.outstanding -= 1

    async def _answer(
        self, path: str, body: dict[str, Any], n: int, model: str, *, as_chat: bool
    ) -> AsyncIterator[tuple[int, Any]]:
        """The stream as native chunks (ChatResponse when `as_chat`, else GenerateResponse), then each choice's
        final chunk with its counts (the usage chunk) and timings."""
        started = time.perf_counter_ns()
        first: int | None = None
        states = [wire.ChoiceState() for _ in range(n)]
        usage: dict[str, Any] = {}
        chat_wire = path == "/chat/completions"
        async for payload in self._events(path, body):
            usage = payload.get("usage") or usage
            for choice in payload.get("choices") or []:
                index = int(choice.get("index") or 0)
                if not 0 <= index < n:
                    continue
                state = states[index]
                if chat_wire:
                    delta = choice.get("delta") or {}
                    text = delta.get("content") or ""
                    thinking = delta.get("reasoning_content") or delta.get("reasoning") or ""
                    if delta.get("tool_calls"):
                        wire.add_tool_call_parts(state, delta["tool_calls"])
                    logprobs = wire.chat_logprobs(choice)
                else:
                    text, thinking, logprobs = choice.get("text") or "", "", wire.completion_logprobs(choice)
                if text or thinking or logprobs:
                    first = first or time.perf_counter_ns()
                    state.chunks += 1
                    yield index, self._chunk(model, text, thinking, logprobs, as_chat)
                if choice.get("finish_reason"):
                    state.finish = choice["finish_reason"]
                    if isinstance(choice.get("stop_reason"), str):
                        state.stop_sequence = choice["stop_reason"]
        ended = time.perf_counter_ns()
        first = first or ended
        prompt = int(usage.get("prompt_tokens") or 0)
        for index, state in enumerate(states):
            count = int(usage.get("completion_tokens") or state.chunks) if n == 1 else state.chunks
            final: dict[str, Any] = {
                "model": model,
                "done": True,
                "done_reason": wire.done_reason(state.finish),
                "stop_sequence": state.stop_sequence,
                "total_duration": ended - started,
                "prompt_eval_count": prompt,
                "prompt_eval_duration": first - started,
                "eval_count": count,
                "eval_duration": ended - first,
            }
            if as_chat:
                calls = state.tool_calls()
                if calls:
                    yield index, ChatResponse(model=model, message=Message(role="assistant", tool_calls=calls))
                yield index, ChatResponse(**final)
            else:
                yield index, GenerateResponse(**final)

    @staticmethod
    def _chunk(model: str, text: str, thinking: str, logprobs: Any, as_chat: bool) -> Any:
        if as_chat:  # built without validation: this runs for every token
            message = Message.model_construct(role="assistant", content=text, thinking=thinking or None)
            return ChatResponse.model_construct(model=model, message=message, logprobs=logprobs)
        return GenerateResponse.model_construct(
            model=model, response=text, thinking=thinking or None, logprobs=logprobs
        )

    async def chat_choices(self, request: ChatRequest, n: int) -> AsyncIterator[tuple[int, ChatResponse]]:
        body = wire.chat_body(self.source, self.spec.model, request, n)
        async for item in self._answer("/chat/completions", body, n, request.model, as_chat=True):
            yield item

    async def generate_choices(self, request: GenerateRequest, n: int) -> AsyncIterator[tuple[int, GenerateResponse]]:
        path, body = wire.generate_body(self.source, self.spec.model, request, n)
        async for item in self._answer(path, body, n, request.model, as_chat=False):
            yield item

    async def embed(self, request: EmbedRequest) -> EmbedResponse:
        started = time.perf_counter_ns()
        body = {"model": self.spec.model, "input": request.inputs()}
        replica, response = await self._open("/embeddings", body, set(), [])
        try:
            payload = json.loads(await response.aread())
        except (httpx.HTTPError, ValueError) as error:
            raise UpstreamError(f"the upstream {replica.url} sent no embeddings ({_describe(error)})", 502) from None
        finally:
            await response.aclose()
            replica.outstanding -= 1
        items = sorted(payload.get("data") or [], key=lambda item: item.get("index", 0))
        return EmbedResponse(
            model=request.model,
            embeddings=[item["embedding"] for item in items],
            total_duration=time.perf_counter_ns() - started,
            prompt_eval_count=int((payload.get("usage") or {}).get("prompt_tokens") or 0),
        )
