"""/api/schedules on a running server: add, list, run now with the real model, history, remove; files confined."""

from __future__ import annotations

import os
from pathlib import Path

import httpx

from tests.jobs.conftest import OPTIONS
from tests.server import running_server


def test_schedules_through_the_api() -> None:
    job = {
        "name": "api-job",
        "cron": "0 18 * * *",
        "model": "smollm2",
        "prompt": "Say one word.",
        "options": OPTIONS,
        "output": "out/{name}.txt",
    }
    with running_server() as url, httpx.Client(base_url=url, timeout=300) as client:
        added = client.post("/api/schedules", json=job)
        assert added.status_code == 200, added.text
        assert added.json()["next_run_at"].endswith("Z") and added.json()["last_run"] is None
        assert client.post("/api/schedules", json=job).status_code == 409
        outside = client.post("/api/schedules", json=job | {"name": "escape", "output": "/tmp/escape.txt"})
        assert outside.status_code == 400 and "relative path" in outside.json()["error"]
        upward = client.post("/api/schedules", json=job | {"name": "escape", "prompt": None, "prompt_file": "../x"})
        assert upward.status_code == 400
        capped = client.post("/api/schedules", json=job | {"name": "big", "options": {"num_predict": 10**7}})
        assert capped.status_code == 400 and "limit" in capped.json()["error"]
        assert [s["name"] for s in client.get("/api/schedules").json()["schedules"]] == ["api-job"]

        run = client.post("/api/schedules/api-job/run").json()
        output = Path(os.environ["EMBER_HOME"]) / "schedules" / "out" / "api-job.txt"
        assert run["status"] == "succeeded" and run["trigger"] == "manual", run
        assert run["outputs"] == [str(output)] and output.read_text() == run["response"] != ""
        history = client.get("/api/schedules/api-job/history").json()["runs"]
        assert [(r["id"], r["status"]) for r in history] == [(run["id"], "succeeded")]
        assert client.get("/api/schedules/api-job").json()["last_run"]["id"] == run["id"]

        assert client.delete("/api/schedules/api-job").json()["status"] == "removed"
        assert client.get("/api/schedules/api-job").status_code == 404
        assert client.post("/api/schedules/api-job/run").status_code == 404
        assert client.get("/api/schedules/nope/history").status_code == 404
