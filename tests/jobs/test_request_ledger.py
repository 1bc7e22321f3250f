"""The worker's request ledger: deliveries counted per request, answered requests remembered across processes."""

from __future__ import annotations

import time
from pathlib import Path

from ember.jobs.request_ledger import RequestLedger


def test_deliveries_are_counted_until_answered(tmp_path: Path) -> None:
    ledger = RequestLedger(tmp_path / "ember.db")
    assert ledger.begin("q", "r").deliveries == 1
    assert ledger.begin("q", "r").deliveries == 2
    ledger.release("q", "r")  # the broker went away: that delivery does not count
    ledger.failed("q", "r", "boom")
    state = ledger.begin("q", "r")
    assert (state.status, state.deliveries, state.last_error) == ("working", 2, "boom")
    ledger.answered("q", "r", "responses")
    again = RequestLedger(tmp_path / "ember.db").begin("q", "r")  # another worker process, the same file
    assert (again.status, again.deliveries) == ("answered", 2)
    assert RequestLedger(tmp_path / "ember.db").begin("other-queue", "r").status == "working"


def test_dead_requests_stay_dead_and_old_ones_are_forgotten(tmp_path: Path) -> None:
    ledger = RequestLedger(tmp_path / "ember.db")
    ledger.begin("q", "r")
    ledger.dead("q", "r", "bad", "q.dead")
    assert ledger.begin("q", "r").status == "dead"
    time.sleep(0.01)
    assert ledger.prune(older_than=0) == 1
    assert ledger.state("q", "r") is None
