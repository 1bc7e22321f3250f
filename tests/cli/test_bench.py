"""`ember bench`: local mode through the engine, serving mode against ember and against llama-cpp-python's server.

The speed figures themselves are not asserted, only their shape and sanity: rates above zero, ordered
percentiles, no errors, clear failures.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ember.cli.main import main
from ember.store.bundled import DEFAULT_MODEL
from tests.server import free_port, running_server

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def bench(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = main(["bench", *args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def check_levels(document: dict[str, Any], concurrency: list[int], requests: int) -> None:
    assert document["mode"] == "serve"
    assert [level["concurrency"] for level in document["levels"]] == concurrency
    for level in document["levels"]:
        assert level["errors"] == 0, level["first_error"]
        assert level["completed"] == level["requests"] == requests
        assert level["output_tokens"] > 0
        assert level["throughput_tok_s"] > 0
        assert level["requests_per_s"] > 0
        for key in ("ttft_s", "itl_s", "e2e_s"):
            figures = level[key]
            assert 0 < figures["p50"] <= figures["p90"] <= figures["p99"], (key, figures)
        assert level["ttft_s"]["p99"] <= level["e2e_s"]["p99"]


def test_local_mode_reports_one_row_per_threads_and_test_and_plots(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    plot = tmp_path / "local.png"
    status, out, err = bench(
        capsys, "smollm2", "-p", "32", "-n", "16", "-r", "2", "-t", "1,2", "--json", "--plot", str(plot)
    )
    assert status == 0, err
    document = json.loads(out)
    assert document["mode"] == "local"
    assert document["model_size"] > 0 and document["model_n_params"] > 0
    rows = [(row["threads"], row["test"]) for row in document["results"]]
    assert sorted(rows) == [(1, "pp32"), (1, "tg16"), (2, "pp32"), (2, "tg16")]
    for row in document["results"]:
        assert len(row["samples_ts"]) == 2
        assert all(rate > 0 for rate in row["samples_ts"])
        assert row["avg_ts"] > 0
        assert row["stddev_ts"] >= 0
        assert row["n_batch"] == 512
    assert plot.read_bytes().startswith(PNG_SIGNATURE)


def test_local_mode_prints_llama_bench_columns(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = bench(capsys, "smollm2", "-p", "16", "-n", "8", "-r", "1", "-t", "1", "-b", "64")
    assert status == 0, err
    for header in ("model", "size", "params", "threads", "n_batch", "test", "t/s", "pp16", "tg8", "±", "MiB"):
        assert header in out, header


def test_local_mode_refuses_bad_input_with_one_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = bench(capsys, "no-such-model", "-p", "16", "-n", "8", "-r", "1")
    assert status != 0 and out == ""
    assert err.startswith("Error: ") and err.count("\n") == 1
    status, _, err = bench(capsys, "smollm2", "-t", "1,x")
    assert status != 0 and err.startswith("Error: --threads takes")


def test_serve_mode_against_ember(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    plot = tmp_path / "serve.png"
    common = ["--model", "smollm2", "--requests", "4", "--max-tokens", "16"]
    with running_server() as base:
        status, out, err = bench(
            capsys, "--serve", base, *common, "--concurrency", "1,2", "--json", "--plot", str(plot)
        )
        assert status == 0, err
        document = json.loads(out)
        check_levels(document, [1, 2], 4)
        # ember reports usage in the stream: the count is exact, the limit is reached
        assert all(level["output_tokens"] <= 4 * 16 for level in document["levels"])
        assert plot.read_bytes().startswith(PNG_SIGNATURE)

        # The Ollama API, at a request rate (Poisson arrivals), as a table
        ollama = ["--api", "ollama", "--rate", "50", "--requests", "2", "--max-tokens", "4"]
        status, out, err = bench(capsys, "--serve", base, "--model", "smollm2", *ollama)
        assert status == 0, err
        for header in ("rate (req/s)", "tok/s", "req/s", "TTFT p50/p90/p99 ms", "ITL", "E2E", "errors"):
            assert header in out

        status, out, err = bench(capsys, "--serve", base, "--model", "no-such-model", "--requests", "1")
        assert status == 1 and out == ""
        assert err.startswith("Error: ") and "no-such-model" in err and err.count("\n") == 1


def test_serve_mode_with_no_server_is_one_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = bench(capsys, "--serve", f"http://127.0.0.1:{free_port()}", "--requests", "1")
    assert status == 1 and out == ""
    assert err.startswith("Error: could not reach a server at http://127.0.0.1:") and err.count("\n") == 1
    status, _, err = bench(capsys, "--serve", "localhost:11434")
    assert status == 1 and err.startswith("Error: --serve takes a URL")


# llama_cpp.server, started with the weights' extra buffer types as ember chooses them (off on an AMX CPU, where
# the vendored llama.cpp's AMX kernels crash; see `extra_buffer_types_are_safe`).
LLAMA_CPP_SERVER = """
import runpy, sys
import llama_cpp.llama_cpp as bindings  # what llama_cpp.Llama calls
from ember.engine.llamacpp import extra_buffer_types_are_safe
default_params = bindings.llama_model_default_params
def model_params():
    params = default_params()
    params.use_extra_bufts = extra_buffer_types_are_safe()
    return params
bindings.llama_model_default_params = model_params
sys.argv[0] = "llama_cpp.server"
runpy.run_module("llama_cpp.server", run_name="__main__")
"""


@pytest.fixture(scope="module")
def llama_cpp_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """llama-cpp-python's own OpenAI-compatible server: a server that is not ember."""
    port = free_port()
    log = tmp_path_factory.mktemp("llama-cpp-server") / "stderr.txt"  # a file: llama.cpp's log would fill a pipe
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            LLAMA_CPP_SERVER,
            "--model",
            str(DEFAULT_MODEL.locate()),
            "--port",
            str(port),
            "--n_ctx",
            "512",
            # By default a new request interrupts the one streaming: concurrent requests would cut each other off.
            "--interrupt_requests",
            "False",
        ],
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
        stdin=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    try:
        while True:
            try:
                if httpx.get(base + "/v1/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"llama_cpp.server did not start: {log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.2)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def test_serve_mode_against_llama_cpp_server(capsys: pytest.CaptureFixture[str], llama_cpp_server: str) -> None:
    # No --model: the first model the server lists. It sends no usage in the stream: chunks are counted.
    status, out, err = bench(
        capsys, "--serve", llama_cpp_server, "--concurrency", "1,2", "--requests", "4", "--max-tokens", "16", "--json"
    )
    assert status == 0, err
    document = json.loads(out)
    assert document["model"].endswith(".gguf")
    check_levels(document, [1, 2], 4)

    status, out, err = bench(
        capsys,
        "--serve",
        llama_cpp_server,
        "--endpoint",
        "completions",
        "--concurrency",
        "1",
        "--requests",
        "2",
        "--max-tokens",
        "8",
        "--json",
    )
    assert status == 0, err
    check_levels(json.loads(out), [1], 2)
