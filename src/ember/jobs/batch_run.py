"""`ember batch`'s engine room: run the pending lines with enough in flight to fill every slot, journal each
result as it lands, and write the outputs in input order.

Where a line runs is an `Execute` function (line -> LineResult): a model manager of this process, with its
runner processes (`ManagerExecutor`), a running server's HTTP API (`ServerExecutor`) or actors on a Ray cluster
(`ember.jobs.batch_ray`). The driver is the same for all three: `concurrency` worker threads, each taking the
next line in input order, so a model's slots stay full (continuous batching) and a slow line never holds up
the others.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from ember.errors import EmberError
from ember.jobs.batch_input import BatchLine
from ember.jobs.batch_journal import Journal
from ember.jobs.batch_lines import (
    LineResult,
    Translate,
    response_line,
    run_on_manager,
)

Execute = Callable[[BatchLine], LineResult]

PRIORITY_HEADER = "X-Ember-Priority"
_BUSY_RETRIES = 120  # a 503 from a busy server is retried after its Retry-After, this many times at most


def run_lines(
    pending: list[BatchLine],
    execute: Execute,
    *,
    concurrency: int,
    on_result: Callable[[LineResult], None],
    stop: threading.Event | None = None,
) -> None:
    """Run every pending line; `on_result` (journal, progress) is called in the worker thread as each ends.

    Results are recorded by the threads themselves, so a line that finishes while the run is being stopped
    (`stop` set: no new line starts, those in flight finish) is still journaled. An exception from `execute` (a
    server that went away) stops the run: lines not started are dropped, and the error is raised once the
    others have ended.
    """
    stop = stop or threading.Event()

    def work(line: BatchLine) -> None:
        if not stop.is_set():
            on_result(execute(line))

    pool = ThreadPoolExecutor(max(1, concurrency), thread_name_prefix="ember-batch")
    futures = [pool.submit(work, line) for line in pending]
    try:
        for future in as_completed(futures):
            future.result()
    finally:
        for future in futures:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


class ManagerExecutor:
    """Lines on a model manager of this process (`ember batch` without --server): the models load in runner
    processes whose step loops have llama.cpp's threads to themselves, as in `ember serve`. (Stepping the
    engine from the line threads instead made every decode about a third slower: eight Python threads shared
    the cores with llama.cpp's.) Every slot takes batch lines; the batch's load options are the defaults of
    each request, so a line that names others loads the model again with them, as on a server."""

    def __init__(self, translate: Translate, settings: Any, load: dict[str, Any], slots: int) -> None:
        from ember.serve.manager import ModelManager

        self.translate, self.settings = translate, settings
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="ember-batch-loop", daemon=True)
        self._thread.start()

        async def start() -> ModelManager:  # made on its loop: the manager's futures and tasks belong there
            return ModelManager(default_options=load, keep_alive=-1, batch_slots=max(1, slots))

        self.manager = asyncio.run_coroutine_threadsafe(start(), self._loop).result()

    def __call__(self, line: BatchLine) -> LineResult:
        from ember.errors import ServerBusyError

        while True:
            running = run_on_manager(self.manager, line, self.translate, self.settings, timeout=None)
            try:
                return asyncio.run_coroutine_threadsafe(running, self._loop).result()
            except ServerBusyError as busy:  # more lines than the queue holds: wait as a client of a server would
                time.sleep(busy.retry_after)

    def close(self) -> None:
        if self._loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self.manager.close(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


class ServerExecutor:
    """Lines through a running ember server's OpenAI routes, at low priority."""

    def __init__(self, base_url: str, headers: dict[str, str]) -> None:
        import httpx

        self.base_url = base_url.rstrip("/")
        self.headers = {**headers, PRIORITY_HEADER: "low"}
        self.client = httpx.Client(timeout=httpx.Timeout(30.0, read=None))

    def __call__(self, line: BatchLine) -> LineResult:
        import httpx

        from ember.cli.serving import ServerUnreachableError

        started = time.perf_counter()
        for _ in range(_BUSY_RETRIES):
            try:
                response = self.client.post(self.base_url + line.url, json=line.body, headers=self.headers)
            except httpx.HTTPError:
                raise ServerUnreachableError(
                    f"the ember server at {self.base_url} stopped answering; start it and rerun the same command "
                    "to continue"
                ) from None
            if response.status_code != 503:
                break
            time.sleep(float(response.headers.get("retry-after", "1") or 1))
        try:
            body = response.json()
        except ValueError:
            body = {"error": {"message": response.text, "type": "server_error", "param": None, "code": None}}
        output = response_line(line.custom_id, response.status_code, body)
        return LineResult(line.index, line.custom_id, output, time.perf_counter() - started)

    def close(self) -> None:
        self.client.close()


# --- outputs -----------------------------------------------------------------------------------------------


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.chmod(temporary, 0o644)  # mkstemp makes it private; an output file is an ordinary file
        with os.fdopen(fd, "w", encoding="utf-8") as writer:
            writer.write(text)
            writer.flush()
            os.fsync(writer.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def output_jsonl(lines: list[BatchLine], journal: Journal) -> str:
    """OpenAI batch output JSONL, one line per input line, in input order."""
    return "".join(json.dumps(journal.results[line.index].output) + "\n" for line in lines)


def _answer(output: dict[str, Any]) -> dict[str, Any]:
    """The guide's result fields of one output line: the response text (or embedding), or the error."""
    response = output.get("response") or {}
    body = response.get("body") or {}
    if response.get("status_code") != 200:
        error = body.get("error") or output.get("error") or {}
        return {"error": error.get("message", "failed")}
    if body.get("object") == "list":  # embeddings
        return {"embedding": [item["embedding"] for item in body.get("data", [])]}
    choice = (body.get("choices") or [{}])[0]
    text = choice.get("text") if "text" in choice else (choice.get("message") or {}).get("content")
    return {"response": text or ""}


def per_file_json(lines: list[BatchLine], journal: Journal) -> dict[str, list[dict[str, Any]]]:
    """The guide's shape: for each input file, a list of {prompt, response, tokens, duration} in input order."""
    files: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        result = journal.results[line.index]
        entry = {"custom_id": line.custom_id, "prompt": line.prompt, **_answer(result.output)}
        if result.ok:
            entry.update(tokens=result.tokens, duration=round(result.seconds, 3))
        files.setdefault(line.source, []).append(entry)
    return files


def write_outputs(lines: list[BatchLine], journal: Journal, out: Path | None, output_format: str) -> list[Path]:
    """Write the results (to stdout when `out` is None); the files written."""
    missing = [line.custom_id for line in lines if line.index not in journal.results]
    if missing:
        raise EmberError(f"{len(missing)} line(s) have no result yet (first: {missing[0]}); rerun to finish them")
    if output_format == "jsonl":
        text = output_jsonl(lines, journal)
        if out is None:
            print(text, end="")
            return []
        _atomic_write(out, text)
        return [out]
    files = per_file_json(lines, journal)
    if out is None:
        merged = [entry for entries in files.values() for entry in entries]
        print(json.dumps(merged if len(files) > 1 else next(iter(files.values())), indent=2))
        return []
    written, taken = [], set()
    for source, entries in files.items():
        stem = Path(source).stem or "input"
        name, count = f"{stem}_results.json", 1
        while name in taken:  # two inputs with one stem (a/x.txt, b/x.txt)
            count += 1
            name = f"{stem}_{count}_results.json"
        taken.add(name)
        _atomic_write(out / name, json.dumps(entries, indent=2) + "\n")
        written.append(out / name)
    return written
