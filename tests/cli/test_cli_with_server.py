"""`ember list / pull / cp / rm / show / create / run` while `ember serve` runs: they go through the server.

The server keeps its models in its own EMBER_HOME and the CLI gets another one, so a command can only see or
change the server's models by asking the server. Without a server the same commands act on the store
(tests/cli/test_models.py).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from ember.cli import remote
from ember.cli.main import main
from ember.store.defaults import mark_bundled_models_offered
from ember.store.store import ModelStore
from tests.gguf_files import write_tiny_gguf
from tests.server import running_server, serve_subprocess


def ember(env: dict[str, str], *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ember.cli.main", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=180,
        stdin=subprocess.DEVNULL,
    )


def _ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, result.stderr
    return result


def test_model_commands_go_through_the_server(model_path: Path, tmp_path: Path) -> None:
    server_home, cli_home = tmp_path / "server-home", tmp_path / "cli-home"
    server_store, cli_store = ModelStore(server_home / "models"), ModelStore(cli_home / "models")
    for store in (server_store, cli_store):
        mark_bundled_models_offered(store)  # both start empty, so the listings below show what the test did
    with serve_subprocess(env={"EMBER_HOME": str(server_home)}) as (base, server_env):
        env = {**server_env, "EMBER_HOME": str(cli_home)}

        pulled = _ok(ember(env, "pull", str(model_path), "--name", "local-copy"))
        assert pulled.stderr.startswith("pulled local-copy:latest (") and "98 MB" in pulled.stderr
        assert [str(m.name) for m in server_store.list()] == ["local-copy:latest"] and cli_store.list() == []

        listed = _ok(ember(env, "list")).stdout.splitlines()
        assert listed[0].split() == ["NAME", "ID", "SIZE", "MODIFIED"]
        assert listed[1].startswith("local-copy:latest") and "98 MB" in listed[1]

        assert _ok(ember(env, "cp", "local-copy", "Another:v1")).stderr.strip() == "copied 'local-copy' to 'another:v1'"
        assert server_store.get("another:v1") is not None

        shown = _ok(ember(env, "show", "another:v1")).stdout
        assert "architecture        llama" in shown and "Q4_1" in shown

        modelfile = tmp_path / "project" / "Modelfile"
        modelfile.parent.mkdir()
        write_tiny_gguf(modelfile.parent / "tiny.gguf")
        modelfile.write_text("FROM ./tiny.gguf\nSYSTEM Be brief.\nPARAMETER temperature 0.5\n")
        created = _ok(ember(env, "create", "tiny", "-f", "Modelfile", cwd=modelfile.parent))
        assert created.stderr.strip() == "created tiny:latest"
        facts = _ok(ember(env, "show", "tiny", "--json")).stdout
        assert '"system": "Be brief."' in facts and '"temperature": 0.5' in facts

        answered = _ok(ember(env, "run", "another:v1", "Say hi", "-n", "4", "--temp", "0", "--verbose"))
        assert answered.stdout.strip() and "eval count:" in answered.stderr
        running = httpx.get(base + "/api/ps").json()["models"]
        assert [model["name"] for model in running] == ["another:v1"]  # the server loaded it, and keeps it

        removed = _ok(ember(env, "rm", "another:v1", "tiny"))
        assert removed.stderr.splitlines() == ["deleted 'another:v1'", "deleted 'tiny:latest'"]
        assert [str(m.name) for m in server_store.list()] == ["local-copy:latest"]

        for args, fragment in (
            (["rm", "nosuch"], "not found"),
            (["cp", "nosuch", "x"], "not found"),
            (["cp", "local-copy", "../escape"], "invalid model name"),
            (["show", "nosuch"], "not found"),
            (["run", "nosuch", "hi"], "not found"),
            (["pull", "somename"], "'somename:latest' not found in the registry"),
            (["pull", str(tmp_path / "missing.gguf")], "no model file"),
        ):
            result = ember(env, *args)
            assert result.returncode != 0, args
            assert fragment in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)
            assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert cli_store.list() == []


def test_a_server_on_another_machine_gets_files_uploaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A server that is not on this machine cannot read local paths: the CLI uploads the files as blobs."""
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf")
    uploads: list[Path] = []
    upload = remote._upload

    def spy(path: Path) -> str:
        uploads.append(path)
        return upload(path)

    monkeypatch.setattr(remote, "_upload", spy)
    monkeypatch.setattr(remote, "server_is_local", lambda: False)
    with running_server() as base:
        monkeypatch.setenv("EMBER_HOST", base.removeprefix("http://"))
        remote.available.cache_clear()
        try:
            assert main(["pull", str(tiny), "--name", "uploaded"]) == 0
            (tmp_path / "Modelfile").write_text("FROM ./tiny.gguf\nSYSTEM Hi.\n")
            assert main(["create", "made", "-f", str(tmp_path / "Modelfile")]) == 0
        finally:
            remote.available.cache_clear()
    assert uploads == [tiny, tiny.resolve()]
    assert "pulled uploaded:latest" in capsys.readouterr().err
    manifest = ModelStore().get("made")
    assert manifest is not None and manifest.model_layer.digest == ModelStore().get("uploaded").model_layer.digest
