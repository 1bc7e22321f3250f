"""The server's own numbers over the last minute: answers finished, tokens generated and prefilled.

The model manager records each answer's final chunk here; `/api/stats` (and the page's live view) reads a
snapshot. A rolling window of events, not counters since start, so a rate says what the server does now.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

WINDOW_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class _Finished:
    at: float
    model: str
    eval_count: int
    eval_duration: int
    prompt_eval_count: int


class ServerStats:
    def __init__(self, clock: Callable[[], float] = time.monotonic, window: float = WINDOW_SECONDS) -> None:
        self.clock = clock
        self.window = window
        self.started = clock()
        self.answers_total = 0
        self.tokens_total = 0
        self._recent: deque[_Finished] = deque()

    def record(self, chunk: Any) -> None:
        """An answer's final chunk (any object with the Metrics fields and `model`)."""
        self.answers_total += 1
        self.tokens_total += chunk.eval_count
        self._recent.append(
            _Finished(self.clock(), chunk.model, chunk.eval_count, chunk.eval_duration, chunk.prompt_eval_count)
        )
        self._forget_old()

    def _forget_old(self) -> None:
        edge = self.clock() - self.window
        while self._recent and self._recent[0].at < edge:
            self._recent.popleft()

    def snapshot(self) -> dict[str, Any]:
        """Rates over the window (or over the uptime while it is shorter than the window)."""
        self._forget_old()
        span = max(1e-9, min(self.window, self.clock() - self.started))
        generated = sum(item.eval_count for item in self._recent)
        decoding = sum(item.eval_duration for item in self._recent) / 1e9
        return {
            "window_seconds": self.window,
            "answers": len(self._recent),
            "answers_total": self.answers_total,
            "tokens_total": self.tokens_total,
            "tokens_per_second": generated / span,  # what the server produced per wall-clock second
            "decode_tokens_per_second": generated / decoding if decoding else 0.0,  # speed of one answer
            "prompt_tokens": sum(item.prompt_eval_count for item in self._recent),
        }
