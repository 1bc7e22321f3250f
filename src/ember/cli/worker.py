"""`ember worker`: answer inference requests from a RabbitMQ queue (see ember.jobs.worker for the guarantees)."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from typing import TYPE_CHECKING, Annotated

import typer

from ember.config import Settings

if TYPE_CHECKING:
    from ember.jobs.worker import WorkerConfig


def register(app: typer.Typer) -> None:
    app.command("worker")(worker)


def worker(
    amqp: Annotated[str | None, typer.Option("--amqp", help="Broker URL, amqp://user:pass@host:port/vhost.")] = None,
    queue: Annotated[str | None, typer.Option("--queue", "-q", help="Queue to answer (EMBER_AMQP_QUEUE).")] = None,
    results: Annotated[
        str | None, typer.Option("--results", help="Queue for answers to messages without reply_to.")
    ] = None,
    dead_letter: Annotated[
        str | None, typer.Option("--dead-letter", help="Dead-letter queue (default: QUEUE.dead).")
    ] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model for messages that name none.")] = None,
    server: Annotated[
        str | None, typer.Option("--server", help="Answer through the ember server at this URL, not in-process.")
    ] = None,
    parallel: Annotated[
        int | None, typer.Option("--parallel", "-np", min=1, help="Slots per model (in-process), so the prefetch.")
    ] = None,
    prefetch: Annotated[
        int | None, typer.Option("--prefetch", min=1, help="Messages held at once (default: the model's slots).")
    ] = None,
    max_attempts: Annotated[
        int | None, typer.Option("--max-attempts", min=1, help="Deliveries before a request is dead-lettered.")
    ] = None,
    drain_timeout: Annotated[
        float, typer.Option("--drain-timeout", min=0, help="Seconds SIGTERM waits for the messages in hand.")
    ] = 300.0,
) -> None:
    """Answer requests from a RabbitMQ queue with the local engine (or a running server), losing none.

    A message is JSON: {request_id, model, prompt | messages, options, format, stream}, or an OpenAI
    chat-completions body. The answer goes to its reply_to (with its correlation_id), else to the results queue.
    """
    from ember.jobs.worker import WorkerConfig, check_amqp_url, redact

    overrides = {"num_parallel": parallel} if parallel is not None else {}
    settings = Settings(**overrides)
    config = WorkerConfig(
        amqp_url=check_amqp_url(amqp or settings.amqp_url),
        queue=queue or settings.amqp_queue,
        results_queue=results or settings.amqp_results_queue,
        dead_letter_queue=dead_letter,
        max_attempts=max_attempts or settings.worker_max_attempts,
        prefetch=prefetch,
        default_model=model or settings.default_model,
        drain_timeout=drain_timeout,
        settings=settings,
    )
    through = f"the server at {server}" if server else "the local engine"
    print(
        f"ember worker: answering queue {config.queue!r} on {redact(config.amqp_url)} with {through}", file=sys.stderr
    )
    level = logging.getLogger().getEffectiveLevel()
    logging.getLogger("ember.jobs").setLevel(min(logging.INFO, level))
    if level > logging.DEBUG:  # the worker says itself, once, why the broker cannot be reached
        for name in ("aiormq", "aio_pika"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    asyncio.run(_run(config, settings, server))


async def _run(config: WorkerConfig, settings: Settings, server: str | None) -> None:
    from ember.jobs.answering import Answerer, ManagerAnswerer, ServerAnswerer
    from ember.jobs.request_ledger import RequestLedger
    from ember.jobs.worker import Worker

    answerer: Answerer
    if server:
        keys = [key.strip() for key in settings.api_keys.split(",") if key.strip()]
        answerer = ServerAnswerer(server, keys[0] if keys else None, default_slots=settings.num_parallel)
    else:
        from ember.api.app import create_manager

        answerer = ManagerAnswerer(create_manager(settings), owned=True)
    consumer = Worker(config, answerer, RequestLedger(settings.home / "ember.db"))
    loop = asyncio.get_running_loop()
    signals = [0]

    def on_signal() -> None:
        signals[0] += 1
        if signals[0] == 1:
            print("ember worker: finishing the messages in hand, then stopping", file=sys.stderr)
            consumer.stop()
        else:  # a second signal: stop now, the broker gives the unfinished messages to another worker
            consumer.stop_now()

    for number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(number, on_signal)
    try:
        await consumer.run()
    finally:
        await answerer.close()
    print(f"ember worker: stopped after {consumer.answered} answers", file=sys.stderr)
