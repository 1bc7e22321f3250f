"""100 generated malformed GGUF files, pushed through /api/blobs + /api/create and used as model paths: each
gets a clear error (never an internal error), nothing broken is registered, and the server is up at the end
and still answers with the real model."""

from __future__ import annotations

import hashlib
import random
import struct
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.gguf_files import tensor_info_position, write_tiny_gguf
from tests.server import running_server

COUNT = 100


def _mutations(base: bytes, tensor_info: int) -> list[tuple[str, bytes]]:
    """COUNT broken variants of a valid tiny GGUF file, each named by what is wrong with it."""
    rng = random.Random(14)  # the same 100 files on every run
    header_end = tensor_info + 64
    makers: list[tuple[str, Callable[[], bytes]]] = [
        ("empty", lambda: b""),
        ("only the magic", lambda: base[:4]),
        ("wrong magic", lambda: b"GGUX" + base[4:]),
        ("version 0", lambda: base[:4] + struct.pack("<I", 0) + base[8:]),
        ("version 99", lambda: base[:4] + struct.pack("<I", 99) + base[8:]),
        ("2^60 tensors", lambda: base[:8] + struct.pack("<Q", 1 << 60) + base[16:]),
        ("2^60 metadata keys", lambda: base[:16] + struct.pack("<Q", 1 << 60) + base[24:]),
        ("no metadata keys but data", lambda: base[:16] + struct.pack("<Q", 0) + base[24:]),
        ("a huge key length", lambda: base[:24] + struct.pack("<Q", 1 << 62) + base[32:]),
        ("garbage", lambda: bytes(rng.randrange(256) for _ in range(4096))),
        ("GGUF then garbage", lambda: b"GGUF" + bytes(rng.randrange(256) for _ in range(4096))),
        ("text file", lambda: b"this is not a model\n" * 100),
    ]
    variants = [(name, make()) for name, make in makers]
    while len(variants) < COUNT:
        kind = len(variants) % 4
        if kind == 0:  # cut short: in the header, the tensor infos, or the tensor data
            cut = rng.randrange(5, len(base) - 1)
            variants.append((f"truncated at {cut}", base[:cut]))
        elif kind == 1:  # a random byte of the header or tensor infos overwritten
            at = rng.randrange(8, header_end)
            value = rng.randrange(256)
            if base[at] == value:
                value ^= 0xFF
            variants.append((f"byte {at} = {value}", base[:at] + bytes([value]) + base[at + 1 :]))
        elif kind == 2:  # eight bytes of a count or length set to a huge value
            at = rng.randrange(8, header_end - 8)
            variants.append(
                (f"huge u64 at {at}", base[:at] + struct.pack("<Q", rng.randrange(1 << 40, 1 << 63)) + base[at + 8 :])
            )
        else:  # the first tensor's description (its name length, dimensions, type, offset) overwritten
            at = tensor_info
            variants.append((f"tensor info at {at}", base[:at] + b"\xff" * 8 + base[at + 8 :]))
            tensor_info += 1  # the next one of this kind breaks a different byte run
    return variants[:COUNT]


def _message(response: httpx.Response) -> str:
    body = response.json()
    error = body.get("error")
    return error if isinstance(error, str) else error["message"]


def test_100_malformed_gguf_files_get_clear_errors_and_the_server_stays_up(tmp_path: Path) -> None:
    base_file = write_tiny_gguf(tmp_path / "tiny.gguf")
    base = base_file.read_bytes()
    variants = _mutations(base, tensor_info_position(base_file, "blk.0.weight"))
    assert len(variants) == COUNT and len({content for _, content in variants}) > COUNT * 0.9
    with running_server(home=tmp_path / "home") as url:
        api = httpx.Client(base_url=url, timeout=120)
        registered = 0
        for index, (what, content) in enumerate(variants):
            path = tmp_path / f"bad-{index}.gguf"
            path.write_bytes(content)
            digest = "sha256:" + hashlib.sha256(content).hexdigest()
            uploaded = api.post(f"/api/blobs/{digest}", content=content)
            assert uploaded.status_code in (200, 201), (what, uploaded.text)  # a blob is only bytes
            created = api.post(
                "/api/create", json={"model": f"bad{index}", "files": {"model.gguf": digest}, "stream": False}
            )
            generated = api.post("/api/generate", json={"model": str(path), "prompt": "Hi", "stream": False})
            for step, response in (("create", created), ("generate", generated)):
                if step == "create" and response.status_code == 200:
                    continue  # the header parsed: its failure comes at load time (below, and in generate)
                assert 400 <= response.status_code < 600, (what, step, response.text)
                message = _message(response)
                assert "internal error" not in message and "Traceback" not in message, (what, step, message)
                assert len(message) > 20, (what, step, message)
            if created.status_code == 200:  # registered (a readable header): using it fails clearly
                registered += 1
                used = api.post("/api/generate", json={"model": f"bad{index}", "prompt": "Hi", "stream": False})
                assert used.status_code >= 400 and "internal error" not in _message(used), (what, used.text)
        assert 0 < registered < COUNT // 2  # most are refused at create; some only fail when llama.cpp loads them
        assert api.get("/health").status_code == 200
        names = {model["name"] for model in api.get("/api/tags").json()["models"]}  # unreadable ones are not listed
        assert all(name.startswith("bad") for name in names)
        answer = api.post(
            "/api/generate", json={"model": "smollm2", "prompt": "Hi", "stream": False, "options": {"num_predict": 3}}
        )
        assert answer.status_code == 200 and answer.json()["eval_count"] > 0
