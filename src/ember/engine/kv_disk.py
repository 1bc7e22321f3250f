"""The disk tier of the KV cache: what the slots and host RAM held when a model closed, read again when it loads.

When a model unloads (the server stops, keep_alive expires, `ember stop`), the KV of its free slots and of its
host-RAM entries is written here, most recently used first, under a byte budget (EMBER_KV_CACHE_DISK; 0, the
default, turns the tier off). When the model loads again, the files' token lists join the host-RAM index, so
the next turn of a long conversation restores its KV (`llama_state_seq_set_data`) instead of prefilling it.

One file per token prefix, in a folder per model blob and the load options that shape its KV:
`EMBER_HOME/kv/<key>/<sha256 of the tokens>.kv`, holding a short header (the tokens) and llama.cpp's bytes.
Files are written to a temporary name and renamed, so a crash leaves no half-written entry; a file that does
not read back (another llama.cpp version, a damaged disk) is deleted and its tokens are prefilled as usual.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

log = logging.getLogger(__name__)

MAGIC = b"EMBERKV1"
_HEADER_LENGTH = struct.Struct("<I")


@dataclass(frozen=True)
class DiskEntry:
    path: Path
    tokens: list[int]
    size: int  # bytes of llama.cpp's sequence state
    modified: float


def cache_key(model: Path, digest: str | None, adapters: Iterable[Path], flash_attn: bool | None) -> str:
    """The folder of a model's KV files: its blob (digest, else path, size and time) and what shapes its KV."""
    if digest is None:
        stat = model.stat()
        digest = f"{model.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    parts = [digest, *(str(path) for path in adapters), f"flash_attn={flash_attn}"]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def _file_name(tokens: list[int]) -> str:
    return hashlib.sha256(struct.pack(f"<{len(tokens)}i", *tokens)).hexdigest()[:40] + ".kv"


class DiskCache:
    """The KV files of one model under a byte budget. Not thread-safe: the engine calls it at load and close."""

    def __init__(self, directory: Path, budget: int) -> None:
        self.directory = directory
        self.budget = max(0, budget)

    @property
    def enabled(self) -> bool:
        return self.budget > 0

    def entries(self, num_ctx: int) -> list[DiskEntry]:
        """The readable entries that fit a context of num_ctx tokens, most recent first; broken files go."""
        if not self.enabled or not self.directory.is_dir():
            return []
        found: list[DiskEntry] = []
        for path in self.directory.glob("*.kv"):
            try:
                tokens, size = self._read_header(path)
                found.append(DiskEntry(path, tokens, size, path.stat().st_mtime))
            except (OSError, ValueError) as error:
                log.warning("dropping the unreadable KV file %s: %s", path, error)
                path.unlink(missing_ok=True)
        found.sort(key=lambda entry: entry.modified, reverse=True)
        return [entry for entry in found if 0 < len(entry.tokens) < num_ctx]

    def read(self, entry: DiskEntry) -> bytearray:
        """The entry's llama.cpp bytes; the file is removed (the KV lives in a slot now, and is written again
        when the model closes). An empty result means it could not be read."""
        try:
            with entry.path.open("rb") as file:
                header = self._header(file)
                data = bytearray(file.read())
            if len(data) != header["bytes"]:
                raise ValueError(f"{len(data)} bytes where the header says {header['bytes']}")
            return data
        except (OSError, ValueError) as error:
            log.warning("could not read the KV file %s: %s", entry.path, error)
            return bytearray()
        finally:
            entry.path.unlink(missing_ok=True)

    def write_all(self, items: Iterable[tuple[list[int], bytes | bytearray]]) -> int:
        """Write (tokens, bytes) entries, most valuable first, while they fit the budget together with the
        files already there (the oldest of which go to make room). Entries that another one extends are
        skipped. Returns how many were written. A full disk stops the writing, never the caller."""
        if not self.enabled:
            return 0
        pending = [(list(tokens), data) for tokens, data in items if tokens and data]
        kept = [
            (tokens, data)
            for tokens, data in pending
            if not any(len(other) > len(tokens) and other[: len(tokens)] == tokens for other, _ in pending)
        ]
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            log.warning("cannot keep KV on disk in %s: %s", self.directory, error)
            return 0
        existing = {entry.path.name: entry for entry in self.entries(num_ctx=1 << 30)}
        room = self.budget
        written = 0
        for tokens, data in kept:
            size = len(data)
            if size > room:
                continue
            name = _file_name(tokens)
            existing.pop(name, None)  # rewritten below
            for entry in list(existing.values()):  # a prefix of this one is no longer needed
                if entry.tokens == tokens[: len(entry.tokens)]:
                    entry.path.unlink(missing_ok=True)
                    del existing[entry.path.name]
            if not self._write(self.directory / name, tokens, data):
                break
            room -= size
            written += 1
        older = sorted(existing.values(), key=lambda entry: entry.modified, reverse=True)
        for entry in older:  # what was there before stays while it fits in what is left
            if entry.size <= room:
                room -= entry.size
            else:
                entry.path.unlink(missing_ok=True)
        return written

    def _write(self, path: Path, tokens: list[int], data: bytes | bytearray) -> bool:
        header = json.dumps({"tokens": tokens, "bytes": len(data)}).encode()
        temporary = path.with_suffix(".tmp")
        try:
            with temporary.open("wb") as file:
                file.write(MAGIC + _HEADER_LENGTH.pack(len(header)) + header)
                file.write(data)
            os.replace(temporary, path)
            return True
        except OSError as error:
            log.warning("stopped writing KV to %s: %s", self.directory, error)
            temporary.unlink(missing_ok=True)
            return False

    def _read_header(self, path: Path) -> tuple[list[int], int]:
        with path.open("rb") as file:
            header = self._header(file)
        return header["tokens"], header["bytes"]

    @staticmethod
    def _header(file: BinaryIO) -> dict[str, Any]:
        if file.read(len(MAGIC)) != MAGIC:
            raise ValueError("not an ember KV file")
        (length,) = _HEADER_LENGTH.unpack(file.read(_HEADER_LENGTH.size))
        header = json.loads(file.read(length))
        if not isinstance(header, dict):
            raise ValueError("a damaged header")
        tokens, size = header.get("tokens"), header.get("bytes")
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens) or not isinstance(size, int):
            raise ValueError("a damaged header")
        return header
