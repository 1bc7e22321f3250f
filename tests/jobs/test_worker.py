"""`ember worker` against a real RabbitMQ broker, answering with the real default model.

Each test has its own queues on the session's broker and its own EMBER_HOME (so its own request ledger); the
workers are real `ember worker` processes, killed or stopped as a user would.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.jobs.conftest import OPTIONS, Client, answer_body
from tests.rabbitmq import Broker

pytestmark = pytest.mark.slow


def _request(index: int, **extra: Any) -> dict[str, Any]:
    return {"request_id": f"r{index}", "prompt": f"Count to {index % 7 + 2}.", "options": OPTIONS, **extra}


def _ledger(home: Path) -> dict[str, tuple[str, int]]:
    with sqlite3.connect(home / "ember.db") as db:
        rows = db.execute("SELECT request_id, status, deliveries FROM worker_requests").fetchall()
    return {request_id: (status, deliveries) for request_id, status, deliveries in rows}


def test_fifty_requests_get_fifty_answers_with_their_correlation_ids(
    rabbitmq: Broker, queue_name: str, start_worker: Any
) -> None:
    worker = start_worker()

    async def scenario() -> list[Any]:
        client = await Client.connect(rabbitmq.url)
        try:
            await client.wait_for_consumer(queue_name, worker)
            replies = await client.channel.declare_queue(exclusive=True)
            for index in range(50):
                await client.publish(queue_name, _request(index), correlation_id=f"corr-{index}", reply_to=replies.name)
            return await client.messages(replies.name, 50, timeout=600, settle=2.0)
        finally:
            await client.close()

    answers = asyncio.run(scenario())
    assert len(answers) == 50, worker.output()
    assert sorted(m.correlation_id for m in answers) == sorted(f"corr-{i}" for i in range(50))
    for message in answers:
        body = answer_body(message)
        assert message.type == "answer"
        assert body["request_id"] == f"r{message.correlation_id.removeprefix('corr-')}"
        assert body["done"] is True and body["response"].strip()
        assert body["eval_count"] > 0 and body["total_duration"] > 0 and body["prompt_eval_count"] > 0


async def _wait_for_depth(client: Client, queue: str, at_least: int, worker: Any, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while (await client.depth(queue))[0] < at_least:
        if worker.process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{queue} did not reach {at_least} messages:\n{worker.output()}")
        await asyncio.sleep(0.1)


def test_a_worker_killed_mid_batch_loses_nothing_and_a_second_one_answers_each_request_once(
    rabbitmq: Broker, queue_name: str, start_worker: Any, tmp_path: Path
) -> None:
    results = f"{queue_name}.results"
    count = 20

    async def scenario() -> list[Any]:
        client = await Client.connect(rabbitmq.url)
        try:
            await client.declare(queue_name)
            await client.channel.declare_queue(results, durable=True)
            for index in range(count):
                await client.publish(queue_name, _request(index))
            first = start_worker()
            await _wait_for_depth(client, results, 3, first)
            # Killed mid-batch, holding up to four requests it has not answered, but not in the millisecond
            # between an answer's publish and its ledger entry (a kill there answers twice: see worker.py).
            home, deadline = Path(os.environ["EMBER_HOME"]), time.monotonic() + 60
            while (await client.depth(results))[0] != sum(s == "answered" for s, _ in _ledger(home).values()):
                assert first.process.poll() is None and time.monotonic() < deadline, first.output()
                await asyncio.sleep(0.005)
            first.signal(signal.SIGKILL)
            await asyncio.to_thread(first.wait, 30)
            start_worker()
            return await client.messages(results, count, timeout=600, settle=3.0)
        finally:
            await client.close()

    answers = asyncio.run(scenario())
    answered = Counter(answer_body(message)["request_id"] for message in answers)
    assert set(answered) == {f"r{i}" for i in range(count)}
    assert max(answered.values()) == 1, [request for request, times in answered.items() if times > 1]
    ledger = _ledger(Path(os.environ["EMBER_HOME"]))
    assert {status for status, _ in ledger.values()} == {"answered"}
    assert any(deliveries == 2 for _, deliveries in ledger.values()), "no request was in hand when the worker died"


def test_a_redelivered_request_that_was_answered_is_not_answered_again(
    rabbitmq: Broker, queue_name: str, start_worker: Any
) -> None:
    results = f"{queue_name}.results"
    worker = start_worker()

    async def scenario() -> tuple[list[Any], tuple[int, int]]:
        client = await Client.connect(rabbitmq.url)
        try:
            await client.wait_for_consumer(queue_name, worker)
            await client.publish(queue_name, _request(1))
            first = await client.messages(results, 1, timeout=300)
            await client.publish(queue_name, _request(1))  # the same request_id again, as a redelivery brings it
            await client.publish(queue_name, _request(2))  # answered after it: by then the copy was handled
            later = await client.messages(results, 1, timeout=300, settle=2.0)
            return first + later, await client.depth(queue_name)
        finally:
            await client.close()

    answers, (waiting, _) = asyncio.run(scenario())
    assert [answer_body(m)["request_id"] for m in answers] == ["r1", "r2"]
    assert waiting == 0  # the copy was acknowledged, not left in the queue
    assert "answered already" in worker.output()


def test_malformed_and_unanswerable_messages_go_to_the_dead_letter_queue_with_their_error(
    rabbitmq: Broker, queue_name: str, start_worker: Any
) -> None:
    worker = start_worker()
    bad = [
        (b"this is not json", "not JSON"),
        (b'["a", "list"]', "must be a JSON object"),
        (b'{"request_id": "bad-option", "prompt": "hi", "options": {"temperature": "hot"}}', "temperature"),
        (b'{"request_id": "no-model", "model": "no-such-model", "prompt": "hi"}', "no-such-model"),
    ]

    async def scenario() -> tuple[list[Any], list[Any], list[Any]]:
        client = await Client.connect(rabbitmq.url)
        try:
            await client.wait_for_consumer(queue_name, worker)
            replies = await client.channel.declare_queue(exclusive=True)
            for index, (body, _) in enumerate(bad):
                await client.publish(queue_name, body, correlation_id=f"bad-{index}", reply_to=replies.name)
            await client.publish(queue_name, _request(7), correlation_id="good", reply_to=replies.name)
            answers = await client.messages(replies.name, len(bad) + 1, timeout=300)
            dead = await client.messages(f"{queue_name}.dead", len(bad), timeout=60, settle=1.0)
            return answers, dead, await client.messages(queue_name, 0, timeout=0)
        finally:
            await client.close()

    answers, dead, left = asyncio.run(scenario())
    assert not left
    assert sorted(m.body for m in dead) == sorted(body for body, _ in bad)  # as they came, nothing lost
    for message in dead:
        expected = next(text for body, text in bad if body == message.body)
        assert expected in message.headers["x-ember-error"], message.headers
        assert message.headers["x-ember-queue"] == queue_name
    by_id = {m.correlation_id: m for m in answers}
    for index, (_, text) in enumerate(bad):  # each RPC caller hears why, instead of waiting forever
        assert by_id[f"bad-{index}"].type == "error" and text in answer_body(by_id[f"bad-{index}"])["error"]
    assert by_id["good"].type == "answer" and answer_body(by_id["good"])["response"]


def test_a_request_that_fails_every_time_is_dead_lettered_after_max_attempts(
    rabbitmq: Broker, queue_name: str, start_worker: Any
) -> None:
    from tests.server import free_port

    nobody = f"http://127.0.0.1:{free_port()}"  # no server there: every attempt fails, for a reason that may pass
    worker = start_worker("--server", nobody, "--max-attempts", "3")

    async def scenario() -> tuple[list[Any], list[Any]]:
        client = await Client.connect(rabbitmq.url)
        try:
            await client.wait_for_consumer(queue_name, worker)
            await client.publish(queue_name, _request(1))
            dead = await client.messages(f"{queue_name}.dead", 1, timeout=120)
            return dead, await client.messages(f"{queue_name}.results", 0, timeout=0, settle=1.0)
        finally:
            await client.close()

    dead, answers = asyncio.run(scenario())
    assert not answers
    assert len(dead) == 1 and answer_body(dead[0])["request_id"] == "r1"
    assert dead[0].headers["x-ember-attempts"] == 3
    assert "failed 3 times" in dead[0].headers["x-ember-error"]
    assert "could not reach the ember server" in dead[0].headers["x-ember-error"]
    assert worker.output().count("failed (attempt") == 2  # tried again twice, from the tail of the queue


def test_the_worker_reconnects_after_a_broker_restart_and_finishes(
    rabbitmq: Broker, queue_name: str, start_worker: Any
) -> None:
    results = f"{queue_name}.results"
    count = 20

    async def publish_and_wait_for_some() -> Any:
        client = await Client.connect(rabbitmq.url)
        try:
            await client.declare(queue_name)
            await client.channel.declare_queue(results, durable=True)
            for index in range(count):
                await client.publish(queue_name, _request(index))
            worker = start_worker()
            await _wait_for_depth(client, results, 3, worker)
            return worker
        finally:
            await client.close()

    async def read_answers() -> list[Any]:
        client = await Client.connect(rabbitmq.url)
        try:
            return await client.messages(results, count, timeout=600, settle=3.0)
        finally:
            await client.close()

    worker = asyncio.run(publish_and_wait_for_some())
    rabbitmq.restart(down_seconds=3)
    answers = asyncio.run(read_answers())
    answered = Counter(answer_body(message)["request_id"] for message in answers)
    assert set(answered) == {f"r{i}" for i in range(count)}, worker.output()
    assert max(answered.values()) == 1
    assert worker.process.poll() is None
    assert "cannot reach the broker" in worker.output()  # it was down for a while: the worker backed off


def test_sigterm_finishes_the_messages_in_hand_then_stops(
    rabbitmq: Broker, queue_name: str, start_worker: Any, tmp_path: Path
) -> None:
    results = f"{queue_name}.results"
    count = 16

    async def scenario() -> tuple[Any, list[Any], int]:
        client = await Client.connect(rabbitmq.url)
        try:
            await client.declare(queue_name)
            await client.channel.declare_queue(results, durable=True)
            for index in range(count):
                await client.publish(queue_name, _request(index))
            worker = start_worker()
            await _wait_for_depth(client, results, 1, worker)
            worker.signal(signal.SIGTERM)
            assert await asyncio.to_thread(worker.wait, 300) == 0, worker.output()
            answers = await client.messages(results, count, timeout=2)
            return worker, answers, (await client.depth(queue_name))[0]
        finally:
            await client.close()

    worker, answers, waiting = asyncio.run(scenario())
    assert "finishing the messages in hand" in worker.output()
    assert 1 <= len(answers) < count and len(answers) + waiting == count  # answered or still queued: none lost
    ledger = _ledger(Path(os.environ["EMBER_HOME"]))
    assert {status for status, _ in ledger.values()} == {"answered"}  # nothing it took was left unfinished


def test_higher_priority_messages_are_answered_first(rabbitmq: Broker, queue_name: str, start_worker: Any) -> None:
    results = f"{queue_name}.results"

    async def scenario() -> list[Any]:
        client = await Client.connect(rabbitmq.url)
        try:
            await client.declare(queue_name)
            await client.channel.declare_queue(results, durable=True)
            for index in range(4):
                await client.publish(queue_name, _request(index))  # no priority: ember's "low"
            for index in range(4, 8):
                await client.publish(queue_name, _request(index), priority=9)
            start_worker("--parallel", "1", "--prefetch", "1")
            return await client.messages(results, 8, timeout=300)
        finally:
            await client.close()

    order = [answer_body(message)["request_id"] for message in asyncio.run(scenario())]
    assert set(order[:4]) == {"r4", "r5", "r6", "r7"} and set(order[4:]) == {"r0", "r1", "r2", "r3"}


def test_streamed_answers_openai_bodies_and_a_vanished_reply_to(
    rabbitmq: Broker, queue_name: str, start_worker: Any
) -> None:
    worker = start_worker()
    # Sampling options only, as an OpenAI body has: all four requests share one loaded model, no reload.
    sampling = {"num_predict": 6, "temperature": 0, "repeat_penalty": 1.0}
    chat = {"messages": [{"role": "user", "content": "Say hello."}], "options": sampling, "stream": True}
    openai = {"model": "smollm2", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 6}
    openai |= {"temperature": 0, "repeat_penalty": 1.0}

    async def scenario() -> tuple[list[Any], list[Any]]:
        client = await Client.connect(rabbitmq.url)
        try:
            await client.wait_for_consumer(queue_name, worker)
            replies = await client.channel.declare_queue(exclusive=True)
            await client.publish(queue_name, {"request_id": "s1", **chat}, correlation_id="s1", reply_to=replies.name)
            await client.publish(queue_name, openai, message_id="o1", correlation_id="o1", reply_to=replies.name)
            await client.publish(
                queue_name, openai | {"stream": True}, message_id="o2", correlation_id="o2", reply_to=replies.name
            )
            gone = _request(3, options=sampling)
            await client.publish(queue_name, gone, correlation_id="gone", reply_to="nobody-listens-here")
            received = await client.answers(replies.name, {"s1", "o1", "o2"}, timeout=300)
            rerouted = await client.messages(f"{queue_name}.results", 1, timeout=120)
            return received, rerouted
        finally:
            await client.close()

    received, rerouted = asyncio.run(scenario())
    stream = [answer_body(m) for m in received if m.correlation_id == "s1"]
    chunks, final = stream[:-1], stream[-1]
    assert chunks and [c["index"] for c in chunks] == list(range(len(chunks)))
    assert all(c["request_id"] == "s1" and c["done"] is False for c in chunks)
    assert "".join(c["message"]["content"] for c in chunks) == final["message"]["content"]
    assert final["done"] is True and final["eval_count"] > 0

    completion = next(answer_body(m) for m in received if m.correlation_id == "o1")
    assert completion["object"] == "chat.completion" and completion["request_id"] == "o1"
    assert completion["choices"][0]["message"]["content"] and completion["choices"][0]["finish_reason"] == "length"
    assert completion["usage"]["completion_tokens"] == 6

    openai_stream = [answer_body(m) for m in received if m.correlation_id == "o2"]
    assert {c["object"] for c in openai_stream[:-1]} == {"chat.completion.chunk"}
    streamed = "".join(c["choices"][0]["delta"]["content"] for c in openai_stream[:-1])
    assert streamed == openai_stream[-1]["choices"][0]["message"]["content"]

    assert len(rerouted) == 1 and rerouted[0].correlation_id == "gone"
    assert answer_body(rerouted[0])["reply_to"] == "nobody-listens-here"


def test_answers_through_a_running_server(rabbitmq: Broker, queue_name: str, start_worker: Any) -> None:
    from tests.server import running_server

    with running_server() as url:
        worker = start_worker("--server", url)

        async def scenario() -> list[Any]:
            client = await Client.connect(rabbitmq.url)
            try:
                await client.wait_for_consumer(queue_name, worker)
                replies = await client.channel.declare_queue(exclusive=True)
                chat = {"request_id": "c", "messages": [{"role": "user", "content": "Hi"}], "options": OPTIONS}
                await client.publish(queue_name, chat | {"stream": True}, correlation_id="c", reply_to=replies.name)
                await client.publish(queue_name, _request(1), correlation_id="g", reply_to=replies.name)
                return await client.answers(replies.name, {"c", "g"}, timeout=300)
            finally:
                await client.close()

        received = asyncio.run(scenario())
    finals = {m.correlation_id: answer_body(m) for m in received if m.type == "answer"}
    chunks = [answer_body(m) for m in received if m.type == "chunk"]
    assert finals["g"]["response"] and finals["g"]["eval_count"] > 0
    assert "".join(c["message"]["content"] for c in chunks) == finals["c"]["message"]["content"] != ""


def test_a_queue_declared_by_hand_without_priorities_is_used_as_it_is(
    rabbitmq: Broker, queue_name: str, start_worker: Any
) -> None:
    async def scenario() -> list[Any]:
        client = await Client.connect(rabbitmq.url)
        try:
            await client.channel.declare_queue(queue_name, durable=True)  # as the guide's pika code declares it
            await client.channel.declare_queue(f"{queue_name}.results", durable=True)
            await client.publish(queue_name, _request(1))
            start_worker()
            return await client.messages(f"{queue_name}.results", 1, timeout=300)
        finally:
            await client.close()

    [answer] = asyncio.run(scenario())
    assert answer_body(answer)["request_id"] == "r1"
