"""A server killed with SIGKILL in the middle of a batch resumes it at start; each line ends up done once."""

from __future__ import annotations

import collections
import io
import json
import signal
import sqlite3
import time

import openai
import pytest

from tests.server import serve_process


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigkill_mid_batch_then_restart_completes_each_line_exactly_once(tmp_path) -> None:
    env = {"EMBER_HOME": str(tmp_path / "home"), "EMBER_NUM_PARALLEL": "3"}
    lines = [
        {
            "custom_id": f"line-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "smollm2",
                "messages": [{"role": "user", "content": f"Write one sentence about the number {i}."}],
                "max_tokens": 4,
                "temperature": 0,
            },
        }
        for i in range(40)
    ]
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    with serve_process(env) as (process, base, _):
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        file_id = client.files.create(file=("forty.jsonl", io.BytesIO(data)), purpose="batch").id
        batch_id = client.batches.create(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
        ).id
        deadline = time.monotonic() + 300
        while (done := client.batches.retrieve(batch_id).request_counts.completed) < 5:
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert done < 40
    with serve_process(env) as (_, base, _):  # the same home: the batch resumes at start
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        deadline = time.monotonic() + 600
        while (batch := client.batches.retrieve(batch_id)).status != "completed":
            # finalizing: every line answered, the output file being written
            assert batch.status in ("in_progress", "finalizing") and time.monotonic() < deadline, batch
            time.sleep(0.2)
        assert batch.request_counts.model_dump() == {"total": 40, "completed": 40, "failed": 0}
        assert batch.error_file_id is None
        output = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
    ids = collections.Counter(line["custom_id"] for line in output)
    assert sorted(ids) == sorted(f"line-{i}" for i in range(40)) and set(ids.values()) == {1}
    with sqlite3.connect(tmp_path / "home" / "ember.db") as db:  # one stored result per line, no more
        assert db.execute("SELECT COUNT(*), COUNT(DISTINCT line) FROM batch_results").fetchone() == (40, 40)
