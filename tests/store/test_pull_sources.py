"""`pull` from a local HTTP server and from a server impersonating the Hugging Face hub."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub.constants
import pytest

from ember.errors import CorruptModelError, PullError
from ember.store.gguf_file import read_gguf
from ember.store.pull import pull
from ember.store.store import ModelStore
from tests.gguf_files import write_tiny_gguf
from tests.http_server import FileServer


@pytest.fixture
def server() -> Iterator[FileServer]:
    with FileServer() as running:
        yield running


@pytest.fixture
def gguf_bytes(tmp_path: Path) -> bytes:
    return write_tiny_gguf(tmp_path / "served.gguf", tensors=40).read_bytes()


def _nothing_registered(store: ModelStore) -> None:
    assert store.list() == []
    assert not store.blobs.exists() or list(store.blobs.iterdir()) == []
    assert not store.tmp.exists() or list(store.tmp.iterdir()) == []


def test_pull_from_a_url(server: FileServer, gguf_bytes: bytes) -> None:
    server.files["/models/Tiny-Model.Q8_0.gguf"] = gguf_bytes
    result = pull(server.url("/models/Tiny-Model.Q8_0.gguf"))
    assert result.name == "tiny-model.q8_0:latest"
    assert result.digest == "sha256:" + hashlib.sha256(gguf_bytes).hexdigest()
    assert ModelStore().blob_path(result.digest).read_bytes() == gguf_bytes


def test_an_interrupted_download_resumes_and_is_not_visible_meanwhile(server: FileServer, gguf_bytes: bytes) -> None:
    store = ModelStore()
    server.files["/m.gguf"] = gguf_bytes
    server.interrupt_next_after(len(gguf_bytes) // 3)
    with pytest.raises(PullError, match="interrupted"):
        pull(server.url("/m.gguf"), name="resumed")
    assert store.get("resumed") is None and store.list() == []
    partials = list(store.partial.glob("*.partial"))
    assert len(partials) == 1
    kept = partials[0].stat().st_size
    assert 0 < kept < len(gguf_bytes)

    result = pull(server.url("/m.gguf"), name="resumed")
    assert result.digest == "sha256:" + hashlib.sha256(gguf_bytes).hexdigest()
    assert server.requests_to("/m.gguf")[-1][2].get("Range") == f"bytes={kept}-"
    assert store.blob_path(result.digest).read_bytes() == gguf_bytes
    assert list(store.partial.glob("*.partial")) == []


def test_a_wrong_sha256_is_refused_with_nothing_registered(server: FileServer, gguf_bytes: bytes) -> None:
    server.files["/m.gguf"] = gguf_bytes
    with pytest.raises(PullError, match="sha256"):
        pull(server.url("/m.gguf"), name="checked", sha256="ab" * 32)
    _nothing_registered(ModelStore())
    assert list(ModelStore().partial.glob("*.partial")) == []
    good = pull(server.url("/m.gguf"), name="checked", sha256=hashlib.sha256(gguf_bytes).hexdigest())
    assert good.name == "checked:latest"


def test_a_download_that_is_not_gguf_is_refused(server: FileServer) -> None:
    server.files["/page.gguf"] = b"<html>Sign in to download</html>" * 20
    with pytest.raises(CorruptModelError, match="not a usable GGUF"):
        pull(server.url("/page.gguf"), name="page")
    _nothing_registered(ModelStore())


def test_a_missing_url_says_so(server: FileServer) -> None:
    with pytest.raises(PullError, match="404"):
        pull(server.url("/nothing.gguf"))
    _nothing_registered(ModelStore())


@pytest.fixture
def hub(server: FileServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, gguf_bytes: bytes) -> FileServer:
    for variable in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", server.base_url)
    q8 = write_tiny_gguf(tmp_path / "q8.gguf", tensors=5).read_bytes()
    server.add_hf_repo(
        "someone/Tiny-GGUF", {"tiny.Q4_K_M.gguf": gguf_bytes, "tiny.Q8_0.gguf": q8, "README.md": b"# tiny\n"}
    )
    return server


def test_pull_from_the_hub_picks_q4_k_m_or_the_named_quant(hub: FileServer, gguf_bytes: bytes) -> None:
    default = pull("hf.co/someone/Tiny-GGUF")
    assert default.digest == "sha256:" + hashlib.sha256(gguf_bytes).hexdigest()
    assert default.name.startswith("hf.co/someone/tiny-gguf:")
    q8 = pull("hf.co/someone/Tiny-GGUF:Q8_0")
    assert q8.digest != default.digest
    assert len(read_gguf(ModelStore().blob_path(q8.digest)).tensors) == 5
    assert {str(m.name) for m in ModelStore().list()} == {default.name, q8.name}


def test_ember_pull_from_the_hub_on_the_command_line(hub: FileServer) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ember.cli.main", "pull", "hf.co/someone/Tiny-GGUF:q8_0", "--name", "tiny:q8"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    listed = subprocess.run([sys.executable, "-m", "ember.cli.main", "list"], capture_output=True, text=True)
    assert "tiny:q8" in listed.stdout
