"""`ember serve`'s uvicorn server, with SIGTERM handled as a graceful stop.

uvicorn alone waits `timeout_graceful_shutdown` for responses in flight, then cancels them: a stream still
running is cut without a word, and the process re-raises the signal, so it exits -15 (and systemd or Docker
report a failure). Here the answers still running get EMBER_SHUTDOWN_GRACE seconds, after which each ends
with an error line saying why (serve/deadlines.py), uvicorn's own limit comes only after that, and a stop
that went as planned exits 0.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Generator

import uvicorn
from fastapi import FastAPI

# Time for the error lines to reach their clients after the grace period, before uvicorn cancels what is left.
_AFTER_GRACE = 5.0


class GracefulServer(uvicorn.Server):
    def __init__(self, app: FastAPI, *, host: str, port: int, grace: float) -> None:
        config = uvicorn.Config(
            app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=int(grace + _AFTER_GRACE)
        )
        super().__init__(config)
        self.app = app
        self.grace = grace

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        manager = getattr(self.app.state, "manager", None)
        if manager is not None:
            manager.deadlines.shut_down(self.grace)
        await super().shutdown(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        with super().capture_signals():
            yield
            # uvicorn raises the signal again once it has stopped, which makes a clean stop exit -15.
            self._captured_signals.clear()


def serve_app(app: FastAPI, host: str, port: int, grace: float) -> None:
    """Serve until SIGTERM or Ctrl-C, then stop gracefully (see the module's docstring)."""
    GracefulServer(app, host=host, port=port, grace=grace).run()
