"""ember serve against llama-server, side by side in one run, alternating, through the openai client.

Both servers run the default model (SmolLM2-135M-Instruct Q4_1) with the same threads and parallel slots, and
sample the same way: temperature 0 and no repeat penalty (llama-server's default; ember's, as Ollama's, is 1.1),
so that both generate the same kind of text and the same amount of work.
Every figure is measured on ember, then on llama-server, `--runs` times; a ratio is the median of the
per-pair ratios ember / llama-server (the machine's speed drifts over seconds; a pair made a moment apart
cancels most of that). Throughput ratios should be >= 1, latency ratios <= 1.

- streams N: aggregate completion tokens/s of N concurrent 128-token chat completions
- cold TTFT: time to first token of a chat with a ~1,300-token system prompt nobody sent before
- ppN: prompt tokens / TTFT of a new N-token raw completion prompt (max_tokens 1)
- TTFT under load: short chat requests arriving one after another while 7 streams decode, the median of 5
  (checked: a stream that ended before the last was answered fails the run)
- next turn / cold, K chats: K chats with ~1,300-token system prompts sent one after another, then each one's
  next turn; the median next-turn TTFT over the median cold TTFT, per server (K > slots: the cache must
  survive its slot being taken)

llama-server is built from the llama.cpp that llama-cpp-python vendors (see the README, "Benchmarks"):

    .venv/bin/python bench/vs_llama_server.py --llama-server /tmp/llama.cpp-build/bin/llama-server [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai

from ember.engine.llamacpp import extra_buffer_types_are_safe

FACTS = [
    "the Nile flows north into the Mediterranean Sea",
    "honey found in ancient tombs was still edible",
    "octopuses have three hearts and blue blood",
    "the Eiffel Tower grows in summer as its iron expands",
    "bamboo can grow almost a metre in a single day",
    "Venus turns so slowly that its day outlasts its year",
]


@dataclass
class Server:
    name: str
    url: str
    process: subprocess.Popen[bytes]
    client: openai.AsyncOpenAI
    model: str


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def system_prompt(tag: str, facts: int = 50) -> str:
    """About 1,300 tokens: numbered facts, all after a short header that names the chat (and the run)."""
    lines = [f"Fact {i}: {FACTS[i % len(FACTS)]} ({tag}, {i})." for i in range(facts)]
    return f"You are a helpful assistant for chat {tag}. Use these notes.\n" + "\n".join(lines)


@contextlib.contextmanager
def servers(llama_server: str, model_path: str, threads: int, parallel: int, num_ctx: int) -> Iterator[list[Server]]:
    ember_port, llama_port = free_port(), free_port()
    environment = {
        **os.environ,
        "EMBER_HOST": f"127.0.0.1:{ember_port}",
        "EMBER_NUM_PARALLEL": str(parallel),
        "EMBER_KEEP_ALIVE": "-1",
    }
    ember = subprocess.Popen(
        [sys.executable, "-m", "ember.cli.main", "serve"], env=environment, stdout=subprocess.DEVNULL
    )
    llama = subprocess.Popen(
        [
            llama_server,
            *("-m", model_path, "-np", str(parallel), "-c", str(num_ctx * parallel), "-t", str(threads)),
            *("--host", "127.0.0.1", "--port", str(llama_port)),
            *(() if extra_buffer_types_are_safe() else ("--no-repack",)),  # AMX: as ember loads the weights
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    started = [
        Server("ember", f"http://127.0.0.1:{ember_port}", ember, _client(ember_port), "smollm2"),
        Server("llama-server", f"http://127.0.0.1:{llama_port}", llama, _client(llama_port), "smollm2"),
    ]
    try:
        for server in started:
            _wait_healthy(server)
        yield started
    finally:
        for server in started:
            server.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.process.wait(timeout=15)
            if server.process.poll() is None:
                server.process.kill()


def _client(port: int) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=600, max_retries=0)


def _wait_healthy(server: Server, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited with status {server.process.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.3)
    raise RuntimeError(f"{server.name} did not become healthy within {timeout:g} s")


SAME_SAMPLING = {"repeat_penalty": 1.0}  # llama.cpp's extension of the OpenAI body; both servers read it


async def chat(server: Server, messages: list[dict[str, str]], max_tokens: int) -> tuple[float, int, str]:
    """(TTFT seconds, completion tokens, text) of one streamed chat completion at temperature 0."""
    sent = time.perf_counter()
    first, tokens, text = 0.0, 0, ""
    for attempt in range(2):
        try:
            stream = await server.client.chat.completions.create(
                model=server.model,
                messages=messages,  # type: ignore[arg-type]
                max_tokens=max_tokens,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body=SAME_SAMPLING,
            )
            break
        except openai.APIConnectionError:  # a kept-alive connection the server had closed: nothing was sent
            if attempt:
                raise
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            text += chunk.choices[0].delta.content
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return (first or time.perf_counter()) - sent, tokens, text


async def aggregate(server: Server, streams: int, run: int) -> float:
    async def one(index: int) -> int:
        prompt = f"Run {run}, story {index}. Write a long, detailed story about {FACTS[index % len(FACTS)]}."
        return (await chat(server, [{"role": "user", "content": prompt}], 128))[1]

    started = time.perf_counter()
    tokens = await asyncio.gather(*(one(index) for index in range(streams)))
    return sum(tokens) / (time.perf_counter() - started)


async def cold_ttft(server: Server, run: int) -> float:
    messages = [
        {"role": "system", "content": system_prompt(f"cold-{server.name}-{run}")},
        {"role": "user", "content": "Which fact is about honey?"},
    ]
    return (await chat(server, messages, 8))[0]


async def prompt_rate(server: Server, n_tokens: int, run: int) -> float:
    """A raw prompt of n_tokens tokens that starts with the run's number and the server's name (never cached)."""
    words = f"{server.name} run {run}: " + " ".join(FACTS[i % len(FACTS)] for i in range(n_tokens))
    tokens = TOKENIZER.tokenize(words, add_special=False, parse_special=False)[: n_tokens - 1]
    sent = time.perf_counter()
    stream = await server.client.completions.create(
        model=server.model, prompt=TOKENIZER.detokenize(tokens), max_tokens=1, temperature=0, stream=True
    )
    async for _ in stream:
        break
    return n_tokens / (time.perf_counter() - sent)


PROBES = 5  # short requests per run of "TTFT under load", one after another


async def ttft_under_load(server: Server, run: int) -> float:
    async def story(index: int) -> float:
        prompt = f"Run {run}, story {index}. Write a long, detailed story about {FACTS[index % len(FACTS)]}."
        await chat(server, [{"role": "user", "content": prompt}], 400)
        return time.perf_counter()

    background = [asyncio.create_task(story(index)) for index in range(7)]
    try:
        await asyncio.sleep(2.0)  # the 7 streams are decoding now
        ttfts = []
        for probe in range(PROBES):  # where in a step a request lands varies its TTFT by up to a step: the median
            # Its answer starts with a plain token ("The", "L'"): a first character of several tokens (an emoji)
            # would add steps to some probes and not to others.
            question = f"What is the capital of France? ({run}.{probe})"
            ttfts.append((await chat(server, [{"role": "user", "content": question}], 4))[0])
            await asyncio.sleep(0.2)
        measured = time.perf_counter()
        ended = [task for task in background if task.done() and not task.cancelled() and task.result() < measured]
        if ended:
            raise RuntimeError(f"{len(ended)} of the 7 streams ended before the short requests were answered")
        return statistics.median(ttfts)
    finally:
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)


async def next_turn_ratio(server: Server, chats: int, run: int) -> float:
    conversations = [
        [
            {"role": "system", "content": system_prompt(f"chat{index}-{server.name}-{run}")},
            {"role": "user", "content": f"Which fact is number {index}?"},
        ]
        for index in range(chats)
    ]
    cold = []
    for conversation in conversations:
        ttft, _, answer = await chat(server, conversation, 16)
        cold.append(ttft)
        conversation += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And the next one?"}]
    warm = [(await chat(server, conversation, 16))[0] for conversation in conversations]
    return statistics.median(warm) / statistics.median(cold)


Measure = Callable[[Server, int], Awaitable[float]]
TOKENIZER: Any = None  # the model's vocabulary, to build prompts of an exact token count


async def paired(name: str, measures: list[Server], measure: Measure, runs: int, higher_is_better: bool) -> dict:
    values: dict[str, list[float]] = {server.name: [] for server in measures}
    ratios = []
    for run in range(runs):
        pair = []
        for server in measures:
            await asyncio.sleep(0.5)  # llama.cpp's threads keep spinning for a moment after a graph
            try:
                value = await measure(server, run)
            except Exception as error:
                status = server.process.poll()
                state = "running" if status is None else f"exited with status {status}"
                raise RuntimeError(f"{name}, run {run}: {server.name} failed ({state}): {error!r}") from error
            values[server.name].append(value)
            pair.append(value)
        ratios.append(pair[0] / pair[1])
    result = {
        "ember": statistics.median(values["ember"]),
        "llama-server": statistics.median(values["llama-server"]),
        "ratio": statistics.median(ratios),
        "higher_is_better": higher_is_better,
    }
    print(f"{name:<28}{result['ember']:>12.3f}{result['llama-server']:>14.3f}{result['ratio']:>9.2f}", flush=True)
    return result


async def measure_all(
    started: list[Server], runs: int, only: set[str] | None, parallel: int
) -> dict[str, dict[str, Any]]:
    tests: dict[str, tuple[Measure, bool]] = {
        "streams 1 (tok/s)": (lambda server, run: aggregate(server, 1, run), True),
        f"streams {parallel} (tok/s)": (lambda server, run: aggregate(server, parallel, run), True),
        "cold TTFT 1300 (s)": (cold_ttft, False),
        "pp512 (tok/s)": (lambda server, run: prompt_rate(server, 512, run), True),
        "pp1536 (tok/s)": (lambda server, run: prompt_rate(server, 1536, run), True),
        "TTFT under load (s)": (ttft_under_load, False),
        "next turn / cold, 4 chats": (lambda server, run: next_turn_ratio(server, 4, run), False),
        "next turn / cold, 12 chats": (lambda server, run: next_turn_ratio(server, 12, run), False),
    }
    for server in started:  # warm up: load the model, compile nothing later
        await chat(server, [{"role": "user", "content": "Hi"}], 4)
    print(f"{'':<28}{'ember':>12}{'llama-server':>14}{'ratio':>9}")
    results = {}
    for name, (measure, higher) in tests.items():
        if only and not any(part in name for part in only):
            continue
        results[name] = await paired(name, started, measure, runs, higher)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-server", required=True, help="path of a llama-server binary")
    parser.add_argument("--runs", type=int, default=3, help="paired runs per figure")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--num-ctx", type=int, default=4096, help="context per slot")
    parser.add_argument("--only", default="", help="comma list: run only figures whose name contains one")
    parser.add_argument("--json", action="store_true", help="print the results as JSON at the end")
    args = parser.parse_args()

    from ember.store.resolve import resolve_model

    global TOKENIZER
    from ember.engine.llamacpp import LlamaModel
    from ember.options import LoadOptions

    model_path = str(resolve_model("smollm2").path)
    TOKENIZER = LlamaModel.vocab_only(resolve_model("smollm2").path, LoadOptions())
    only = {part.strip() for part in args.only.split(",") if part.strip()} or None
    with servers(args.llama_server, model_path, args.threads, args.parallel, args.num_ctx) as started:
        results = asyncio.run(measure_all(started, args.runs, only, args.parallel))
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
