"""Load a running server with streamed requests and measure what its users see.

Works against ember or any OpenAI-compatible server (`/v1/chat/completions` or `/v1/completions`, server-sent
events) and against the Ollama API (`/api/generate`, NDJSON). A level is either a concurrency (that many
clients, each sending its next request as soon as the last one ends) or a rate (requests arriving as a Poisson
process, whether or not earlier ones are done). Per level: output tokens/s and requests/s over the level's wall
time; time to first token, inter-token latency (gaps between streamed text chunks) and end-to-end latency, each
as p50/p90/p99; and the errors.

Output tokens are the server's own count when it gives one (OpenAI `usage` with `stream_options.include_usage`,
Ollama's `eval_count`), else the number of text chunks streamed.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from ember.benchmark.stats import summary
from ember.errors import EmberError

PROMPTS = [
    "Write a long, detailed story about the sea.",
    "Describe a mountain village in winter, in as much detail as you can.",
    "Explain how a steam engine works, step by step.",
    "Tell the history of an old library and the people who worked there.",
    "Write a long letter from a traveller crossing a desert.",
    "Describe a walk through a forest at dawn, sound by sound.",
    "Write a story about a night train and its passengers.",
    "Explain why cities grow where they do, with examples.",
]
APIS = ("openai", "ollama")
ENDPOINTS = ("chat", "completions")


class ServerUnreachableError(EmberError):
    http_status = 503


@dataclass
class Target:
    """Where and how to send requests."""

    url: str
    api: str = "openai"
    endpoint: str = "chat"  # OpenAI only: chat/completions or completions
    model: str | None = None
    max_tokens: int = 64
    api_key: str | None = None
    timeout_s: float = 300.0

    def path(self) -> str:
        if self.api == "ollama":
            return "/api/generate"
        return "/v1/chat/completions" if self.endpoint == "chat" else "/v1/completions"

    def body(self, prompt: str, max_tokens: int | None = None) -> dict[str, Any]:
        limit = self.max_tokens if max_tokens is None else max_tokens
        if self.api == "ollama":
            return {"model": self.model, "prompt": prompt, "stream": True, "options": {"num_predict": limit}}
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": limit,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:  # a raw completion: a prompt that asks to be continued, not one the model may end at once
            body["prompt"] = f"Question: {prompt}\nAnswer:"
        return body

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@dataclass
class RequestRecord:
    sent: float
    ended: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # arrival of each chunk with text
    usage_tokens: int | None = None
    error: str | None = None
    unreachable: bool = False  # the connection itself failed
    status: int = 0  # the HTTP status

    @property
    def output_tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else len(self.chunk_times)


def _error_message(response: httpx.Response, text: str) -> str:
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    message = data.get("error", data.get("detail")) if isinstance(data, dict) else None
    if isinstance(message, dict):
        message = message.get("message")
    return f"HTTP {response.status_code}: {message or text.strip()[:200] or response.reason_phrase}"


def _parse_event(target: Target, payload: str, record: RequestRecord, now: float) -> bool:
    """Take one streamed event; True when the stream says it is done."""
    if target.api == "openai" and payload == "[DONE]":
        return True
    data = json.loads(payload)
    if not isinstance(data, dict):
        return False
    if data.get("error"):
        error = data["error"]
        raise RuntimeError(error.get("message", str(error)) if isinstance(error, dict) else str(error))
    if target.api == "ollama":
        if data.get("response"):
            record.chunk_times.append(now)
        if data.get("done"):
            if isinstance(data.get("eval_count"), int):
                record.usage_tokens = data["eval_count"]
            return True
        return False
    for choice in data.get("choices") or ():
        text = (choice.get("delta") or {}).get("content") if target.endpoint == "chat" else choice.get("text")
        if text:
            record.chunk_times.append(now)
    usage = data.get("usage")
    if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
        record.usage_tokens = usage["completion_tokens"]
    return False


async def send(client: httpx.AsyncClient, target: Target, prompt: str, max_tokens: int | None = None) -> RequestRecord:
    """One streamed request; any failure is recorded as the request's error."""
    record = RequestRecord(sent=time.perf_counter())
    try:
        body = target.body(prompt, max_tokens)
        async with client.stream("POST", target.path(), json=body, headers=target.headers()) as response:
            record.status = response.status_code
            if response.status_code >= 400:
                text = (await response.aread()).decode("utf-8", "replace")
                record.error = _error_message(response, text)
                return record
            async for line in response.aiter_lines():
                line = line.strip()
                if target.api == "openai":
                    if not line.startswith("data:"):
                        continue
                    line = line[5:].strip()
                if line and _parse_event(target, line, record, time.perf_counter()):
                    break
    except (httpx.ConnectError, httpx.ConnectTimeout) as error:
        record.error, record.unreachable = f"could not connect: {error}", True
    except (httpx.HTTPError, RuntimeError, ValueError) as error:
        record.error = f"{type(error).__name__}: {error}" if not isinstance(error, RuntimeError) else str(error)
    finally:
        record.ended = time.perf_counter()
    if record.error is None and not record.chunk_times:
        record.error = "the stream ended without any text"
    return record


