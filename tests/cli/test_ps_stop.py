"""`ember ps` and `ember stop` against `ember serve`, as a user runs them."""

from __future__ import annotations

import subprocess
import sys

import httpx

from tests.server import serve_subprocess


def ember(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ember.cli.main", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def test_ps_shows_loaded_models_and_stop_unloads_them() -> None:
    with serve_subprocess() as (base, env):
        empty = ember(env, "ps")
        assert empty.returncode == 0, empty.stderr
        assert empty.stdout.split() == ["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "SLOTS", "UNTIL"]

        answer = httpx.post(
            base + "/api/generate",
            timeout=120,
            json={"model": "smollm2", "prompt": "Hi", "stream": False, "keep_alive": -1, "options": {"num_predict": 3}},
        )
        assert answer.status_code == 200, answer.text

        listed = ember(env, "ps")
        assert listed.returncode == 0, listed.stderr
        row = listed.stdout.splitlines()[1]
        assert row.startswith("smollm2:latest")
        assert "100% CPU" in row and "4096" in row and "0/4" in row and "Forever" in row

        stopped = ember(env, "stop", "smollm2")
        assert stopped.returncode == 0, stopped.stderr
        assert ember(env, "ps").stdout.splitlines()[1:] == []

        again = ember(env, "stop", "smollm2")
        assert again.returncode != 0 and "not loaded" in again.stderr and "Traceback" not in again.stderr

    gone = ember(env, "ps")
    assert gone.returncode != 0
    assert "could not reach an ember server" in gone.stderr and len(gone.stderr.strip().splitlines()) == 1
