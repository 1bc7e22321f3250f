"""The bundled default model on a fresh EMBER_HOME: listed everywhere, registered once, and gone for good when
the user removes it."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import ollama
import openai
import pytest

from ember.store.pull import pull
from ember.store.resolve import resolve_model
from ember.store.store import ModelStore
from tests.server import free_port, running_server


def _ember_list() -> list[str]:
    """`ember list` in a new process, with no server to talk to: the names it prints."""
    env = {**os.environ, "EMBER_HOST": f"127.0.0.1:{free_port()}"}
    result = subprocess.run(
        [sys.executable, "-m", "ember.cli.main", "list"], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return [line.split()[0] for line in result.stdout.splitlines()[1:]]


def test_a_fresh_home_lists_the_default_model(fresh_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _ember_list() == ["smollm2:latest"]

    monkeypatch.setenv("EMBER_HOME", str(fresh_home / "another"))  # a server's first request on a fresh home
    with running_server() as base:
        assert [model.model for model in ollama.Client(host=base).list().models] == ["smollm2:latest"]
        listed = httpx.get(base + "/api/tags").json()["models"][0]
        assert listed["details"]["quantization_level"] == "Q4_1" and listed["size"] > 90_000_000
        ids = [card.id for card in openai.OpenAI(base_url=base + "/v1", api_key="unused").models.list().data]
        assert ids == ["smollm2:latest"]


def test_a_removed_default_model_does_not_come_back(fresh_home: Path, model_path: Path) -> None:
    store = ModelStore()
    (manifest,) = store.list()
    assert str(manifest.name) == "smollm2:latest"
    blob = store.blob_path(manifest.model_layer.digest)
    assert os.path.samefile(blob, model_path)  # a hard link: registering copied nothing
    manifest_path = store.manifest_path(manifest.name)
    registered_at = manifest_path.stat().st_mtime_ns
    assert [str(m.name) for m in ModelStore().list()] == ["smollm2:latest"]
    assert manifest_path.stat().st_mtime_ns == registered_at  # opened again: not registered again

    ModelStore().remove("smollm2")
    assert ModelStore().list() == [] and _ember_list() == []
    assert not blob.exists() and model_path.is_file()  # the store's link went, the package's file stays
    assert resolve_model("smollm2").path == model_path  # it still runs by name: it ships with ember

    assert pull("smollm2").name == "smollm2:latest"  # and pulling it lists it again
    assert [str(m.name) for m in ModelStore().list()] == ["smollm2:latest"]


def test_first_opens_at_once_register_it_once(fresh_home: Path) -> None:
    listings: list[list[str]] = []
    errors: list[BaseException] = []

    def open_and_list() -> None:
        try:
            listings.append([str(m.name) for m in ModelStore().list()])
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=open_and_list) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == [] and listings == [["smollm2:latest"]] * 4
    store = ModelStore()
    assert len(list(store.blobs.iterdir())) == 3  # the model, its license, its config: once each
    assert list(store.tmp.iterdir()) == []
