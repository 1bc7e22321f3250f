"""`ember batch` in this process with the real default model: formats, failures, and resuming after SIGKILL."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ember.cli.main import main

FAST = ["--temp", "0", "--repeat-penalty", "1", "-n", "6", "-c", "512", "-np", "4"]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def answers(path: Path) -> dict[str, str]:
    return {
        line["custom_id"]: line["response"]["body"]["choices"][0]["message"]["content"] for line in read_jsonl(path)
    }


def test_text_lines_give_openai_batch_output_in_input_order_and_a_rerun_does_nothing_again(tmp_path, capsys) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Name a colour.\nName a fruit.\n\nName a planet.\n")
    out = tmp_path / "out.jsonl"
    assert main(["batch", str(prompts), "--lines", "-o", str(out), *FAST]) == 0
    lines = read_jsonl(out)
    assert [line["custom_id"] for line in lines] == ["prompts.txt:1", "prompts.txt:2", "prompts.txt:4"]
    for line in lines:
        assert line["id"].startswith("batch_req_") and line["error"] is None
        assert line["response"]["status_code"] == 200 and line["response"]["request_id"].startswith("req_")
        body = line["response"]["body"]
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"].strip()
        assert body["usage"]["completion_tokens"] <= 6
    assert "3 of 3 line(s) succeeded" in capsys.readouterr().err
    first = answers(out)
    assert main(["batch", str(prompts), "--lines", "-o", str(out), *FAST]) == 0
    assert "(3 done earlier)" in capsys.readouterr().err and answers(out) == first
    journal = read_jsonl(out.with_name("out.jsonl.journal"))
    assert len(journal) == 1 + 3  # the header and one record per line: nothing ran twice


def test_a_failing_line_is_recorded_and_the_rest_go_on_then_retry_failed(tmp_path, capsys) -> None:
    requests = tmp_path / "requests.jsonl"
    good = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    bad = {**good, "temperature": -3}  # refused by the model's option check: a 400 for this line only
    requests.write_text(
        "".join(
            json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": body}) + "\n"
            for cid, body in (("good", good), ("bad", bad), ("also-good", {**good, "n": 2}))
        )
    )
    out = tmp_path / "out.jsonl"
    assert main(["batch", str(requests), "-o", str(out), "-c", "512"]) == 2
    lines = {line["custom_id"]: line for line in read_jsonl(out)}
    assert list(lines) == ["good", "bad", "also-good"]
    failed = lines["bad"]["response"]
    assert failed["status_code"] == 400 and "temperature" in failed["body"]["error"]["message"]
    assert failed["body"]["error"]["type"] == "invalid_request_error"
    assert lines["good"]["response"]["status_code"] == 200
    two = lines["also-good"]["response"]["body"]  # n = 2 in this process: two choices of one prompt
    assert [choice["index"] for choice in two["choices"]] == [0, 1]
    assert all(choice["message"]["content"].strip() for choice in two["choices"])
    assert two["usage"]["prompt_tokens"] == lines["good"]["response"]["body"]["usage"]["prompt_tokens"]  # once
    assert "2 of 3 line(s) succeeded, 1 failed" in capsys.readouterr().err
    assert main(["batch", str(requests), "-o", str(out), "-c", "512", "--retry-failed"]) == 2  # fails again
    journal = read_jsonl(out.with_name("out.jsonl.journal"))[1:]
    assert collections.Counter(record["custom_id"] for record in journal) == {"good": 1, "bad": 2, "also-good": 1}


def test_json_format_writes_the_guides_shape_per_input_file(tmp_path) -> None:
    folder = tmp_path / "input"
    folder.mkdir()
    (folder / "first.txt").write_text("Say hello.")
    (folder / "second.txt").write_text("Say goodbye.")
    out = tmp_path / "output"
    assert main(["batch", str(folder), "--format", "json", "-o", str(out), *FAST]) == 0
    for stem, prompt in (("first", "Say hello."), ("second", "Say goodbye.")):
        (entry,) = json.loads((out / f"{stem}_results.json").read_text())
        assert entry["prompt"] == prompt and entry["response"].strip() and entry["tokens"] >= 1
        assert entry["duration"] > 0


def test_a_journal_from_other_options_is_refused_until_restart(tmp_path, capsys) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("Say yes.")
    out = tmp_path / "o.jsonl"
    assert main(["batch", str(prompts), "-o", str(out), *FAST]) == 0
    assert main(["batch", str(prompts), "-o", str(out), *FAST, "--seed", "7"]) == 1
    assert "belongs to another run" in capsys.readouterr().err
    assert main(["batch", str(prompts), "-o", str(out), *FAST, "--seed", "7", "--restart"]) == 0


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_killed_with_sigkill_and_rerun_finishes_each_line_exactly_once(tmp_path) -> None:
    prompts = tmp_path / "forty.txt"
    prompts.write_text("".join(f"Write a sentence about the number {i}.\n" for i in range(40)))
    out = tmp_path / "out.jsonl"
    journal = out.with_name("out.jsonl.journal")
    command = [sys.executable, "-m", "ember.cli.main", "batch", str(prompts), "--lines", "-o", str(out)]
    command += ["--temp", "0", "-n", "12", "-c", "512", "-np", "4"]
    process = subprocess.Popen(command, env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not journal.exists() or len(journal.read_text().splitlines()) < 1 + 6:
        assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = len(journal.read_text().splitlines()) - 1
    assert 6 <= done_before < 40 and not out.exists()
    rerun = subprocess.run(command, env=os.environ.copy(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    ids = [line["custom_id"] for line in read_jsonl(out)]
    assert ids == [f"forty.txt:{i + 1}" for i in range(40)]
    records = collections.Counter(record["index"] for record in read_jsonl(journal)[1:])
    assert sorted(records) == list(range(40)) and set(records.values()) == {1}  # none lost, none done twice
    assert "done earlier" in rerun.stderr
