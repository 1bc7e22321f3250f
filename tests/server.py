"""Running a real ember server for tests: in a thread of this process, or as `ember serve` in a subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import uvicorn

from ember.api.app import create_app
from ember.config import Settings


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def running_server(bind: str = "127.0.0.1", **settings: Any) -> Iterator[str]:
    """An ember server in a thread of this process, listening on `bind`; yields its loopback base URL."""
    port = free_port()
    config = Settings(host=f"{bind}:{port}", **settings)
    server = uvicorn.Server(uvicorn.Config(create_app(config), host=bind, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextmanager
def serve_process(env: dict[str, str] | None = None) -> Iterator[tuple[subprocess.Popen[bytes], str, dict[str, str]]]:
    """`ember serve` as a user starts it; yields the process, its base URL and the environment pointing at it."""
    port = free_port()
    environment = {**os.environ, **(env or {}), "EMBER_HOST": f"127.0.0.1:{port}"}
    process = subprocess.Popen(
        [sys.executable, "-m", "ember.cli.main", "serve"],
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"ember serve did not start: {process.stderr.read().decode() if process.stderr else ''}")
        time.sleep(0.1)
    try:
        yield process, base, environment
    finally:
        if process.poll() is None:
            process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


@contextmanager
def serve_subprocess(env: dict[str, str] | None = None) -> Iterator[tuple[str, dict[str, str]]]:
    """`ember serve` as a user starts it; yields its base URL and the environment that points at it."""
    with serve_process(env) as (_, base, environment):
        yield base, environment
