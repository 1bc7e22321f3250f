"""Server events (loads, unloads, evictions, runner crashes, circuit changes) as JSON lines, and their listeners.

Each event is one line in EMBER_HOME/logs/server.jsonl, in the same shape as the request log, and goes to the
listeners registered here (the alerts, serve/alerts.py): the manager says what happened once, and the log,
the metrics and the alerts all hear it.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
Listener = Callable[[dict[str, Any]], None]


def utc_time(moment: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(moment)) + f".{int(moment % 1 * 1000):03d}Z"


class JsonLines:
    """A JSON-lines file rotated by size (the standard library's RotatingFileHandler, one line per record)."""

    def __init__(self, path: Path, max_bytes: int, backups: int = 3) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.logger = logging.Logger(f"ember.jsonl.{path}")  # not in the logging tree: nothing propagates
        handler = logging.handlers.RotatingFileHandler(path, maxBytes=max_bytes, backupCount=backups, delay=True)
        handler.setFormatter(logging.Formatter("%(message)s"))
        self.logger.addHandler(handler)
        self.handler = handler

    def write(self, record: dict[str, Any]) -> None:
        self.logger.info(json.dumps(record, ensure_ascii=False, default=str))

    def close(self) -> None:
        self.handler.close()


class ServerEvents:
    """Where the manager reports what happens to models and runners. `sink` None: listeners only."""

    def __init__(self, sink: JsonLines | None = None) -> None:
        self.sink = sink
        self.listeners: list[Listener] = []

    def emit(self, event: str, **fields: Any) -> None:
        record = {"time": utc_time(time.time()), "event": event, **fields}
        if self.sink is not None:
            try:
                self.sink.write(record)
            except OSError:  # a full disk loses a log line, not the server
                log.warning("could not write the server log", exc_info=True)
        for listener in list(self.listeners):
            try:
                listener(record)
            except Exception:  # a broken listener must not break the manager
                log.exception("a server event listener failed on %s", event)
