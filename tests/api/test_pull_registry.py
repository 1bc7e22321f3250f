"""POST /api/pull of an Ollama library name, through the real `ollama` client: Ollama's progress lines, as Open
WebUI reads them (a line with a digest is progress; the last line is a bare {"status": "success"})."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import pytest

from ember.store.store import MODEL_MEDIA_TYPE, PARAMS_MEDIA_TYPE, TEMPLATE_MEDIA_TYPE
from tests.http_server import FileServer
from tests.registry import LocalRegistry, digest_of
from tests.server import running_server


@pytest.fixture
def registry(model_path: Path) -> Iterator[tuple[LocalRegistry, dict[str, object]]]:
    with FileServer() as server:
        registry = LocalRegistry(server)
        layers = [
            (MODEL_MEDIA_TYPE, model_path.read_bytes()),
            (TEMPLATE_MEDIA_TYPE, b"{{ .System }} {{ .Prompt }}"),
            (PARAMS_MEDIA_TYPE, b'{"temperature": 0.2}'),
        ]
        yield registry, registry.publish("library/smolreg:135m", layers)


def test_pull_streams_ollama_progress_and_a_bare_success(registry: tuple[LocalRegistry, dict[str, object]]) -> None:
    local, manifest = registry
    sizes = {entry["digest"]: entry["size"] for entry in [manifest["config"], *manifest["layers"]]}  # type: ignore[misc]
    with running_server(registry=local.url) as base:
        client = ollama.Client(host=base)
        lines = list(client.pull("smolreg:135m", stream=True))
        assert lines[0].status == "pulling manifest"
        progress = [line for line in lines if line.digest]
        assert {line.digest for line in progress} == set(sizes)
        for digest, size in sizes.items():
            last = [line for line in progress if line.digest == digest][-1]
            assert last.status == f"pulling {digest[7:19]}" and last.completed == last.total == size
        assert [line.status for line in lines[-3:]] == ["verifying sha256 digest", "writing manifest", "success"]
        assert [model.model for model in client.list().models] == ["smolreg:135m"]

        model_digest = next(entry["digest"] for entry in manifest["layers"] if entry["mediaType"] == MODEL_MEDIA_TYPE)  # type: ignore[attr-defined]
        assert len(local.blob_requests(model_digest)) == 1
        with httpx.stream("POST", base + "/api/pull", json={"model": "smolreg:135m"}, timeout=120) as response:
            raw = [json.loads(text) for text in response.iter_lines() if text.strip()]
        assert raw[-1] == {"status": "success"}  # no digest on it: Open WebUI would read that as cancelled
        assert raw[-2]["model"] == "smolreg:135m" and "digest" not in raw[-2]  # ember's note of what it registered
        (again,) = [line for line in raw if line.get("digest") == model_digest]  # one line: the store has it
        assert again["completed"] == again["total"] == sizes[model_digest]
        assert len(local.blob_requests(model_digest)) == 1  # so it was not fetched again

        answer = httpx.post(base + "/api/pull", json={"model": "smolreg:135m", "stream": False}, timeout=120)
        assert answer.status_code == 200 and answer.json() == {"status": "success"}

        with pytest.raises(ollama.ResponseError) as unknown:
            client.pull("nosuch:7b")
        assert unknown.value.status_code == 404 and "'nosuch:7b' not found" in unknown.value.error
        refused = httpx.post(base + "/api/pull", json={"model": "smolreg:135m", "insecure": "yes"})
        assert refused.status_code == 400 and "insecure" in refused.json()["error"]


def test_ember_pull_through_a_server_shows_a_bar_per_file(
    registry: tuple[LocalRegistry, dict[str, object]], model_path: Path
) -> None:
    local, _ = registry
    digest = digest_of(model_path.read_bytes())
    with running_server(registry=local.url) as base:
        env = {**os.environ, "EMBER_HOST": base.removeprefix("http://")}
        command = [sys.executable, "-m", "ember.cli.main", "pull", "smolreg:135m"]
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"pulling {digest[7:19]}" in result.stderr  # the model file's progress bar
    assert result.stderr.splitlines()[-1] == f"pulled smolreg:135m ({digest[7:19]}, 98 MB)"
