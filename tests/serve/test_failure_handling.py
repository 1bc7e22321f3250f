"""The logic of failure handling without a model: circuit breakers on an injected clock, alert rules and their
rate limit, transient load failures retried with backoff, a full queue handing over to a fallback."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from ember.errors import ModelLoadError
from ember.serve.alerts import Alerts
from ember.serve.circuit import CircuitBreakers, CircuitOpenError
from ember.serve.events import ServerEvents
from ember.serve.metrics import RecentLatencies
from ember.store.resolve import ModelSource
from ember.types import GenerateRequest
from tests.serve.test_manager import FakeRunner, _manager, _reset_fakes, models  # noqa: F401 (fixtures)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_circuit_opens_after_n_failures_in_the_window_and_one_probe_closes_it() -> None:
    clock, events = Clock(), ServerEvents()
    seen: list[str] = []
    events.listeners.append(lambda event: seen.append(event["event"]))
    breakers = CircuitBreakers(threshold=3, window=60, cooldown=30, events=events, clock=clock)
    breakers.failed("m", "crash 1")
    clock.now += 61  # the first failure leaves the window
    breakers.failed("m", "crash 2")
    breakers.failed("m", "crash 3")
    assert breakers.admit("m") is False  # two within the window: still closed
    breakers.failed("m", "crash 4")
    with pytest.raises(CircuitOpenError, match="crash 4") as refused:
        breakers.admit("m")
    assert refused.value.retry_after == 30 and refused.value.http_status == 503
    clock.now += 29.5
    with pytest.raises(CircuitOpenError) as refused:
        breakers.admit("m")
    assert refused.value.retry_after == 1
    clock.now += 1
    assert breakers.admit("m") is True  # the probe
    with pytest.raises(CircuitOpenError):
        breakers.admit("m")  # only one probe at a time
    breakers.failed("m", "the probe crashed")  # another cool-down
    with pytest.raises(CircuitOpenError, match="probe crashed"):
        breakers.admit("m")
    clock.now += 31
    assert breakers.admit("m") is True
    breakers.succeeded("m")
    assert breakers.admit("m") is False and not breakers.circuits["m"].is_open()
    assert seen == ["circuit_open", "circuit_probe", "circuit_open", "circuit_probe", "circuit_closed"]


def _alerts(clock: Clock, **settings: Any) -> tuple[Alerts, list[dict]]:
    values = {
        "alert_webhook": "http://127.0.0.1:9/unused",
        "alert_smtp": "",
        "alert_interval": 300.0,
        "alert_ttft_p95_ms": None,
        "alert_gpu_temperature": None,
        **settings,
    }
    sent: list[dict] = []
    alerts = Alerts(SimpleNamespace(**values), latencies=RecentLatencies(clock), clock=clock, gpus=lambda: [])
    alerts._send = lambda payload: sent.append(payload) or True  # type: ignore[method-assign]  # delivery: the live test's
    return alerts, sent


def test_alert_rules_fire_once_per_interval() -> None:
    clock = Clock()
    alerts, sent = _alerts(clock, alert_ttft_p95_ms=500, alert_gpu_temperature=85)

    for _ in range(19):
        alerts.latencies.add(0.1)
    alerts.latencies.add(2.0)
    alerts.check()
    assert sent == []  # p95 of 19 fast and 1 slow is fast
    for _ in range(5):
        alerts.latencies.add(2.0)
    alerts.gpus = lambda: [{"index": 0, "name": "GPU", "temperature_celsius": 91.0}]
    alerts.check()
    assert [alert["rule"] for alert in sent] == ["ttft_p95", "gpu_temperature"]
    assert "91 °C (limit 85 °C)" in sent[1]["message"]
    alerts.check()
    alerts.on_event({"event": "runner_crash", "model": "m", "status": "killed by SIGKILL"})
    alerts.on_event({"event": "runner_crash", "model": "m", "status": "killed by SIGKILL"})
    assert [alert["rule"] for alert in sent] == ["ttft_p95", "gpu_temperature", "runner_crash"]
    clock.now += 301
    alerts.on_event({"event": "runner_crash", "model": "m", "status": "exit status 1"})
    assert sent[-1]["rule"] == "runner_crash" and "exit status 1" in sent[-1]["message"]
    clock.now += 400  # the slow first tokens are older than 5 minutes now
    assert alerts.latencies.p95() is None


def test_alerts_are_off_without_a_webhook_or_mail_server() -> None:
    clock = Clock()
    alerts, sent = _alerts(clock, alert_webhook="")
    assert alerts.alert("runner_crash", "m", "x") is False and sent == []


def test_a_load_killed_midway_is_retried_with_backoff(models: dict[str, ModelSource]) -> None:  # noqa: F811
    asyncio.run(_retried(models))


async def _retried(models: dict[str, ModelSource]) -> None:  # noqa: F811
    attempts: list[float] = []

    def flaky(options: Any) -> str | None:
        attempts.append(asyncio.get_running_loop().time())
        return "the runner exited while loading (killed by SIGKILL)" if len(attempts) < 3 else None

    FakeRunner.fail_when = flaky
    original = FakeRunner.start

    async def start(self: FakeRunner) -> dict[str, Any]:
        try:
            return await original(self)
        except ModelLoadError as error:
            error.transient = True
            raise

    FakeRunner.start = start  # type: ignore[method-assign]
    try:
        manager = _manager(models, load_backoff=0.05)
        chunks = [chunk async for chunk in manager.generate(GenerateRequest(model="a", prompt="x"))]
        assert chunks[-1].done
        assert len(attempts) == 3
        assert attempts[2] - attempts[1] >= 2 * (attempts[1] - attempts[0]) * 0.8  # the wait doubled
        FakeRunner.fail_when = lambda options: "unknown model architecture: 'mamba9'"  # not transient
        attempts.clear()
        with pytest.raises(ModelLoadError, match="mamba9"):
            async for _ in manager.generate(GenerateRequest(model="b", prompt="x")):
                pass
    finally:
        FakeRunner.start = original  # type: ignore[method-assign]


def test_a_full_queue_hands_over_to_the_fallback(models: dict[str, ModelSource]) -> None:  # noqa: F811
    asyncio.run(_full_queue(models))


async def _full_queue(models: dict[str, ModelSource]) -> None:  # noqa: F811
    manager = _manager(models, max_queued=0, fallbacks={"a:latest": ["b"]}, default_options={"num_parallel": 1})
    first = manager.generate(GenerateRequest(model="a", prompt="x"))
    holding = await anext(first)  # a's only slot is taken, and nothing may wait for it
    assert holding.model == "a"
    chunks = [chunk async for chunk in manager.generate(GenerateRequest(model="a", prompt="y"))]
    assert chunks[-1].done and chunks[0].model == "b"
    await first.aclose()


def test_a_failed_self_probe_and_a_failed_scheduled_run_alert(models: dict[str, ModelSource]) -> None:  # noqa: F811
    clock = Clock()
    alerts, sent = _alerts(clock, default_model="a", load_timeout=5.0)
    FakeRunner.fail_when = lambda options: "the runner exited while loading (killed by SIGKILL)"
    alerts.manager = _manager(models, load_retries=0)
    asyncio.run(alerts.probe())
    assert [alert["rule"] for alert in sent] == ["probe_failed"]
    assert "self-probe failed" in sent[0]["message"] and "SIGKILL" in sent[0]["message"]
    FakeRunner.fail_when = None
    asyncio.run(alerts.probe())  # a working model: no alert
    assert len(sent) == 1
    alerts.scheduled_run_failed(SimpleNamespace(name="nightly"), SimpleNamespace(id=3, error="the model is gone"))
    assert sent[-1]["rule"] == "schedule_failed" and "nightly" in sent[-1]["message"]


def test_fallbacks_setting_is_read_and_checked() -> None:
    from pydantic import ValidationError

    from ember.config import Settings

    assert Settings(fallbacks="big=small,tiny; other:v1=small").fallback_map() == {
        "big": ["small", "tiny"],
        "other:v1": ["small"],
    }
    with pytest.raises(ValidationError, match="model=fallback1,fallback2"):
        Settings(fallbacks="big small")
