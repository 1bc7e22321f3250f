"""OpenAI's Files: uploaded batch inputs and batch outputs, kept under EMBER_HOME/files, metadata in SQLite.

A file's bytes are written to a temporary file in the same folder, synced, then renamed to the file's id, and
only then is its row inserted: a crash leaves at worst a stray temporary file, never a row without content.
Ids are checked against their pattern before they reach the file system.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

from ember.errors import EmberError, InvalidRequestError
from ember.jobs.database import JobsDatabase

FILE_ID = re.compile(r"file-[0-9a-f]{24}")
PURPOSES = ("batch", "batch_output")  # what ember stores: batch inputs (uploaded) and outputs (written)


class NoSuchFileError(EmberError):
    """No file has that id (or it expired)."""

    http_status = 404


def new_file_id() -> str:
    return f"file-{secrets.token_hex(12)}"


def derived_file_id(*parts: str) -> str:
    """A file id that the same parts always give (a batch's output file, written again after a restart)."""
    return "file-" + hashlib.sha256(":".join(parts).encode()).hexdigest()[:24]


def file_object(row: tuple[Any, ...]) -> dict[str, Any]:
    file_id, filename, purpose, size, created_at, expires_at = row
    return {
        "id": file_id,
        "object": "file",
        "bytes": size,
        "created_at": created_at,
        "filename": filename,
        "purpose": purpose,
        "status": "processed",
        "status_details": None,
        "expires_at": expires_at,
    }


class FileStore:
    """Files in a folder, their metadata in the jobs tables."""

    _COLUMNS = "id, filename, purpose, bytes, created_at, expires_at"

    def __init__(self, folder: Path, database: JobsDatabase) -> None:
        self.folder = folder
        self.database = database

    def _path(self, file_id: str) -> Path:
        if not FILE_ID.fullmatch(file_id):
            raise NoSuchFileError(f"No such File object: {file_id}")
        return self.folder / file_id

    def temporary(self) -> tuple[int, Path]:
        """A new temporary file in the store's folder (an upload streams into it), as (fd, path)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix=".upload-", dir=self.folder)
        return fd, Path(path)

    def add(
        self,
        temporary: Path,
        *,
        filename: str,
        purpose: str,
        file_id: str | None = None,
        expires_at: int | None = None,
    ) -> dict[str, Any]:
        """Make a written temporary file a stored file (replacing one of the same id); its File object."""
        file_id = file_id or new_file_id()
        target = self._path(file_id)
        size = temporary.stat().st_size
        os.replace(temporary, target)
        row = (file_id, filename, purpose, size, int(time.time()), expires_at)
        with self.database.connect() as db:
            db.execute(
                f"INSERT OR REPLACE INTO openai_files ({self._COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                row,
            )
        return file_object(row)

    def add_bytes(self, data: bytes, *, filename: str, purpose: str, file_id: str | None = None) -> dict[str, Any]:
        fd, temporary = self.temporary()
        try:
            with os.fdopen(fd, "wb") as writer:
                writer.write(data)
                writer.flush()
                os.fsync(writer.fileno())
            return self.add(temporary, filename=filename, purpose=purpose, file_id=file_id)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise

    def get(self, file_id: str) -> dict[str, Any]:
        self._path(file_id)
        with self.database.connect() as db:
            row = db.execute(f"SELECT {self._COLUMNS} FROM openai_files WHERE id = ?", (file_id,)).fetchone()
        if row is None:
            raise NoSuchFileError(f"No such File object: {file_id}")
        found = file_object(row)
        if found["expires_at"] is not None and found["expires_at"] <= time.time():
            self.delete(file_id)
            raise NoSuchFileError(f"No such File object: {file_id} (it expired)")
        return found

    def content_path(self, file_id: str) -> Path:
        self.get(file_id)
        return self._path(file_id)

    def read(self, file_id: str) -> bytes:
        return self.content_path(file_id).read_bytes()

    def list(
        self, *, purpose: str | None = None, limit: int = 10000, order: str = "desc", after: str | None = None
    ) -> tuple[list[dict[str, Any]], bool]:
        """Files newest first (order=desc) or oldest first, after the file `after`; (files, has_more)."""
        if order not in ("asc", "desc"):
            raise InvalidRequestError(f"order must be asc or desc, not {order!r}")
        if not 1 <= limit <= 10000:
            raise InvalidRequestError("limit must be from 1 to 10000")
        where, values = ["(expires_at IS NULL OR expires_at > ?)"], [int(time.time())]
        if purpose is not None:
            where.append("purpose = ?")
            values.append(purpose)
        with self.database.connect() as db:
            if after is not None:
                row = db.execute("SELECT seq FROM openai_files WHERE id = ?", (after,)).fetchone()
                if row is None:
                    raise NoSuchFileError(f"No such File object: {after}")
                where.append("seq < ?" if order == "desc" else "seq > ?")
                values.append(row[0])
            rows = db.execute(
                f"SELECT {self._COLUMNS} FROM openai_files WHERE {' AND '.join(where)} "
                f"ORDER BY seq {order.upper()} LIMIT ?",
                (*values, limit + 1),
            ).fetchall()
        return [file_object(row) for row in rows[:limit]], len(rows) > limit

    def delete(self, file_id: str) -> dict[str, Any]:
        path = self._path(file_id)
        with self.database.connect() as db:
            if db.execute("DELETE FROM openai_files WHERE id = ?", (file_id,)).rowcount == 0:
                raise NoSuchFileError(f"No such File object: {file_id}")
        path.unlink(missing_ok=True)
        return {"id": file_id, "object": "file", "deleted": True}
