"""Circuit breakers: a model whose runner keeps crashing, or that keeps failing to load, is refused at once.

After `threshold` failures (runner crashes, failed loads) within `window` seconds, the model's circuit opens:
its requests get a CircuitOpenError (503 with the reason and Retry-After) without touching a runner, or go
to its fallback models. Once `cooldown` seconds have passed, one request is let through as a probe: if it is
served, the circuit closes; if it fails, the circuit opens again for another cool-down. Every change is a
server event (logged in server.jsonl, counted on /metrics, and alerted, serve/alerts.py).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ember.errors import EmberError
from ember.serve.events import ServerEvents


class CircuitOpenError(EmberError):
    """The model failed too often lately; refused at once until its cool-down ends."""

    http_status = 503

    def __init__(self, name: str, reason: str, retry_after: int) -> None:
        super().__init__(
            f"model {name!r} is failing ({reason}); its circuit is open, so requests are refused for about "
            f"{retry_after} s more: retry then, or name a fallback model (PARAMETER fallback NAME, EMBER_FALLBACKS)"
        )
        self.retry_after = retry_after


@dataclass
class Circuit:
    failures: deque[float] = field(default_factory=deque)
    opened_at: float | None = None
    reason: str = ""
    probing: bool = False  # a request let through after the cool-down is running

    def is_open(self) -> bool:
        return self.opened_at is not None


class CircuitBreakers:
    def __init__(
        self,
        *,
        threshold: int = 3,
        window: float = 60.0,
        cooldown: float = 30.0,
        events: ServerEvents | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = threshold
        self.window = window
        self.cooldown = cooldown
        self.events = events or ServerEvents()
        self.clock = clock
        self.circuits: dict[str, Circuit] = {}

    def admit(self, name: str) -> bool:
        """Raise CircuitOpenError if the model's circuit is open; True when this request is the probe."""
        circuit = self.circuits.get(name)
        if circuit is None or circuit.opened_at is None:
            return False
        left = circuit.opened_at + self.cooldown - self.clock()
        if left > 0 or circuit.probing:
            raise CircuitOpenError(name, circuit.reason, max(1, math.ceil(left)))
        circuit.probing = True
        self.events.emit("circuit_probe", model=name)
        return True

    def failed(self, name: str, reason: str) -> None:
        circuit = self.circuits.setdefault(name, Circuit())
        now = self.clock()
        if circuit.opened_at is not None:
            if circuit.probing:  # the probe failed: another cool-down
                circuit.probing = False
                circuit.opened_at = now
                circuit.reason = reason
                self.events.emit("circuit_open", model=name, reason=reason, cooldown=self.cooldown, probe=True)
            return
        circuit.failures.append(now)
        while circuit.failures and circuit.failures[0] < now - self.window:
            circuit.failures.popleft()
        if len(circuit.failures) >= self.threshold:
            circuit.opened_at = now
            circuit.reason = f"{len(circuit.failures)} failures within {self.window:g} s, the last: {reason}"
            self.events.emit("circuit_open", model=name, reason=circuit.reason, cooldown=self.cooldown, probe=False)

    def succeeded(self, name: str) -> None:
        circuit = self.circuits.get(name)
        if circuit is None:
            return
        if circuit.opened_at is not None and circuit.probing:
            self.events.emit("circuit_closed", model=name)
            circuit.opened_at = None
            circuit.probing = False
            circuit.failures.clear()

    def abandoned(self, name: str) -> None:
        """The probe ended neither served nor failed (its client went away): let another request probe."""
        circuit = self.circuits.get(name)
        if circuit is not None:
            circuit.probing = False
