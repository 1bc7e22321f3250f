"""What every runner process shares, whatever engine it runs: starting from the server's pipe, the load and
its Ready or LoadFailed answer, and the loop's outbox (events batched per step, runner stats rate-limited).

Nothing here imports an engine: the llama.cpp runner (runner/process.py) and the transformers runner
(engine_transformers/runner.py) each bring their own.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, TypeVar

from ember.options import LoadOptions
from ember.runner.protocol import Event, LoadFailed, Ready, RunnerStats, Steps, Text, error_to_tuple
from ember.store.resolve import ModelSource

FLUSH_INTERVAL = 0.025  # seconds plain text may wait to travel with later text (see RunnerLoop.flush)
MAX_FLUSH_INTERVAL = 0.1  # the longest it waits: with many streams on a model that decodes on the CPU
STATS_INTERVAL = 1.0  # seconds between the runner's reports of its KV cells and memory (for /metrics)
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

Loaded = TypeVar("Loaded")


def resident_bytes() -> int:
    """This process's resident memory now (Linux's /proc; elsewhere the peak, which is what the OS tells)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def flush_interval(streams: int, *, on_cpu: bool) -> float:
    """How long plain text may wait to travel with later text, with `streams` sequences generating.

    Each piece of text that travels alone becomes a chunk that the server writes and its client parses: about
    0.2 ms of the server's CPU and 0.6 ms of the openai client's per chunk (measured with 8 streams). When the
    model decodes on the CPU, that time is taken from llama.cpp's threads, on every core they run on; so the
    wait grows with the streams (FLUSH_INTERVAL per 2 of them, up to MAX_FLUSH_INTERVAL), and a chunk carries
    the text of several steps. With 8 streams on 2 cores that is about 7% more tokens a second. On a GPU the
    CPU has time to spare: the wait stays short.
    """
    if not on_cpu:
        return FLUSH_INTERVAL
    return min(MAX_FLUSH_INTERVAL, max(FLUSH_INTERVAL, FLUSH_INTERVAL * streams / 2))


class RunnerLoop:
    """The outbox of a runner's loop: what its steps produced, sent in one message per step."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.events: list[Event] = []
        self.urgent = False  # an event the server should see now: a first token, an end, an error
        self.last_flush = self.last_stats = 0.0
        self.flush_interval = FLUSH_INTERVAL  # set by the loop from its streams (see flush_interval)
        self.running = True
        self.stats_sent: RunnerStats | None = None

    def current_stats(self) -> RunnerStats:
        raise NotImplementedError

    def flush(self, *, force: bool = False) -> None:
        """Send what the steps produced. Plain text waits up to `flush_interval` to travel with the next steps'
        text: each message wakes the server (and its client), and on a small machine every wake-up can delay
        the engine's worker threads. A first token, an end or an error goes at once."""
        if not self.events:
            return
        now = time.monotonic()
        if not force and not self.urgent and now - self.last_flush < self.flush_interval:
            return
        events, self.events = coalesced(self.events), []
        self.urgent = False
        self.last_flush = now
        self.connection.send(Steps(events))

    def report_stats(self, *, force: bool = False) -> None:
        """Send the numbers /metrics shows, at most once per STATS_INTERVAL (and once more on going idle)."""
        now = time.monotonic()
        if not force and now - self.last_stats < STATS_INTERVAL:
            return
        self.last_stats = now
        stats = self.current_stats()
        if stats != self.stats_sent:
            self.stats_sent = stats
            self.connection.send(stats)


def coalesced(events: list[Event]) -> list[Event]:
    """The events with each choice's consecutive pieces of text joined into one Text (when nothing else of its
    request came between them): every Text becomes a chunk that the server writes and the client parses, so
    several steps' text in one message should make one chunk, not one per token."""
    merged: list[Event] = []
    latest: dict[tuple[str, int], int] = {}  # (request, choice) -> where its latest Text is in `merged`
    for event in events:
        if isinstance(event, Text):
            key = (event.request_id, event.index)
            position = latest.get(key)
            if position is not None:
                before = merged[position]
                assert isinstance(before, Text)
                if not (before.text and event.thinking):  # thinking after content stays a chunk of its own
                    merged[position] = Text(
                        event.request_id,
                        before.text + event.text,
                        event.index,
                        before.logprobs + event.logprobs,
                        before.thinking + event.thinking,
                        before.tokens + event.tokens,
                    )
                    continue
            latest[key] = len(merged)
        else:
            for key in [key for key in latest if key[0] == event.request_id]:
                del latest[key]
        merged.append(event)
    return merged


def host_runner(
    load: Callable[[ModelSource, LoadOptions], Loaded],
    facts: Callable[[Loaded], dict[str, Any]],
    serve: Callable[[Connection, Loaded], None],
    close: Callable[[Loaded], None],
) -> None:
    """`python -m MODULE FD`: the server passes one end of a socket pair as FD, then the model to load.

    A fresh interpreter (not multiprocessing's spawn) so that nothing of the server's own main module is
    imported again here: a user's script that starts a server needs no `if __name__ == "__main__"` guard.
    Load, answer Ready with the runner's facts (or LoadFailed), serve until shut down or the server goes away.
    """
    connection = Connection(int(sys.argv[1]))
    try:
        _, source, options, log_level = connection.recv()
    except (EOFError, OSError):
        return
    logging.basicConfig(level=log_level, format=f"ember runner {os.getpid()}: %(levelname)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's to handle; it shuts runners down
    try:
        loaded = load(source, options)
    except BaseException as error:
        connection.send(LoadFailed(error_to_tuple(error)))
        connection.close()
        return
    connection.send(Ready({"pid": os.getpid(), "num_parallel": options.num_parallel, **facts(loaded)}))
    try:
        serve(connection, loaded)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the server went away
    finally:
        close(loaded)
        connection.close()
