"""The server's batches: each runs as a task on the server's event loop, its lines through the model manager.

Life of a batch, as OpenAI's: `validating` (every line checked against the batch's endpoint) -> `in_progress`
(lines run at low priority in the queue's batch class, at most EMBER_BATCH_SLOTS of a model's slots, so
interactive requests keep their latency) -> `finalizing` (the output and error files are written) ->
`completed`. A failed validation ends in `failed` with per-line errors; a cancel goes through `cancelling`
(lines in flight finish, no new one starts) to `cancelled`; the end of the completion window cancels the lines
in flight and ends in `expired`. In every ending the lines that finished are in the output file, and (for
cancelled and expired batches) the lines that never ran are in the error file with OpenAI's codes.

Durability: every finished line is stored at once (see batch_store), and at start the server resumes every
batch that had not ended, running only the lines with no stored result. A line that was in flight when the
server died runs again; one whose result was stored never does, so each line ends up in the output once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from typing import Any

from ember.errors import EmberError, InvalidRequestError, RequestTimeoutError, ServerBusyError
from ember.jobs.batch_db import batch_database
from ember.jobs.batch_input import SUPPORTED_URLS, BatchInputError, BatchLine, decode_text, parse_openai_jsonl
from ember.jobs.batch_lines import CANCELLED, EXPIRED, Translate, run_on_manager, unrun_line
from ember.jobs.batch_store import BatchStore
from ember.jobs.files import FileStore, derived_file_id

log = logging.getLogger(__name__)

MAX_WINDOW_S = 24 * 3600
_WINDOW = re.compile(r"(\d+)([smh])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600}


class BatchConflictError(InvalidRequestError):
    """The batch is in a state that does not allow this (cancelling a completed batch)."""

    http_status = 409


def parse_window(text: Any) -> float:
    """Seconds of a completion window: OpenAI's "24h", or (an ember addition) any shorter "Ns", "Nm", "Nh"."""
    match = _WINDOW.fullmatch(text) if isinstance(text, str) else None
    seconds = int(match.group(1)) * _UNIT_S[match.group(2)] if match else 0
    if not 0 < seconds <= MAX_WINDOW_S:
        raise InvalidRequestError(f'completion_window must be "24h" (or a shorter duration such as "1h"), not {text!r}')
    return float(seconds)


def check_metadata(metadata: Any) -> dict[str, str] | None:
    """OpenAI's metadata rules: at most 16 pairs, keys up to 64 characters, string values up to 512."""
    if metadata is None:
        return None
    if not isinstance(metadata, dict) or len(metadata) > 16:
        raise InvalidRequestError("metadata must be an object of at most 16 key-value pairs")
    for key, value in metadata.items():
        if len(key) > 64 or not isinstance(value, str) or len(value) > 512:
            raise InvalidRequestError("metadata keys are at most 64 characters, values strings of at most 512")
    return dict(metadata)