async def _by_concurrency(
    client: httpx.AsyncClient, target: Target, concurrency: int, requests: int
) -> list[RequestRecord]:
    records: list[RequestRecord] = []
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < requests:
            index = next_index
            next_index += 1
            records.append(await send(client, target, PROMPTS[index % len(PROMPTS)]))

    await asyncio.gather(*(worker() for _ in range(min(concurrency, requests))))
    return records


async def _by_rate(
    client: httpx.AsyncClient, target: Target, rate: float, requests: int, seed: int
) -> list[RequestRecord]:
    generator = random.Random(seed)
    tasks = []
    for index in range(requests):
        if index:
            await asyncio.sleep(generator.expovariate(rate))
        tasks.append(asyncio.create_task(send(client, target, PROMPTS[index % len(PROMPTS)])))
    return list(await asyncio.gather(*tasks))


def level_result(records: list[RequestRecord], wall_s: float, **level: Any) -> dict[str, Any]:
    """The figures of one level from its requests."""
    good = [record for record in records if record.error is None]
    errors = [record.error for record in records if record.error is not None]
    tokens = sum(record.output_tokens for record in good)
    gaps = [b - a for record in good for a, b in zip(record.chunk_times, record.chunk_times[1:], strict=False)]
    return {
        **level,
        "requests": len(records),
        "completed": len(good),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "duration_s": wall_s,
        "output_tokens": tokens,
        "throughput_tok_s": tokens / wall_s if wall_s > 0 else 0.0,
        "requests_per_s": len(good) / wall_s if wall_s > 0 else 0.0,
        "ttft_s": summary([record.chunk_times[0] - record.sent for record in good]),
        "itl_s": summary(gaps),
        "e2e_s": summary([record.ended - record.sent for record in good]),
    }


async def _default_model(client: httpx.AsyncClient, target: Target) -> str:
    path = "/api/tags" if target.api == "ollama" else "/v1/models"
    response = await client.get(path, headers=target.headers())
    try:
        data = response.json()
        entries = data.get("models" if target.api == "ollama" else "data") or []
        names = [entry.get("name" if target.api == "ollama" else "id") for entry in entries]
    except (ValueError, AttributeError):
        names = []
    if response.status_code >= 400 or not names or not names[0]:
        raise EmberError(f"{target.url}{path} names no model; say which one with --model")
    return str(names[0])


async def _run(
    target: Target, concurrency: list[int], rates: list[float], requests: int, seed: int, progress: Any
) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=max([*concurrency, requests, 1]) + 2)
    timeout = httpx.Timeout(target.timeout_s, connect=10.0)
    async with httpx.AsyncClient(base_url=target.url, timeout=timeout, limits=limits) as client:
        try:
            if target.model is None:
                target.model = await _default_model(client, target)
            # Warm-up (not counted): loads the model on servers that load on demand, and checks the name.
            warm = await send(client, target, PROMPTS[0], max_tokens=4)
        except (httpx.ConnectError, httpx.ConnectTimeout) as error:
            raise ServerUnreachableError(f"could not reach a server at {target.url} ({error})") from None
        if warm.unreachable:
            raise ServerUnreachableError(f"could not reach a server at {target.url} ({warm.error})")
        if warm.error is not None and warm.status >= 400:
            raise EmberError(f"{target.url} refused a {target.path()} request for model '{target.model}': {warm.error}")
        levels = []
        plan = [("concurrency", value) for value in concurrency] + [("rate", value) for value in rates]
        for kind, value in plan:
            if progress is not None:
                progress(f"{kind} {value:g}: {requests} requests")
            started = time.perf_counter()
            if kind == "concurrency":
                records = await _by_concurrency(client, target, int(value), requests)
            else:
                records = await _by_rate(client, target, float(value), requests, seed)
            wall = time.perf_counter() - started
            levels.append(
                level_result(
                    records,
                    wall,
                    concurrency=int(value) if kind == "concurrency" else None,
                    rate=float(value) if kind == "rate" else None,
                )
            )
    return {
        "mode": "serve",
        "url": target.url,
        "api": target.api,
        "endpoint": target.path(),
        "model": target.model,
        "max_tokens": target.max_tokens,
        "requests_per_level": requests,
        "levels": levels,
    }


def run_serving(
    target: Target,
    *,
    concurrency: list[int],
    rates: list[float],
    requests: int,
    seed: int = 0,
    progress: Any = None,
) -> dict[str, Any]:
    """Every level in turn against one server; one JSON-ready document."""
    return asyncio.run(_run(target, concurrency, rates, requests, seed, progress))
