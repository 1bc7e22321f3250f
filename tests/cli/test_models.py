"""`ember pull / list / show / cp / rm / create` as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

EMBER = [sys.executable, "-m", "ember.cli.main"]


def ember(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*EMBER, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, stdin=subprocess.DEVNULL
    )


def test_show_reads_facts_from_the_file() -> None:
    result = ember("show", "smollm2")
    assert result.returncode == 0, result.stderr
    lines = {line.split(None, 1)[0]: line for line in result.stdout.splitlines() if line.strip()}
    assert "llama" in lines["architecture"]
    assert lines["layers"].split()[-1] == "30"
    assert "8192" in result.stdout.split("context length", 1)[1].splitlines()[0]
    assert "Q4_1" in result.stdout
    assert "Apache-2.0" in result.stdout

    facts = json.loads(ember("show", "smollm2", "--json").stdout)
    assert facts["architecture"] == "llama" and facts["layers"] == 30 and facts["context_length"] == 8192
    assert facts["embedding_length"] == 576 and facts["quantization"] == "Q4_1"
    assert 130_000_000 < facts["parameters"] < 140_000_000
    assert "<|im_start|>" in facts["template"]


def test_pull_list_cp_rm_round_trip(model_path: Path) -> None:
    pulled = ember("pull", str(model_path), "--name", "local-copy")
    assert pulled.returncode == 0, pulled.stderr
    assert "local-copy:latest" in pulled.stderr

    listed = ember("list").stdout.splitlines()
    assert listed[0].split() == ["NAME", "ID", "SIZE", "MODIFIED"]
    row = next(line for line in listed if line.startswith("local-copy:latest"))
    assert "98 MB" in row and ("ago" in row or "just now" in row)

    assert ember("cp", "local-copy", "another:v1").returncode == 0
    assert any(line.startswith("another:v1") for line in ember("list").stdout.splitlines())

    answered = ember("run", "another:v1", "Say hi", "-n", "4", "--temp", "0")
    assert answered.returncode == 0 and answered.stdout.strip()

    removed = ember("rm", "local-copy", "another:v1")
    assert removed.returncode == 0, removed.stderr
    assert ember("list").stdout.splitlines()[1:] == []


def test_errors_are_one_line() -> None:
    for args, fragment in (
        (["rm", "nosuch"], "not found"),
        (["cp", "nosuch", "x"], "not found"),
        (["show", "nosuch"], "not found"),
        (["pull", "../../etc/shadow.gguf"], "no model file"),
        (["pull", "somename"], "'somename:latest' not found in the registry"),
        (["cp", "smollm2", "../escape"], "invalid model name"),
        (["create", "x", "-f", "/nonexistent/Modelfile"], "no Modelfile"),
    ):
        result = ember(*args)
        assert result.returncode != 0, args
        assert fragment in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
