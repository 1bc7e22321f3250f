"""`ember worker`: answers inference requests from a RabbitMQ queue, losing none and answering none twice.

    worker = Worker(WorkerConfig(amqp_url="amqp://guest:guest@127.0.0.1:5672/"), answerer, RequestLedger())
    await worker.run()          # until stop(): SIGTERM finishes the messages in hand, then returns

How it keeps its promises:
- Manual acks, sent only after the answer was published and the broker confirmed it (publisher confirms).
  A worker that dies mid-answer has acknowledged nothing, so the broker gives its messages to another worker.
- Prefetch is the model's number of slots, so one worker keeps every slot busy and holds no more than that.
- A redelivered message whose request was answered already is acknowledged without a second answer
  (`RequestLedger`, SQLite, by request_id).
- A malformed message goes to the dead-letter queue (`QUEUE.dead`) at once, with the error in its headers; a
  request that fails `max_attempts` times (or whose deliveries keep ending without an answer) goes there too.
  A failed attempt before that is published again at the tail of the queue, never put back at its head.
  An RPC caller gets an error answer on its reply_to either way, so it does not wait forever.
- When the broker goes away, answers in progress are dropped (their messages come back) and the worker
  reconnects with exponential backoff; when it comes back, work goes on.

Answers go to the message's reply_to with its correlation_id (RPC), else to the results queue (`responses`).
With `stream: true`, every chunk is published as it comes ({"type": "chunk", "index": n, ...}), then the whole
answer. A message whose reply_to no longer exists has its answer put in the results queue instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage
from aiormq.abc import DeliveredMessage
from yarl import URL

from ember.api.ollama import chunk_json
from ember.api.openai import ChatChunks
from ember.collect import collect_async
from ember.config import Settings
from ember.errors import EmberError
from ember.jobs.answering import Answerer, NativeChunk, is_permanent
from ember.jobs.queued_requests import MAX_AMQP_PRIORITY, MalformedMessageError, QueuedRequest, parse_queued_request
from ember.jobs.request_ledger import RequestLedger, RequestState
from ember.types import ChatResponse

log = logging.getLogger(__name__)
T = TypeVar("T")

# Errors that say the broker (or the way to it) failed, not the message: its delivery does not count.
BROKER_ERRORS = (aiormq.exceptions.AMQPError, aiormq.exceptions.ChannelInvalidStateError, ConnectionError)


class WorkerError(EmberError):
    """The worker cannot run as configured (wrong credentials, a queue it cannot use)."""


def redact(url: str) -> str:
    """The broker URL without its password, for messages."""
    parsed = URL(url)
    return str(parsed.with_password("***")) if parsed.password else url


def check_amqp_url(url: str) -> str:
    """The broker URL, or WorkerError saying what a valid one looks like."""
    try:
        parsed = URL(url)
    except ValueError:
        parsed = None
    if parsed is None or parsed.scheme not in ("amqp", "amqps") or not parsed.host:
        raise WorkerError(
            f"invalid broker URL {redact(url)!r}: use amqp://USER:PASSWORD@HOST:PORT/VHOST, such as "
            "amqp://guest:guest@127.0.0.1:5672/"
        )
    return url


@dataclass(frozen=True)
class WorkerConfig:
    amqp_url: str
    queue: str = "requests"
    results_queue: str = "responses"
    dead_letter_queue: str | None = None  # default: QUEUE.dead
    max_attempts: int = 3
    prefetch: int | None = None  # default: the model's slots
    default_model: str = "smollm2"
    drain_timeout: float = 300.0  # seconds SIGTERM waits for the messages in hand
    connect_timeout: float = 10.0
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    retry_delay_max: float = 10.0  # wait before a failed attempt goes back to the tail of the queue
    settings: Settings = field(default_factory=Settings)

    @property
    def dead_letters(self) -> str:
        return self.dead_letter_queue or f"{self.queue}.dead"


class Worker:
    """Consumes one queue; answers through an Answerer; remembers requests in a RequestLedger."""

    def __init__(
        self,
        config: WorkerConfig,
        answerer: Answerer,
        ledger: RequestLedger,
        *,
        connect: Callable[..., Awaitable[AbstractConnection]] = aio_pika.connect,
    ) -> None:
        check_amqp_url(config.amqp_url)
        self.config = config
        self.answerer = answerer
        self.ledger = ledger
        self._connect = connect
        self._stopping = asyncio.Event()
        self._in_hand: set[asyncio.Task[None]] = set()
        self.answered = 0  # answers published (for tests and the final log line)
        self.connections = 0  # successful connections so far

    # --- lifecycle -----------------------------------------------------------------------------------

    async def run(self) -> None:
        """Consume until stop(); reconnect with backoff whenever the broker goes away."""
        await asyncio.to_thread(self.ledger.prune)
        failures = 0
        while not self._stopping.is_set():
            problem: str | None = None
            try:
                connection = await self._connect(self.config.amqp_url, timeout=self.config.connect_timeout)
            except (aiormq.exceptions.ProbableAuthenticationError, aiormq.exceptions.AuthenticationError) as error:
                raise WorkerError(
                    f"the broker at {redact(self.config.amqp_url)} refused the login ({error}); check the user "
                    "and password in --amqp / EMBER_AMQP_URL"
                ) from None
            except (*BROKER_ERRORS, OSError, TimeoutError) as error:
                problem = f"cannot reach the broker at {redact(self.config.amqp_url)} ({error or type(error).__name__})"
            else:
                self.connections += 1
                try:
                    consumed = await self._serve(connection)
                finally:
                    with contextlib.suppress(Exception):
                        await connection.close()
                if consumed:  # it worked for a while: the next try comes at once
                    failures = 0
                    continue
                problem = "the broker went away while the worker set up its queues"
            delay = min(self.config.backoff_max, self.config.backoff_initial * 2**failures)
            delay *= random.uniform(0.8, 1.2)  # several workers must not come back in lockstep
            failures += 1
            log.warning("%s; trying again in %.1f s", problem, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
        log.info("worker stopped after %d answers", self.answered)

    def stop(self) -> None:
        """Take no new messages; finish those in hand (up to drain_timeout), then make run() return."""
        self._stopping.set()

    def stop_now(self) -> None:
        """Stop at once: answers in progress are dropped and their messages go back to the queue."""
        self._stopping.set()
        for task in list(self._in_hand):
            task.cancel()

    # --- one connection ------------------------------------------------------------------------------

    async def _serve(self, connection: AbstractConnection) -> bool:
        """Consume on one connection until it is lost or the worker stops; False if it never got to consume."""
        lost = asyncio.Event()
        connection.close_callbacks.add(lambda *_: lost.set())
        try:
            channel = await self._declare(connection)
            queue = await channel.declare_queue(self.config.queue, passive=True)
            channel.close_callbacks.add(lambda *_: lost.set())
            prefetch = self.config.prefetch or await self.answerer.slots(self.config.default_model)
            await channel.set_qos(prefetch_count=max(1, prefetch))
            session = _Session(self, channel, queue.name, max(1, prefetch))
            consumer_tag = await queue.consume(session.on_message, no_ack=False)
        except BROKER_ERRORS as error:
            log.warning("lost the broker while setting up (%s)", error or type(error).__name__)
            return False
        log.info("answering queue %r on %s (prefetch %d)", queue.name, redact(self.config.amqp_url), prefetch)
        stopping = asyncio.ensure_future(self._stopping.wait())
        gone = asyncio.ensure_future(lost.wait())
        await asyncio.wait({stopping, gone}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if lost.is_set():
            gone.cancel()
            log.warning("the broker connection was lost; answers in progress are dropped and will be redelivered")
            await self._drop_in_hand()
            return True
        with contextlib.suppress(*BROKER_ERRORS):
            await queue.cancel(consumer_tag)  # no new deliveries; finish those in hand
        if self._in_hand:
            log.info("finishing %d messages in hand before stopping", len(self._in_hand))
            drained = asyncio.ensure_future(asyncio.wait(set(self._in_hand), timeout=self.config.drain_timeout))
            await asyncio.wait({drained, gone}, return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        await self._drop_in_hand()
        return True

    async def _drop_in_hand(self) -> None:
        tasks = list(self._in_hand)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _declare(self, connection: AbstractConnection) -> AbstractChannel:
        """Declare the request queue (durable, priorities), the dead-letter queue and the results queue; returns
        an open channel with publisher confirms.

        A queue that exists already with other arguments (one declared by hand without x-max-priority, say) is
        used as it is, with a warning, rather than refused: the broker closes the channel that asked, so the
        next declaration gets a new one."""
        wanted = [
            (self.config.queue, {"x-max-priority": MAX_AMQP_PRIORITY}),
            (self.config.dead_letters, None),
            (self.config.results_queue, None),
        ]
        channel = await connection.channel(publisher_confirms=True)
        for name, arguments in wanted:
            try:
                await channel.declare_queue(name, durable=True, arguments=arguments)
            except aiormq.exceptions.ChannelPreconditionFailed as error:
                log.warning("queue %r exists with other settings (%s); using it as it is", name, error)
                channel = await connection.channel(publisher_confirms=True)
                await channel.declare_queue(name, passive=True)
            except aiormq.exceptions.ChannelAccessRefused as error:
                raise WorkerError(f"the broker refused access to queue {name!r}: {error}") from None
        return channel

    # --- messages ------------------------------------------------------------------------------------

    def _track(self, task: asyncio.Task[None]) -> None:
        self._in_hand.add(task)
        task.add_done_callback(self._in_hand.discard)


class _Session:
    """The messages of one connection: each is answered in its own task, acknowledged on its channel."""

    def __init__(self, worker: Worker, channel: AbstractChannel, queue: str, prefetch: int) -> None:
        self.worker = worker
        self.config = worker.config
        self.channel = channel
        self.queue = queue
        self.prefetch = prefetch

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        self.worker._track(asyncio.create_task(self._handle(message)))

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        ledger, queue = self.worker.ledger, self.queue
        try:
            try:
                item = parse_queued_request(
                    message.body,
                    settings=self.config.settings,
                    default_model=self.config.default_model,
                    message_id=message.message_id,
                    correlation_id=message.correlation_id,
                    message_type=message.type,
                    amqp_priority=message.priority,
                )
            except MalformedMessageError as error:
                log.warning("dead-lettering a malformed message: %s", error)
                await self._dead_letter(message, None, str(error), attempts=1)
                await message.ack()
                return
            state = await self._note(ledger.begin, queue, item.request_id)
            if state is None:  # no memory of requests now: answering twice beats losing the request
                state = RequestState("working", 1, None)
            if state.status != "working":
                log.info("request %s was %s already; acknowledging its redelivery", item.request_id, state.status)
                await message.ack()
                return
            if state.deliveries > self.config.max_attempts:
                reason = state.last_error or "each worker that took it stopped before answering"
                error = f"delivered {state.deliveries - 1} times without an answer: {reason}"
                await self._give_up(message, item, error, state.deliveries - 1)
                return
            try:
                where = await self._answer(message, item)
            except asyncio.CancelledError:
                await asyncio.shield(self._note(ledger.release, queue, item.request_id))
                raise
            except BROKER_ERRORS:
                if self.channel.is_closed:  # the broker went away: not the message's fault
                    await self._note(ledger.release, queue, item.request_id)
                raise
            except Exception as error:
                await self._failed(message, item, error, state.deliveries)
                return
            # Between the broker's confirm of the answer and this write, a worker that dies answers twice (its
            # message comes back, and the ledger does not say it was answered): written here, not in a thread,
            # so that the window is the write's own millisecond, not a thread hand-off's wait on a busy loop.
            self._note_now(ledger.answered, queue, item.request_id, where)
            await message.ack()
            self.worker.answered += 1
            await self._follow_slots(item)
        except BROKER_ERRORS as error:
            # The message stays unacknowledged; the broker gives it out again when this channel is gone.
            log.warning("the broker failed while answering a message (%s)", error or type(error).__name__)
            if not self.channel.is_closed:
                with contextlib.suppress(*BROKER_ERRORS):
                    await message.nack(requeue=True)
        except Exception as error:  # a bug: keep the message (in the dead-letter queue), say what happened
            log.exception("unexpected error while handling a message")
            with contextlib.suppress(Exception):
                await self._dead_letter(message, None, f"internal error: {type(error).__name__}: {error}", attempts=1)
                await message.ack()

    def _note_now(self, call: Callable[..., T], *args: Any) -> T | None:
        """A ledger call on the event loop (a small write); a database that fails is logged, and the message goes
        on being handled."""
        try:
            return call(*args)
        except EmberError as error:
            log.error("the request ledger failed (%s); a redelivery may be answered again", error)
            return None

    async def _note(self, call: Callable[..., T], *args: Any) -> T | None:
        """A ledger call in a thread, as `_note_now`."""
        return await asyncio.to_thread(self._note_now, call, *args)

    async def _answer(self, message: AbstractIncomingMessage, item: QueuedRequest) -> str:
        """Answer, publishing chunks as they come when asked; returns the queue the answer went to."""
        chunks: AsyncIterator[NativeChunk] = self.worker.answerer.answer(item.request, priority=item.priority)
        pending: list[asyncio.Future[Any]] = []
        if item.stream:
            chunks = self._streamed(chunks, message, item, pending)
        try:
            answer = await collect_async(chunks)
            await asyncio.gather(*pending)  # every chunk confirmed before the answer goes out
        finally:
            for future in pending:
                future.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        # An OpenAI body's answer is what its route returns; a native one is Ollama's, as with stream false.
        payload = item.openai.body([answer]) if item.openai else answer.model_dump(exclude_none=True)
        return await self._reply(message, {"request_id": item.request_id, **payload}, kind="answer")

    async def _streamed(
        self,
        chunks: AsyncIterator[NativeChunk],
        message: AbstractIncomingMessage,
        item: QueuedRequest,
        pending: list[asyncio.Future[Any]],
    ) -> AsyncIterator[NativeChunk]:
        """Publish the chunks as they pass: Ollama's chunks, or the route's `chat.completion.chunk` objects."""
        openai = ChatChunks(item.openai.head, 1, bool(item.request.logprobs)) if item.openai else None
        index = 0
        async for chunk in chunks:
            if not chunk.done or _carries_text(chunk):  # the last text may come with the timings: a chunk too
                piece = chunk.model_copy(update={"done": False, "done_reason": None}) if chunk.done else chunk
                shaped = openai.of(0, piece) if openai and isinstance(piece, ChatResponse) else [chunk_json(piece)]
                for part in shaped:
                    payload = {"request_id": item.request_id, "index": index, **part}
                    # Published without waiting for each confirm (they are awaited before the answer), in order.
                    pending.append(asyncio.ensure_future(self._publish_chunk(message, payload)))
                    index += 1
            yield chunk

    async def _publish_chunk(self, message: AbstractIncomingMessage, payload: dict[str, Any]) -> None:
        target = message.reply_to or self.config.results_queue
        out = _message(payload, message.correlation_id, kind="chunk", persistent=False)
        await self.channel.default_exchange.publish(out, routing_key=target, mandatory=False)

    async def _reply(self, message: AbstractIncomingMessage, payload: dict[str, Any], *, kind: str) -> str:
        """Publish an answer (or error) to reply_to, else the results queue; confirmed. Returns where it went."""
        target = message.reply_to or self.config.results_queue
        out = _message(payload, message.correlation_id, kind=kind, persistent=True)
        result = await self.channel.default_exchange.publish(out, routing_key=target, mandatory=True)
        if isinstance(result, DeliveredMessage):  # returned: nobody listens at reply_to any more
            if target == self.config.results_queue:
                raise aiormq.exceptions.PublishError(result, target)
            log.warning("reply_to %r no longer exists; the answer goes to %r", target, self.config.results_queue)
            out = _message(payload | {"reply_to": target}, message.correlation_id, kind=kind, persistent=True)
            result = await self.channel.default_exchange.publish(
                out, routing_key=self.config.results_queue, mandatory=True
            )
            if isinstance(result, DeliveredMessage):
                raise aiormq.exceptions.PublishError(result, self.config.results_queue)
            target = self.config.results_queue
        return target

    async def _failed(
        self, message: AbstractIncomingMessage, item: QueuedRequest, error: Exception, tries: int
    ) -> None:
        text = f"{type(error).__name__}: {error}" if not isinstance(error, EmberError) else str(error)
        if is_permanent(error) or tries >= self.config.max_attempts:
            if not is_permanent(error):
                text = f"failed {tries} times; the last error: {text}"
            await self._give_up(message, item, text, tries)
            return
        log.warning("request %s failed (attempt %d of %d): %s", item.request_id, tries, self.config.max_attempts, text)
        await self._note(self.worker.ledger.failed, self.queue, item.request_id, text)
        await asyncio.sleep(min(self.config.retry_delay_max, 0.5 * 2 ** (tries - 1)))
        again = aio_pika.Message(
            body=message.body,
            headers={**(message.headers or {}), "x-ember-attempts": tries, "x-ember-last-error": text[:1000]},
            content_type=message.content_type,
            correlation_id=message.correlation_id,
            reply_to=message.reply_to,
            message_id=message.message_id,
            type=message.type,
            priority=message.priority,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        await self.channel.default_exchange.publish(again, routing_key=self.queue, mandatory=True)
        await message.ack()

    async def _give_up(self, message: AbstractIncomingMessage, item: QueuedRequest, error: str, tries: int) -> None:
        log.warning("dead-lettering request %s: %s", item.request_id, error)
        await self._dead_letter(message, item.request_id, error, attempts=tries)
        await self._note(self.worker.ledger.dead, self.queue, item.request_id, error, self.config.dead_letters)
        await message.ack()

    async def _dead_letter(
        self, message: AbstractIncomingMessage, request_id: str | None, error: str, *, attempts: int
    ) -> None:
        """The message as it came, with the error, into the dead-letter queue; an error answer to an RPC caller."""
        dead = aio_pika.Message(
            body=message.body,
            headers={
                **(message.headers or {}),
                "x-ember-error": error[:4000],
                "x-ember-attempts": attempts,
                "x-ember-queue": self.queue,
            },
            content_type=message.content_type,
            correlation_id=message.correlation_id,
            reply_to=message.reply_to,
            message_id=message.message_id,
            type=message.type,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        await self.channel.default_exchange.publish(dead, routing_key=self.config.dead_letters, mandatory=True)
        if message.reply_to:
            payload = {"request_id": request_id, "error": error, "done": True, "dead_letter": self.config.dead_letters}
            with contextlib.suppress(aiormq.exceptions.PublishError):
                await self._reply(message, payload, kind="error")

    async def _follow_slots(self, item: QueuedRequest) -> None:
        """Prefetch follows the model's slots: a model loaded with more (or fewer) slots changes it."""
        if self.config.prefetch:
            return
        slots = max(1, await self.worker.answerer.slots(item.request.model))
        if slots != self.prefetch:
            self.prefetch = slots
            await self.channel.set_qos(prefetch_count=slots)
            log.info("prefetch now %d, the slots of %s", slots, item.request.model)


def _carries_text(chunk: NativeChunk) -> bool:
    if isinstance(chunk, ChatResponse):
        return bool(chunk.message.content or chunk.message.tool_calls)
    return bool(chunk.response)


def _message(payload: dict[str, Any], correlation_id: str | None, *, kind: str, persistent: bool) -> aio_pika.Message:
    return aio_pika.Message(
        body=json.dumps(payload, ensure_ascii=False).encode(),
        content_type="application/json",
        correlation_id=correlation_id,
        type=kind,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT if persistent else aio_pika.DeliveryMode.NOT_PERSISTENT,
    )
