"""Alerts: what the guide's monitoring script does by hand (mail when inference is slow or fails), in the server.

Rules (settings): a runner crash, a circuit opening (server events, serve/events.py), time to first token p95
above EMBER_ALERT_TTFT_P95_MS over the last 5 minutes, a GPU hotter than EMBER_ALERT_GPU_TEMPERATURE, a
failed self-probe (a one-token generation on the default model every EMBER_PROBE_INTERVAL seconds) and a
failed scheduled run. Each alert is a JSON POST to EMBER_ALERT_WEBHOOK and/or a mail through EMBER_ALERT_SMTP
(smtp://[user:password@]host[:port], to EMBER_ALERT_MAIL_TO), at most once per EMBER_ALERT_INTERVAL seconds for
the same rule and model, so a crash loop sends one mail, not hundreds. Delivery runs in the background: a
slow mail server never delays a request. For Alertmanager users, docs/alerts.rules.yml has the same rules
over /metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import smtplib
import time
from collections.abc import Callable
from email.message import EmailMessage
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx

from ember.serve.events import utc_time
from ember.serve.metrics import RecentLatencies, nvml_readings

log = logging.getLogger(__name__)
CHECK_INTERVAL = 15.0  # seconds between checks of the TTFT and GPU temperature rules


class Alerts:
    """Turns server events and periodic checks into rate-limited alerts. Start and stop in the server's loop."""

    def __init__(
        self,
        settings: Any,
        *,
        manager: Any = None,
        latencies: RecentLatencies | None = None,
        gpus: Callable[[], list[dict[str, Any]]] = nvml_readings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.manager = manager
        self.latencies = latencies or RecentLatencies()
        self.gpus = gpus
        self.clock = clock
        self.last_sent: dict[tuple[str, str], float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.settings.alert_webhook or self.settings.alert_smtp)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if not self.enabled:
            return
        if self.settings.alert_ttft_p95_ms is not None or self.settings.alert_gpu_temperature is not None:
            self._loops.append(asyncio.create_task(self._check_loop()))
        if self.settings.probe_interval is not None and self.manager is not None:
            self._loops.append(asyncio.create_task(self._probe_loop()))

    async def stop(self) -> None:
        for task in self._loops:
            task.cancel()
        for task in self._loops:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._tasks:  # alerts on their way get a moment to arrive
            await asyncio.wait(self._tasks, timeout=10)

    # --- rules -------------------------------------------------------------------------------------------

    def on_event(self, event: dict[str, Any]) -> None:
        """A server event (ServerEvents listener): runner crashes and circuits opening are alerts."""
        kind = event.get("event")
        model = str(event.get("model", ""))
        if kind == "runner_crash":
            self.alert("runner_crash", model, f"the runner of {model} stopped unexpectedly ({event.get('status')})")
        elif kind == "circuit_open":
            self.alert("circuit_open", model, f"the circuit of {model} opened: {event.get('reason')}")

    def scheduled_run_failed(self, spec: Any, run: Any) -> None:
        """The schedules' failure hook (ember.jobs.schedules.scheduled_run_failed), connected by the server."""
        from ember.jobs.schedules import scheduled_run_failed

        scheduled_run_failed(spec, run)  # its log line stays
        self.alert("schedule_failed", spec.name, f"scheduled run {run.id} of {spec.name!r} failed: {run.error}")

    def check(self) -> None:
        """The periodic rules: TTFT p95 over the last 5 minutes, GPU temperature."""
        limit_ms = self.settings.alert_ttft_p95_ms
        p95 = self.latencies.p95()
        if limit_ms is not None and p95 is not None and p95 * 1000 > limit_ms:
            self.alert(
                "ttft_p95",
                "",
                f"time to first token p95 is {p95 * 1000:.0f} ms over the last 5 minutes (limit {limit_ms:g} ms)",
            )
        hottest = self.settings.alert_gpu_temperature
        if hottest is not None:
            for gpu in self.gpus():
                temperature = gpu.get("temperature_celsius")
                if temperature is not None and temperature > hottest:
                    self.alert(
                        "gpu_temperature",
                        str(gpu["index"]),
                        f"GPU {gpu['index']} ({gpu['name']}) is at {temperature:g} °C (limit {hottest:g} °C)",
                    )

    async def probe(self) -> None:
        """A one-token generation on the default model; an alert if it fails."""
        from ember.types import GenerateRequest

        request = GenerateRequest(model=self.settings.default_model, prompt="ping", options={"num_predict": 1})
        try:
            async with asyncio.timeout(max(30.0, self.settings.load_timeout)):
                async for _ in self.manager.generate(request):
                    pass
        except Exception as error:
            self.alert("probe_failed", self.settings.default_model, f"the self-probe failed: {error}")

    async def _check_loop(self) -> None:
        while True:
            await asyncio.sleep(CHECK_INTERVAL)
            self.check()

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.probe_interval)
            await self.probe()

    # --- delivery ----------------------------------------------------------------------------------------

    def alert(self, rule: str, subject: str, message: str) -> bool:
        """Send an alert unless the same rule for the same subject was sent within EMBER_ALERT_INTERVAL."""
        if not self.enabled:
            return False
        now = self.clock()
        last = self.last_sent.get((rule, subject))
        if last is not None and now - last < self.settings.alert_interval:
            return False
        self.last_sent[(rule, subject)] = now
        payload = {"time": utc_time(time.time()), "rule": rule, "subject": subject, "message": message}
        log.warning("alert %s: %s", rule, message)
        return self._send(payload)

    def _send(self, payload: dict[str, Any]) -> bool:
        """Deliver in the background, on the server's loop (from a worker thread too: a schedule's hook)."""
        loop = self._loop
        if loop is None:
            return False
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._spawn(payload)
        else:
            loop.call_soon_threadsafe(self._spawn, payload)
        return True

    def _spawn(self, payload: dict[str, Any]) -> None:
        task = asyncio.get_running_loop().create_task(self._deliver(payload))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, payload: dict[str, Any]) -> None:
        if self.settings.alert_webhook:
            try:
                async with httpx.AsyncClient(timeout=10) as client:
                    response = await client.post(self.settings.alert_webhook, json=payload)
                    response.raise_for_status()
            except httpx.HTTPError as error:
                log.warning("the alert webhook %s failed: %s", self.settings.alert_webhook, error)
        if self.settings.alert_smtp:
            try:
                await asyncio.to_thread(self._mail, payload)
            except (OSError, smtplib.SMTPException) as error:
                log.warning("mailing the alert through %s failed: %s", _safe_url(self.settings.alert_smtp), error)

    def _mail(self, payload: dict[str, Any]) -> None:
        url = urlsplit(self.settings.alert_smtp)
        mail = EmailMessage()
        mail["Subject"] = f"[ember] {payload['rule']}: {payload['subject'] or 'server'}"
        mail["From"] = self.settings.alert_mail_from
        mail["To"] = self.settings.alert_mail_to
        mail.set_content(f"{payload['message']}\n\nat {payload['time']}\n")
        secure = url.scheme == "smtps"
        port = url.port or (465 if secure else 25)
        client = smtplib.SMTP_SSL if secure else smtplib.SMTP
        with client(url.hostname or "localhost", port, timeout=10) as smtp:
            if url.username:
                if not secure:
                    smtp.starttls()
                smtp.login(unquote(url.username), unquote(url.password or ""))
            smtp.send_message(mail)


def _safe_url(url: str) -> str:
    """The SMTP URL without its password, for log lines."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port or ''}"
