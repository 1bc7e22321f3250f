"""`ember run` as a user runs it: a real subprocess with the real model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EMBER = [sys.executable, "-m", "ember.cli.main"]
GREEDY = ["--temp", "0", "--repeat-penalty", "1"]
QUESTION = "Which city is the capital of France? Answer in one word."


def ember(*args: str, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*EMBER, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def test_a_prompt_argument_is_answered_on_stdout() -> None:
    result = ember("run", "smollm2", "Which city is the capital of France? Answer in one word.", "-n", "24", *GREEDY)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert result.stderr == ""


def test_piped_stdin_is_the_prompt_and_is_appended_to_an_argument() -> None:
    piped = ember("run", "smollm2", "-n", "16", *GREEDY, stdin=QUESTION + "\n")
    assert piped.returncode == 0, piped.stderr
    assert "Paris" in piped.stdout
    both = ember("run", "smollm2", "Translate to French:", "-n", "16", "--verbose", *GREEDY, stdin="Good morning")
    alone = ember("run", "smollm2", "Translate to French:", "-n", "16", "--verbose", *GREEDY)
    assert both.returncode == alone.returncode == 0
    assert _prompt_tokens(both.stderr) > _prompt_tokens(alone.stderr)


def _prompt_tokens(verbose_output: str) -> int:
    line = next(line for line in verbose_output.splitlines() if line.startswith("prompt eval count:"))
    return int(line.split(":")[1].split()[0])


def test_llama_cpp_flags_and_a_prompt_file(tmp_path: Path) -> None:
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("Which city is the capital of France? Answer in one word.", encoding="utf-8")
    by_file = ember(
        "run", "-m", "smollm2", "-f", str(prompt_file), "-n", "24", "-c", "512", "-t", "1", "-ngl", "0", *GREEDY
    )
    by_flag = ember("run", "-m", "smollm2", "-p", QUESTION, "--n-predict", "24", "--ctx-size", "512", *GREEDY)
    assert by_file.returncode == by_flag.returncode == 0, by_file.stderr + by_flag.stderr
    assert by_file.stdout == by_flag.stdout
    assert "Paris" in by_file.stdout


def test_verbose_prints_ollama_style_timings_on_stderr() -> None:
    result = ember("run", "smollm2", "Hi", "-n", "8", "--verbose", *GREEDY)
    assert result.returncode == 0, result.stderr
    for label in (
        "total duration:",
        "load duration:",
        "prompt eval count:",
        "prompt eval rate:",
        "eval count:",
        "eval rate:",
    ):
        assert label in result.stderr
    assert "tokens/s" in result.stderr
    assert "eval count:           8 token(s)" in result.stderr


def test_format_json_prints_json() -> None:
    result = ember(
        "run", "smollm2", "Describe a cat as JSON with keys name and age.", "--format", "json", "-n", "200", *GREEDY
    )
    assert result.returncode == 0, result.stderr
    json.loads(result.stdout)


def test_a_stop_flag_and_a_seed() -> None:
    one = ember("run", "smollm2", "Count from one to ten in words.", "--seed", "5", "--temp", "0.9", "-n", "30")
    two = ember("run", "smollm2", "Count from one to ten in words.", "--seed", "5", "--temp", "0.9", "-n", "30")
    assert one.returncode == 0 and one.stdout == two.stdout
    stopped = ember(
        "run", "smollm2", "Count from one to ten in words, comma separated.", "--stop", ",", "-n", "40", *GREEDY
    )
    assert stopped.returncode == 0 and "," not in stopped.stdout


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["run", "nosuchmodel"], "model 'nosuchmodel:latest' not found"),
        (["run", "smollm2", "Hi", "--bogus-flag"], "No such option"),
        (["run", "smollm2", "Hi", "--temp", "-3"], "temperature"),
        (["run", "smollm2", "Hi", "--top-k", "many"], "top-k"),
        (["run", "smollm2", "Hi", "--format", "yaml"], "--format"),
        (["run", "../../no/such/model.gguf", "Hi"], "no model file"),
        (["run", "bad name!"], "invalid model name"),
        (["run"], "name a model"),
        (["run", "smollm2"], "give a prompt"),
        (["nosuchcommand"], "No such command"),
    ],
)
def test_errors_are_one_clear_line_and_a_failure_status(args: list[str], fragment: str) -> None:
    result = ember(*args)
    assert result.returncode != 0
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ")


def test_a_corrupt_model_file_is_one_clear_line(tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\xff" * 64)
    result = ember("run", str(broken), "Hi")
    assert result.returncode != 0
    assert "broken.gguf" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_an_over_long_prompt_names_both_numbers() -> None:
    result = ember("run", "smollm2", "-c", "64", "--raw", "word " * 200)
    assert result.returncode != 0
    assert "num_ctx" in result.stderr and " 64 " in result.stderr and "Traceback" not in result.stderr


def test_version_and_help() -> None:
    assert ember("--version").stdout.startswith("ember version ")
    help_text = ember("run", "--help").stdout
    for flag in (
        "--verbose",
        "--format",
        "--system",
        "--prompt",
        "--file",
        "--n-predict",
        "--ctx-size",
        "--n-gpu-layers",
        "--threads",
        "--temp",
        "--top-k",
        "--top-p",
        "--min-p",
        "--repeat-penalty",
        "--seed",
        "--stop",
    ):
        assert flag in help_text
