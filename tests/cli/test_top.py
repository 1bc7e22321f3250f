"""`ember top` in a pseudo-terminal against a live server: it shows the loaded model, its slots and TTFT, the
recent errors, refreshes, and quits on q."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import httpx
import pexpect

from ember.cli.top import quantile
from tests.server import running_server


def test_top_shows_a_live_server_and_quits_on_q(tmp_path: Path) -> None:
    with running_server(home=tmp_path, num_parallel=3) as base:
        body = {"model": "smollm2", "prompt": "Hi", "stream": False, "options": {"num_predict": 4}}
        assert httpx.post(base + "/api/generate", json=body, timeout=120).status_code == 200
        missing = httpx.post(base + "/api/generate", json={**body, "model": "no-such-model"}, timeout=30)
        assert missing.status_code == 404
        env = {**os.environ, "EMBER_HOST": base.removeprefix("http://"), "COLUMNS": "160", "LINES": "40"}
        child = pexpect.spawn(
            sys.executable, ["-m", "ember.cli.main", "top", "--interval", "0.5"], env=env, timeout=30,
            dimensions=(40, 160), encoding="utf-8",
        )  # fmt: skip
        try:
            child.expect("smollm2:latest")
            child.expect("0/3")  # slots busy / total
            child.expect(r"\d+ ms")  # a TTFT percentile from the histogram
            child.expect("no-such-model")  # the recent error
            assert httpx.post(base + "/api/generate", json=body, timeout=120).status_code == 200
            child.expect("smollm2:latest")  # still refreshing
            child.send("q")
            child.expect(pexpect.EOF)
        finally:
            child.close()
        assert child.exitstatus == 0, child.before


def test_top_says_so_when_no_server_runs(tmp_path: Path) -> None:
    env = {**os.environ, "EMBER_HOST": "127.0.0.1:9"}
    child = pexpect.spawn(sys.executable, ["-m", "ember.cli.main", "top"], env=env, timeout=30, encoding="utf-8")
    child.expect("could not read an ember server at http://127.0.0.1:9")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus != 0


def test_quantiles_from_histogram_buckets() -> None:
    buckets = [(0.1, 10.0), (0.5, 90.0), (1.0, 100.0), (float("inf"), 100.0)]
    assert quantile(buckets, 0.5) == 0.1 + 0.4 * (40 / 80)
    assert quantile(buckets, 0.95) == 0.5 + 0.5 * (5 / 10)
    assert quantile([(0.1, 0.0), (float("inf"), 0.0)], 0.5) is None