class BatchService:
    """Creates, runs, resumes and cancels the server's batches."""

    def __init__(self, manager: Any, settings: Any, translate: Translate) -> None:
        self.manager = manager
        self.settings = settings
        self.translate = translate
        self.database = batch_database(settings.home / "ember.db")
        self.files = FileStore(settings.home / "files", self.database)
        self.batches = BatchStore(self.database)
        self.in_flight = settings.num_parallel  # lines started at once; the queue's batch cap decides how many run
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._cancels: dict[str, asyncio.Event] = {}

    # --- lifecycle -------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Resume every batch that had not ended when the server last stopped."""
        for batch_id in await asyncio.to_thread(self.batches.active):
            log.info("resuming batch %s", batch_id)
            self._launch(batch_id)

    async def close(self) -> None:
        """Stop the running batches where they are (they resume at the next start)."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _launch(self, batch_id: str) -> None:
        self._cancels[batch_id] = asyncio.Event()
        task = asyncio.create_task(self._run(batch_id), name=f"batch {batch_id}")
        self._tasks[batch_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(batch_id, None))

    async def wait(self, batch_id: str) -> None:
        """Until the batch's task ends (for tests and shutdown)."""
        task = self._tasks.get(batch_id)
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(task)

    # --- API -------------------------------------------------------------------------------------------

    async def create(self, body: dict[str, Any]) -> dict[str, Any]:
        endpoint = body.get("endpoint")
        if endpoint not in SUPPORTED_URLS:
            raise InvalidRequestError(f"endpoint must be one of {', '.join(SUPPORTED_URLS)}, not {endpoint!r}")
        window = body.get("completion_window")
        seconds = parse_window(window)
        metadata = check_metadata(body.get("metadata"))
        input_file_id = body.get("input_file_id")
        if not isinstance(input_file_id, str):
            raise InvalidRequestError("input_file_id must be the id of a file uploaded with purpose=batch")
        found = await asyncio.to_thread(self.files.get, input_file_id)
        if found["purpose"] != "batch":
            raise InvalidRequestError(f"file {input_file_id} has purpose {found['purpose']}; upload with purpose=batch")
        try:
            lines = await asyncio.to_thread(self._read_lines, input_file_id)
        except BatchInputError:
            lines = []  # validation reports it, with line numbers
        model = next((line.body.get("model") for line in lines if isinstance(line.body.get("model"), str)), None)
        batch = await asyncio.to_thread(
            lambda: self.batches.create(
                input_file_id=input_file_id,
                endpoint=endpoint,
                completion_window=window,
                window_seconds=seconds,
                metadata=metadata,
                total=len(lines),
                model=model,
            )
        )
        self._launch(batch["id"])
        return batch

    async def cancel(self, batch_id: str) -> dict[str, Any]:
        batch = await asyncio.to_thread(self.batches.get, batch_id)
        if batch["status"] in ("cancelling", "cancelled"):
            return batch
        if batch["status"] not in ("validating", "in_progress"):
            raise BatchConflictError(f"Cannot cancel a batch with status {batch['status']}.")
        batch = await asyncio.to_thread(
            lambda: self.batches.update(
                batch_id, only_from=("validating", "in_progress"), status="cancelling", cancelling_at=int(time.time())
            )
        )
        event = self._cancels.get(batch_id)
        if event is not None:
            event.set()
        if batch_id not in self._tasks:  # its task ended meanwhile: finish the cancel here
            self._launch(batch_id)
        return batch

    # --- running ---------------------------------------------------------------------------------------

    def _read_lines(self, file_id: str) -> list[BatchLine]:
        return parse_openai_jsonl(decode_text(self.files.read(file_id), file_id), source=file_id)

    def _validated_lines(self, batch: dict[str, Any]) -> list[BatchLine]:
        lines = self._read_lines(batch["input_file_id"])
        wrong = [
            (line.line, f"url {line.url} differs from the batch's endpoint {batch['endpoint']}")
            for line in lines
            if line.url != batch["endpoint"]
        ]
        if wrong:
            raise BatchInputError(batch["input_file_id"], wrong)
        return lines

    async def _run(self, batch_id: str) -> None:
        try:
            batch = await asyncio.to_thread(self.batches.get, batch_id)
            lines: list[BatchLine] = []
            status = batch["status"]
            if status in ("validating", "in_progress", "cancelling", "finalizing"):
                try:
                    lines = await asyncio.to_thread(self._validated_lines, batch)
                except EmberError as error:  # a bad line, or the input file was deleted meanwhile
                    await self._fail(batch_id, error)
                    return
            if status == "validating":
                batch = await asyncio.to_thread(
                    lambda: self.batches.update(
                        batch_id, only_from=("validating",), status="in_progress", in_progress_at=int(time.time())
                    )
                )
                status = batch["status"]
            ending = {"cancelling": "cancelled", "finalizing": "completed"}.get(status)
            if status == "in_progress":
                ending = await self._run_lines(batch, lines)
            if ending is not None:
                await self._finalize(batch_id, lines, ending)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("batch %s stopped by an unexpected error; it resumes at the next start", batch_id)

    async def _fail(self, batch_id: str, error: Exception) -> None:
        problems = error.problems if isinstance(error, BatchInputError) else [(None, str(error))]
        data = [
            {"code": "invalid_request", "line": line, "message": message, "param": None} for line, message in problems
        ]
        await asyncio.to_thread(
            lambda: self.batches.update(
                batch_id, status="failed", failed_at=int(time.time()), errors={"object": "list", "data": data}
            )
        )

    async def _run_lines(self, batch: dict[str, Any], lines: list[BatchLine]) -> str:
        """Run the lines with no result yet; how the batch ends: completed, cancelled or expired."""
        batch_id, deadline = batch["id"], float(batch["expires_at"])
        cancelled = self._cancels.setdefault(batch_id, asyncio.Event())
        done = await asyncio.to_thread(self.batches.results, batch_id)
        pending = iter([line for line in lines if line.index not in done])
        expired = asyncio.Event()

        async def worker() -> None:
            for line in pending:  # one iterator shared by the workers: each line is taken once
                if cancelled.is_set():
                    return
                while True:
                    try:
                        timeout = max(0.001, deadline - time.time())
                        result = await run_on_manager(
                            self.manager, line, self.translate, self.settings, timeout=timeout
                        )
                        break
                    except ServerBusyError as busy:  # the queue is full of other requests: wait, not fail
                        await asyncio.sleep(busy.retry_after)
                    except RequestTimeoutError:
                        expired.set()
                        return
                await asyncio.to_thread(self.batches.record, batch_id, result)

        workers = asyncio.gather(*(worker() for _ in range(max(1, self.in_flight))))
        waiting = asyncio.create_task(expired.wait())
        try:
            finished, _ = await asyncio.wait(
                {workers, waiting}, timeout=max(0.0, deadline - time.time()), return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            waiting.cancel()
        if workers not in finished:  # the window ran out: lines in flight are cancelled, their slots freed
            workers.cancel()
            await asyncio.gather(workers, return_exceptions=True)
            return "expired"
        workers.result()
        if expired.is_set():
            return "expired"
        status = (await asyncio.to_thread(self.batches.get, batch_id))["status"]
        return "cancelled" if cancelled.is_set() or status == "cancelling" else "completed"

    async def _finalize(self, batch_id: str, lines: list[BatchLine], ending: str) -> None:
        """Write the output and error files and end the batch. Safe to repeat (after a restart): the files'
        ids are derived from the batch's, so a second pass replaces the first's."""
        now = int(time.time())
        if ending == "completed":
            await asyncio.to_thread(
                lambda: self.batches.update(
                    batch_id, only_from=("in_progress", "finalizing"), status="finalizing", finalizing_at=now
                )
            )
        results = await asyncio.to_thread(self.batches.results, batch_id)
        reason = EXPIRED if ending == "expired" else CANCELLED
        outputs, errors = [], []
        for line in lines:
            if line.index in results:
                ok, output = results[line.index]
                (outputs if ok else errors).append(output)
            else:
                errors.append(unrun_line(line.custom_id, reason))

        def write() -> dict[str, Any]:
            fields: dict[str, Any] = {"status": ending, f"{ending}_at": int(time.time())}
            for kind, entries in (("output", outputs), ("error", errors)):
                file_id = None
                if entries:
                    data = "".join(_json_line(entry) for entry in entries).encode()
                    name = f"{batch_id}_{kind}.jsonl"
                    file_id = self.files.add_bytes(
                        data, filename=name, purpose="batch_output", file_id=derived_file_id(batch_id, kind)
                    )["id"]
                fields[f"{kind}_file_id"] = file_id
            return self.batches.update(batch_id, **fields)

        await asyncio.to_thread(write)
        log.info("batch %s %s", batch_id, ending)


def _json_line(value: Any) -> str:
    return json.dumps(value) + "\n"
