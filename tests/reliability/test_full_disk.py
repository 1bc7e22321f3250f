"""A full disk during a pull, a create and conversation writes: a clear error, nothing half-made, the server up.

EMBER_HOME lies on a small tmpfs the test mounts (it runs as root; without the right to mount it fails and
says why rather than skip).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import gguf
import httpx
import numpy as np
import pytest

from tests.http_server import FileServer
from tests.server import running_server

DISK_MB = 16


@pytest.fixture
def small_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A 16 MB tmpfs as EMBER_HOME (the store reads EMBER_HOME itself, so the environment says it too)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.fail(
            "the full-disk tests mount a small tmpfs, which needs root (or CAP_SYS_ADMIN); "
            f"`mount -t tmpfs` failed: {result.stderr.strip() or result.returncode}"
        )
    monkeypatch.setenv("EMBER_HOME", str(mount))
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _big_gguf(path: Path, megabytes: int) -> Path:
    """A structurally valid GGUF file of about `megabytes` MB (one large tensor)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("big")
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_block_count(1)
    writer.add_array("tokenizer.ggml.tokens", ["<s>", "</s>", "a", "b"])
    writer.add_tensor("blk.0.weight", np.ones((megabytes * 1024 * 256 // 8, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _says_disk_full(response: httpx.Response) -> bool:
    body = response.json()
    message = body["error"] if isinstance(body.get("error"), str) else body["error"]["message"]
    return "disk" in message and ("full" in message or "space" in message)


def _leftovers(home: Path) -> list[str]:
    """Files in the store besides the bundled model's registration: what a failed write may have left."""
    models = home / "models"
    if not models.exists():
        return []
    return sorted(
        str(path.relative_to(models))
        for path in models.rglob("*")
        if path.is_file() and "registry.ollama.ai/library/smollm2" not in str(path) and path.stat().st_size > 0
        and not path.name.startswith(".")  # the store's own marks (the bundled model offered)
    )  # fmt: skip


def _fill(disk: Path) -> Path:
    """Fill the disk to the last byte (in ever smaller writes, unbuffered)."""
    filler = disk / "filler"
    descriptor = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 4096, 1):
            while True:
                try:
                    os.write(descriptor, b"\0" * size)
                except OSError:
                    break
    finally:
        os.close(descriptor)
    return filler


def test_a_pull_and_a_create_on_a_full_disk_fail_clearly_and_leave_nothing(small_disk: Path, tmp_path: Path) -> None:
    big = _big_gguf(tmp_path / "big.gguf", DISK_MB + 8)  # larger than the whole disk
    with FileServer() as files, running_server(home=small_disk) as base:
        before = _leftovers(small_disk)
        files.files["/big.gguf"] = big.read_bytes()
        pulled = httpx.post(
            base + "/api/pull",
            json={"model": files.base_url + "/big.gguf", "destination": "big:v1", "stream": False},
            timeout=120,
        )
        assert 400 <= pulled.status_code < 600 and pulled.status_code != 500, pulled.text
        assert _says_disk_full(pulled), pulled.text
        created = httpx.post(
            base + "/api/create", json={"model": "big:v2", "modelfile": f"FROM {big}", "stream": False}, timeout=120
        )
        assert created.status_code >= 400, created.text
        assert _says_disk_full(created), created.text
        digest = "sha256:" + hashlib.sha256(big.read_bytes()).hexdigest()
        uploaded = httpx.post(base + f"/api/blobs/{digest}", content=big.read_bytes(), timeout=120)
        assert uploaded.status_code >= 400 and _says_disk_full(uploaded), uploaded.text
        names = [model["name"] for model in httpx.get(base + "/api/tags", timeout=30).json()["models"]]
        assert not any(name.startswith("big") for name in names)
        assert _leftovers(small_disk) == before  # no partial blob, no manifest
        assert httpx.get(base + "/health", timeout=10).status_code == 200


def test_conversation_writes_on_a_full_disk_fail_clearly_and_leave_nothing(small_disk: Path) -> None:
    with running_server(home=small_disk) as base:
        api = httpx.Client(base_url=base, timeout=120)
        conversation = api.post("/api/conversations", json={"model": "smollm2", "title": "t"}).json()["conversation"]
        body = {"content": "Say hi.", "stream": False, "options": {"num_predict": 4}}
        assert api.post(f"/api/conversations/{conversation['id']}/chat", json=body).status_code == 200
        stored = api.get(f"/api/conversations/{conversation['id']}").json()["messages"]
        filler = _fill(small_disk)
        big_message = {"content": "x" * 2_000_000, "stream": False, "options": {"num_predict": 4}}
        turn = api.post(f"/api/conversations/{conversation['id']}/chat", json=big_message)
        assert turn.status_code >= 400, turn.text
        assert _says_disk_full(turn), turn.text
        created = api.post("/api/conversations", json={"model": "smollm2", "title": "u", "system": "y" * 200_000})
        assert created.status_code >= 400 and _says_disk_full(created), created.text
        assert api.get("/health").status_code == 200
        filler.unlink()
        after = api.get(f"/api/conversations/{conversation['id']}").json()["messages"]
        assert [(m["id"], m["status"]) for m in after] == [(m["id"], m["status"]) for m in stored]
        titles = [c["title"] for c in api.get("/api/conversations").json()["conversations"]]
        assert titles == ["t"]
        assert api.post(f"/api/conversations/{conversation['id']}/chat", json=body).status_code == 200  # works again
