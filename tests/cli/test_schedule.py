"""`ember schedule` as a user types it, and `ember serve` firing a run that was missed while it was down."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from tests.server import serve_subprocess


def _ember(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ember.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env or os.environ.copy(),
        stdin=subprocess.DEVNULL,
    )


def test_add_run_list_history_rm_and_a_missed_run_fired_by_serve(tmp_path: Path) -> None:
    output = tmp_path / "summaries" / "{name}-{date}-{run}.txt"
    options = ["--option", "num_ctx=256", "--option", "num_predict=6", "--option", "temperature=0"]
    options += ["--option", "num_thread=1"]
    added = _ember(
        "schedule",
        "add",
        "nightly",
        "--cron",
        "0 3 * * *",
        "--prompt",
        "Say one word.",
        *options,
        "--output",
        str(output),
    )
    assert added.returncode == 0 and "added nightly: next run" in added.stderr, added.stderr
    refused = _ember("schedule", "add", "bad", "--cron", "0 3 * *", "--prompt", "x")
    assert refused.returncode == 1 and refused.stderr.startswith("Error: invalid schedule: cron")

    ran = _ember("schedule", "run", "nightly")  # no server: answered in this process
    today = date.today().isoformat()
    first = tmp_path / "summaries" / f"nightly-{today}-1.txt"
    assert ran.returncode == 0 and "run 1 of nightly succeeded" in ran.stderr, ran.stderr
    assert first.read_text() == ran.stdout.rstrip("\n") != ""

    with sqlite3.connect(Path(os.environ["EMBER_HOME"]) / "ember.db") as db:  # as if 03:00 passed, no server up
        db.execute("UPDATE schedules SET next_run_at = ? WHERE name = 'nightly'", (time.time() - 3600,))
    with serve_subprocess() as (_, env):
        missed = tmp_path / "summaries" / f"nightly-{today}-2.txt"
        deadline = time.monotonic() + 240
        while not missed.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert missed.exists() and missed.read_text()
        through_server = _ember("schedule", "run", "nightly", env=env)
        assert through_server.returncode == 0 and "run 3 of nightly succeeded" in through_server.stderr
        history = _ember("schedule", "history", "nightly", env=env).stdout.splitlines()
    assert history[0].split()[:2] == ["RUN", "STARTED"]
    rows = [line.split() for line in history[1:]]
    assert [(row[0], row[3], row[4]) for row in rows] == [
        ("3", "manual", "succeeded"),
        ("2", "missed", "succeeded"),
        ("1", "manual", "succeeded"),
    ]
    listed = _ember("schedule", "list").stdout
    assert "nightly" in listed and "0 3 * * *" in listed and "succeeded" in listed
    assert _ember("schedule", "rm", "nightly").returncode == 0
    assert "nightly" not in _ember("schedule", "list").stdout
    assert len(_ember("schedule", "history", "nightly").stdout.splitlines()) == 4  # its history stays
    gone = _ember("schedule", "run", "nightly")
    assert gone.returncode == 1 and "no schedule named 'nightly'" in gone.stderr
