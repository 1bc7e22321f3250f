"""GET /metrics scraped with prometheus-client's own parser, before and after real requests; GPU metrics with
NVML faked at its Python boundary (the `pynvml` module)."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ember.serve.metrics import ServeMetrics, nvml_readings
from tests.server import running_server

MODEL = "smollm2:latest"


def scrape(base: str, headers: dict[str, str] | None = None) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics as {(name, sorted labels): value}."""
    response = httpx.get(base + "/metrics", headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, metric: str, /, **labels: str) -> float:
    return samples.get((metric, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    home = tmp_path_factory.mktemp("metrics-home")
    with running_server(home=home, num_parallel=2, api_keys="secret-key") as base:
        yield base, home


AUTH = {"Authorization": "Bearer secret-key"}


def test_counters_and_histograms_move_by_the_right_amounts(server: tuple[str, Path]) -> None:
    base, _ = server
    before = scrape(base, AUTH)
    answers = []
    for budget in (5, 7):  # the same prompt twice: the second reuses the first one's KV (prefix cache hits)
        body = {
            "model": "smollm2",
            "prompt": "The three primary colors are",
            "stream": False,
            "options": {"num_predict": budget, "temperature": 0},
        }
        response = httpx.post(base + "/api/generate", json=body, headers=AUTH, timeout=120)
        assert response.status_code == 200, response.text
        answers.append(response.json())
    refused = httpx.post(base + "/api/generate", json={"model": "smollm2", "prompt": "x"}, timeout=30)  # no key
    assert refused.status_code == 401
    after = scrape(base, AUTH)

    def moved(metric: str, /, **labels: str) -> float:
        return value(after, metric, **labels) - value(before, metric, **labels)

    generate = {"route": "/api/generate", "method": "POST"}
    assert moved("ember_requests_total", **generate, status="200") == 2
    assert moved("ember_requests_total", **generate, status="401") == 1
    assert moved("ember_generated_tokens_total", model=MODEL) == sum(a["eval_count"] for a in answers)
    assert moved("ember_prompt_tokens_total", model=MODEL) == sum(a["prompt_eval_count"] for a in answers)
    cached = sum(a.get("prompt_cached_count", 0) for a in answers)
    assert cached > 0  # the repeat found its prompt in the cache
    assert moved("ember_prefix_cache_hit_tokens_total", model=MODEL) == cached
    for histogram in (
        "ember_time_to_first_token_seconds",
        "ember_request_latency_seconds",
        "ember_queue_wait_seconds",
        "ember_inter_token_latency_seconds",
    ):
        assert moved(f"{histogram}_count", model=MODEL) == 2, histogram
        assert moved(f"{histogram}_sum", model=MODEL) > 0, histogram
        assert moved(f"{histogram}_bucket", model=MODEL, le="+Inf") == 2, histogram
    # The first request loaded the model (unless an earlier test of this module did).
    assert value(after, "ember_model_loads_total", model=MODEL) == 1
    assert value(after, "ember_model_load_seconds_count", model=MODEL) == 1
    assert value(after, "ember_slots_total", model=MODEL) == 2
    assert value(after, "ember_slots_busy", model=MODEL) == 0
    assert value(after, "ember_queue_depth", model=MODEL) == 0
    # From the runner, over its pipe: the KV of both answers' prompts and tokens, the runner's memory.
    assert value(after, "ember_kv_cells_total", model=MODEL) == 2 * 4096
    assert value(after, "ember_kv_cells_used", model=MODEL) >= answers[1]["prompt_eval_count"] + cached
    assert value(after, "ember_runner_rss_bytes", model=MODEL) > 50 * 1024 * 1024
    # No GPU here: no GPU metrics at all (not zeros).
    assert not any(name.startswith("ember_gpu_") for name, _ in after)


def test_metrics_need_the_api_key_unless_public(server: tuple[str, Path], tmp_path: Path) -> None:
    base, _ = server
    assert httpx.get(base + "/metrics", timeout=10).status_code == 401
    with running_server(home=tmp_path, api_keys="secret-key", metrics_public=True) as public:
        assert httpx.get(public + "/metrics", timeout=10).status_code == 200
        assert httpx.get(public + "/api/ps", timeout=10).status_code == 401  # only /metrics is opened


class _FakeNvml(types.ModuleType):
    """The functions of nvidia-ml-py that ember calls, answering for `count` GPUs."""

    NVML_TEMPERATURE_GPU = 0

    def __init__(self, count: int) -> None:
        super().__init__("pynvml")
        self.count = count
        self.shut = False

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        self.shut = True

    def nvmlDeviceGetCount(self) -> int:
        return self.count

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetName(self, handle: int) -> bytes:
        return b"NVIDIA Fake 48GB"

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(gpu=37 + handle, memory=10)

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(used=6 * 2**30, total=48 * 2**30, free=42 * 2**30)

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        return 71

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")  # a board without a power sensor


def _gpu_samples(monkeypatch: pytest.MonkeyPatch, fake: _FakeNvml) -> dict:
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    metrics = ServeMetrics()
    metrics.watch(SimpleNamespace(entries={}, breakers=None))
    samples = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_gpu_metrics_come_from_nvml_when_it_reports_a_device(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeNvml(count=2)
    samples = _gpu_samples(monkeypatch, fake)
    gpu1 = {"gpu": "1", "name": "NVIDIA Fake 48GB"}
    assert value(samples, "ember_gpu_utilization_ratio", **gpu1) == pytest.approx(0.38)
    assert value(samples, "ember_gpu_memory_used_bytes", **gpu1) == 6 * 2**30
    assert value(samples, "ember_gpu_memory_total_bytes", gpu="0", name="NVIDIA Fake 48GB") == 48 * 2**30
    assert value(samples, "ember_gpu_temperature_celsius", **gpu1) == 71
    assert not any(name == "ember_gpu_power_watts" for name, _ in samples)  # unsupported: left out, not 0
    assert fake.shut


def test_no_gpu_metrics_when_nvml_reports_no_device_or_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not any(name.startswith("ember_gpu_") for name, _ in _gpu_samples(monkeypatch, _FakeNvml(count=0)))

    class Broken(_FakeNvml):
        def nvmlInit(self) -> None:
            raise RuntimeError("NVML Shared Library Not Found")

    monkeypatch.setitem(sys.modules, "pynvml", Broken(count=1))
    assert nvml_readings() == []


def test_the_alert_rules_file_names_only_metrics_ember_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    import re

    rules = (Path(__file__).parents[2] / "docs" / "alerts.rules.yml").read_text()
    named = set(re.findall(r"\bember_[a-z_]+", rules))
    assert named
    metrics = ServeMetrics()
    queue = SimpleNamespace(queued=0, in_use=0, slots=1)
    stats = SimpleNamespace(kv_cells_used=0, kv_cells_total=1, rss_bytes=1)
    entry = SimpleNamespace(queue=queue, runner=SimpleNamespace(stats=stats))
    breakers = SimpleNamespace(circuits={"m": SimpleNamespace(is_open=lambda: False)})
    monkeypatch.setitem(sys.modules, "pynvml", _FakeNvml(count=1))
    metrics.watch(SimpleNamespace(entries={"m": entry}, breakers=breakers))
    metrics.ttft.labels("m").observe(0.1)
    for counter in (metrics.crashes, metrics.timeouts):
        (counter.labels("m", "timeout") if counter is metrics.timeouts else counter.labels("m")).inc()
    served = {sample.name for family in text_string_to_metric_families(metrics.exposition().decode())
              for sample in family.samples}  # fmt: skip
    assert named <= served, named - served
