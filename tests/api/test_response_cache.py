"""The response cache with the real model: exact repeats of deterministic requests come from the cache (marked),
anything else is generated; off by default."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server import running_server


def _generated_tokens(base: str) -> float:
    for line in httpx.get(base + "/metrics", timeout=10).text.splitlines():
        if line.startswith("ember_generated_tokens_total{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_server(home=tmp_path_factory.mktemp("cache-home"), response_cache=8) as url:
        yield url


def _ask(base: str, **options: object) -> httpx.Response:
    body = {"model": "smollm2", "prompt": "Name a color.", "stream": False, "options": {"num_predict": 8, **options}}
    return httpx.post(base + "/api/generate", json=body, timeout=120)


def test_a_deterministic_repeat_comes_from_the_cache(base: str) -> None:
    first = _ask(base, temperature=0)
    assert "x-ember-cache" not in first.headers
    tokens = _generated_tokens(base)
    again = _ask(base, temperature=0)
    assert again.headers["x-ember-cache"] == "hit"
    assert again.json()["response"] == first.json()["response"]
    assert _generated_tokens(base) == tokens  # nothing was generated for it
    assert "x-ember-cache" not in _ask(base, temperature=0, num_predict=9).headers  # other options: generated
    metrics = httpx.get(base + "/metrics", timeout=10).text
    assert 'ember_response_cache_hits_total{model="smollm2:latest"} 1.0' in metrics


def test_a_fixed_seed_is_deterministic_and_random_sampling_is_not(base: str) -> None:
    assert "x-ember-cache" not in _ask(base, temperature=0.9, seed=7).headers
    assert _ask(base, temperature=0.9, seed=7).headers["x-ember-cache"] == "hit"
    assert "x-ember-cache" not in _ask(base, temperature=0.9).headers
    assert "x-ember-cache" not in _ask(base, temperature=0.9).headers  # never cached without a seed


def test_a_stream_is_replayed_whole(base: str) -> None:
    body = {"model": "smollm2", "prompt": "Count:", "raw": True, "options": {"num_predict": 6, "temperature": 0}}

    def lines() -> tuple[list[dict], httpx.Headers]:
        with httpx.stream("POST", base + "/api/generate", json=body, timeout=120) as response:
            return [json.loads(line) for line in response.iter_lines()], response.headers

    first, _ = lines()
    again, headers = lines()
    assert headers["x-ember-cache"] == "hit"
    assert [line.get("response") for line in again] == [line.get("response") for line in first]
    assert again[-1]["done"] is True


def test_the_cache_is_off_by_default(tmp_path: Path) -> None:
    with running_server(home=tmp_path) as url:
        _ask(url, temperature=0)
        assert "x-ember-cache" not in _ask(url, temperature=0).headers
