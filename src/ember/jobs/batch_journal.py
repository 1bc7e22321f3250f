"""The journal of an `ember batch` run: what is done, so that a rerun of the same command continues.

An append-only JSONL file: a header naming the run (a fingerprint of every line's request, so options and
inputs are part of it), then one record per finished line, written and fsynced as the line finishes. A run
killed at any moment leaves at worst a torn last record, which a reader skips: that line runs again, and since
its result was never recorded it appears once in the output. A line is never lost (it is either recorded or run
again) and never done twice (a recorded line is skipped). Later records of a line win (`--retry-failed`).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

from ember.errors import InvalidRequestError
from ember.jobs.batch_input import BatchLine
from ember.jobs.batch_lines import LineResult

JOURNAL_VERSION = 1


def fingerprint(lines: list[BatchLine]) -> str:
    """Names a run: the same inputs with the same options give the same fingerprint."""
    digest = hashlib.sha256()
    for line in lines:
        digest.update(json.dumps(line.request(), sort_keys=True, separators=(",", ":")).encode())
        digest.update(b"\n")
    return digest.hexdigest()


class Journal:
    """Results of one run, by line index, kept in a file; `record` is safe from several threads."""

    def __init__(self, path: Path, lines: list[BatchLine], *, restart: bool = False) -> None:
        self.path = path
        self.fingerprint = fingerprint(lines)
        self.total = len(lines)
        self.results: dict[int, LineResult] = {}
        self._lock = threading.Lock()
        if restart and path.exists():
            path.unlink()
        if path.exists():
            self._load()
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            header = {"journal": JOURNAL_VERSION, "fingerprint": self.fingerprint, "total": self.total}
            self._append(header)

    def _load(self) -> None:
        with self.path.open("rb") as reader:
            raw = reader.read().decode("utf-8", "replace").split("\n")
        try:
            header = json.loads(raw[0])
        except (json.JSONDecodeError, IndexError):
            header = {}
        if header.get("fingerprint") != self.fingerprint:
            raise InvalidRequestError(
                f"the journal {self.path} belongs to another run (other inputs or options); rerun the same command "
                "to continue that one, or pass --restart to start this one afresh"
            )
        for text in raw[1:]:
            try:
                result = LineResult.from_record(json.loads(text))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue  # a torn last line from a run that was killed while writing: that line runs again
            if 0 <= result.index < self.total:
                self.results[result.index] = result

    def _append(self, value: dict[str, Any]) -> None:
        data = (json.dumps(value, separators=(",", ":")) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def record(self, result: LineResult) -> None:
        with self._lock:
            self._append(result.record())
            self.results[result.index] = result

    def pending(self, lines: list[BatchLine], *, retry_failed: bool = False) -> list[BatchLine]:
        """The lines still to run: not recorded yet, or (with retry_failed) recorded as failed."""
        return [
            line
            for line in lines
            if line.index not in self.results or (retry_failed and not self.results[line.index].ok)
        ]
