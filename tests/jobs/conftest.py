"""Fixtures for the jobs: one real RabbitMQ broker per session, `ember worker` processes, an AMQP test client."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from tests.rabbitmq import Broker

# Small and greedy, so 50 answers take seconds: a short context, a few tokens each.
# One thread: on a busy two-core machine llama.cpp with two threads waits on its own barrier (5x slower).
OPTIONS = {"num_ctx": 256, "num_predict": 6, "temperature": 0, "repeat_penalty": 1.0, "num_thread": 1}


@pytest.fixture(scope="session")
def rabbitmq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    with Broker(tmp_path_factory.mktemp("rabbitmq")) as broker:
        yield broker


@pytest.fixture
def queue_name() -> str:
    """A queue of the test's own on the shared broker."""
    return f"test-{uuid.uuid4().hex[:10]}"


class WorkerProcess:
    """`ember worker` as a user starts it, its stderr kept in a file for the failure message."""

    def __init__(self, url: str, queue: str, log: Path, *args: str) -> None:
        self.log = log
        environment = {**os.environ, "EMBER_LOG_LEVEL": "INFO"}
        command = [sys.executable, "-m", "ember.cli.main", "worker", "--amqp", url, "--queue", queue]
        command += ["--results", f"{queue}.results", "--parallel", "4", *args]
        with log.open("ab") as output:
            self.process = subprocess.Popen(
                command, env=environment, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def signal(self, number: int) -> None:
        self.process.send_signal(number)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)


@pytest.fixture
def start_worker(rabbitmq: Broker, queue_name: str, tmp_path: Path) -> Iterator[Any]:
    """start_worker(*args) -> a running WorkerProcess on the test's queue; every one is killed at the end."""
    started: list[WorkerProcess] = []

    def start(*args: str, queue: str | None = None) -> WorkerProcess:
        worker = WorkerProcess(rabbitmq.url, queue or queue_name, tmp_path / f"worker-{len(started)}.log", *args)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


class Client:
    """The test's side of the broker: publish requests, read answers, look into queues (asyncio, aio-pika)."""

    def __init__(self, connection: aio_pika.abc.AbstractConnection, channel: aio_pika.abc.AbstractChannel) -> None:
        self.connection = connection
        self.channel = channel

    @classmethod
    async def connect(cls, url: str) -> Client:
        connection = await aio_pika.connect(url, timeout=30)
        return cls(connection, await connection.channel(publisher_confirms=True))

    async def close(self) -> None:
        await self.connection.close()

    async def declare(self, queue: str) -> aio_pika.abc.AbstractQueue:
        """The request queue as the worker declares it (durable, priorities), so messages can wait for it."""
        return await self.channel.declare_queue(queue, durable=True, arguments={"x-max-priority": 9})

    async def publish(self, queue: str, body: dict[str, Any] | bytes, **properties: Any) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        message = aio_pika.Message(data, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, **properties)
        await self.channel.default_exchange.publish(message, routing_key=queue)

    async def messages(self, queue: str, count: int, timeout: float, *, settle: float = 0.0) -> list[Any]:
        """Read `count` messages from a queue (acknowledging them), then `settle` seconds more for extras."""
        source = await self.channel.declare_queue(queue, passive=True)
        received: list[Any] = []
        deadline, settled_at = time.monotonic() + timeout, None
        while True:
            if len(received) >= count and settled_at is None:
                settled_at = time.monotonic() + settle
            message = await source.get(no_ack=True, fail=False)
            if message is None:
                if time.monotonic() >= (settled_at if settled_at is not None else deadline):
                    break
                await asyncio.sleep(0.05)
                continue
            received.append(message)
        return received

    async def answers(self, queue: str, correlation_ids: set[str], timeout: float) -> list[Any]:
        """Read a reply queue until each correlation id has its final message (an answer or an error)."""
        received: list[Any] = []
        deadline = time.monotonic() + timeout
        while {m.correlation_id for m in received if m.type in ("answer", "error")} < correlation_ids:
            if time.monotonic() > deadline:
                break
            received += await self.messages(queue, 1, timeout=max(0.1, deadline - time.monotonic()))
        return received

    async def depth(self, queue: str) -> tuple[int, int]:
        """(messages ready, consumers) of a queue."""
        declared = await self.channel.declare_queue(queue, passive=True)
        result = declared.declaration_result
        return result.message_count or 0, result.consumer_count or 0

    async def wait_for_consumer(self, queue: str, worker: WorkerProcess, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if (await self.depth(queue))[1] > 0:
                    return
            except aio_pika.exceptions.ChannelNotFoundEntity:  # not declared yet: the channel closed; reopen
                self.channel = await self.connection.channel(publisher_confirms=True)
            if worker.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the worker did not start consuming:\n{worker.output()}")
            await asyncio.sleep(0.2)


def answer_body(message: Any) -> dict[str, Any]:
    return json.loads(message.body)


class Webhook:
    """An HTTP endpoint on 127.0.0.1 that records the JSON bodies POSTed to it and answers `status`."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        owner = self
        self.bodies: list[dict[str, Any]] = []
        self.status = 200

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                owner.bodies.append(json.loads(self.rfile.read(length)))
                self.send_response(owner.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        import threading

        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    yield hook
    hook.server.shutdown()
    hook.server.server_close()
