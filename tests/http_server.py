"""A small local HTTP server for download tests: files with Range support, JSON routes, a fake Hugging Face hub.

    with FileServer() as server:
        server.files["/m.gguf"] = data
        server.interrupt_next_after(1000)        # the next file response stops after 1000 body bytes
        download(server.url("/m.gguf"), partial)
        method, path, headers = server.requests[-1]
        assert headers["Range"] == "bytes=1000-"  # headers are case-insensitive (httpx.Headers)

It binds 127.0.0.1 on a free port and serves each request in its own thread, so it never reaches the network.
Tests that want it as a fixture can use `file_server` (add `pytest_plugins = ["tests.http_server"]` to the
root conftest, or define a one-line fixture that enters `FileServer()`).
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import NamedTuple
from urllib.parse import unquote, urlsplit

import httpx
import pytest

LAST_MODIFIED = "Wed, 01 Jan 2025 00:00:00 GMT"


class Request(NamedTuple):
    method: str
    path: str  # the request target as sent, query string included
    headers: httpx.Headers  # case-insensitive


def etag_of(data: bytes) -> str:
    """The strong ETag the server sends for `data`: it changes whenever the file's bytes change."""
    return '"' + hashlib.sha256(data).hexdigest()[:32] + '"'


class FileServer:
    """Serves `files` (path -> bytes), `json_routes` (path -> JSON body), `redirects` and forced `errors`.

    The dictionaries may be changed while the server runs; lookups ignore the query string.
    """

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.json_routes: dict[str, object] = {}
        self.redirects: dict[str, str] = {}  # path -> Location (a path or a full URL), answered with 302
        self.errors: dict[str, int] = {}  # path -> HTTP status to answer instead of the content
        self.requests: list[Request] = []
        self._interrupt_after: int | None = None
        self._interrupt_path: str | None = None
        self._stall_s = 0.0
        self._lock = threading.Lock()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> FileServer:
        owner = self

        class Handler(_Handler):
            server_owner = owner

        self._httpd = _Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.05,), name="test-file-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FileServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- helpers for tests -----------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        assert self._httpd is not None, "the server is not running"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, path: str = "/") -> str:
        return self.base_url + path

    def interrupt_next_after(self, n_bytes: int, *, stall_s: float = 0.0, path: str | None = None) -> None:
        """The next file response sends full headers but only `n_bytes` of its body, then drops the connection.

        With `stall_s`, it waits that long (silent) before dropping, to make a client's read timeout fire.
        With `path`, only the next response for that path is cut; others are served whole meanwhile.
        """
        with self._lock:
            self._interrupt_after = n_bytes
            self._interrupt_path = path
            self._stall_s = stall_s

    def requests_to(self, path: str) -> list[Request]:
        """The requests whose path (query string ignored) is `path`."""
        return [request for request in self.requests if urlsplit(request.path).path == path]

    def add_hf_repo(self, repo_id: str, files: dict[str, bytes], *, gated: bool = False) -> None:
        """A fake Hugging Face model repository, answering what huggingface_hub and `ember pull` request.

        - `GET /api/models/{repo_id}` (huggingface_hub's `model_info`, any query): the repo's JSON with
          `siblings` (file names, sizes and LFS sha256).
        - `GET /{repo_id}/resolve/main/{filename}`: a 302 to `/cdn/{sha256}` like the real hub's CDN redirect,
          which serves the bytes with Range support.
        """
        siblings = []
        for filename, data in files.items():
            sha256 = hashlib.sha256(data).hexdigest()
            siblings.append(
                {
                    "rfilename": filename,
                    "size": len(data),
                    "blobId": hashlib.sha1(data).hexdigest(),
                    "lfs": {"size": len(data), "sha256": sha256, "pointerSize": 134},
                }
            )
            self.files[f"/cdn/{sha256}"] = data
            self.redirects[f"/{repo_id}/resolve/main/{filename}"] = f"/cdn/{sha256}"
        self.json_routes[f"/api/models/{repo_id}"] = {
            "_id": "0" * 24,
            "id": repo_id,
            "private": False,
            "gated": gated,
            "sha": "1" * 40,
            "siblings": siblings,
        }

    # -- serving ---------------------------------------------------------------------------------------------

    def _take_interrupt(self, path: str) -> tuple[int | None, float]:
        with self._lock:
            if self._interrupt_path not in (None, path):
                return None, 0.0
            after, stall = self._interrupt_after, self._stall_s
            self._interrupt_after, self._interrupt_path, self._stall_s = None, None, 0.0
        return after, stall

    def _handle(self, handler: _Handler, *, head: bool) -> None:
        headers = httpx.Headers(list(handler.headers.items()))
        with self._lock:
            self.requests.append(Request(handler.command, handler.path, headers))
        path = unquote(urlsplit(handler.path).path)
        if path in self.errors:
            status = self.errors[path]
            _send(handler, status, f"error {status}\n".encode(), {"Content-Type": "text/plain"}, head=head)
        elif path in self.redirects:
            _send(handler, 302, b"", {"Location": self.redirects[path]}, head=head)
        elif path in self.json_routes:
            body = json.dumps(self.json_routes[path]).encode()
            _send(handler, 200, body, {"Content-Type": "application/json"}, head=head)
        elif path in self.files:
            self._send_file(handler, path, self.files[path], headers, head=head)
        elif path.startswith("/api/models/"):
            # what the real hub answers for a missing repository: huggingface_hub keys on X-Error-Code
            body = json.dumps({"error": "Repository not found"}).encode()
            extra = {"Content-Type": "application/json", "X-Error-Code": "RepoNotFound"}
            _send(handler, 404, body, extra, head=head)
        else:
            _send(handler, 404, b"not found\n", {"Content-Type": "text/plain"}, head=head)

    def _send_file(self, handler: _Handler, path: str, data: bytes, headers: httpx.Headers, *, head: bool) -> None:
        etag = etag_of(data)
        extra = {
            "Content-Type": "application/octet-stream",
            "ETag": etag,
            "Last-Modified": LAST_MODIFIED,
            "Accept-Ranges": "bytes",
        }
        status, body = 200, data
        range_header, if_range = headers.get("Range"), headers.get("If-Range")
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", (range_header or "").strip())
        # If-Range: serve the range only while the validator still matches, else the whole (changed) file
        if match and (if_range is None or if_range in (etag, LAST_MODIFIED)):
            start = int(match.group(1))
            end = min(int(match.group(2)) if match.group(2) else len(data) - 1, len(data) - 1)
            if start >= len(data) or end < start:
                _send(handler, 416, b"", {**extra, "Content-Range": f"bytes */{len(data)}"}, head=head)
                return
            status, body = 206, data[start : end + 1]
            extra["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        interrupt_after, stall_s = self._take_interrupt(path)
        if interrupt_after is None or head:
            _send(handler, status, body, extra, head=head)
            return
        _send_headers(handler, status, len(body), extra)
        try:
            handler.wfile.write(body[:interrupt_after])
            handler.wfile.flush()
            time.sleep(stall_s)
            handler.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # the client may already be gone
        handler.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # a client that hung up (a test that stopped reading): not a server failure
        super().handle_error(request, client_address)  # type: ignore[arg-type]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_owner: FileServer

    def do_GET(self) -> None:
        self.server_owner._handle(self, head=False)

    def do_HEAD(self) -> None:
        self.server_owner._handle(self, head=True)

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep test output clean; FileServer.requests is the log


def _send_headers(handler: BaseHTTPRequestHandler, status: int, length: int, headers: dict[str, str]) -> None:
    handler.send_response(status)
    for name, value in headers.items():
        handler.send_header(name, value)
    handler.send_header("Content-Length", str(length))
    handler.end_headers()


def _send(handler: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict[str, str], *, head: bool) -> None:
    _send_headers(handler, status, len(body), headers)
    if not head:
        try:
            handler.wfile.write(body)
        except OSError:
            handler.close_connection = True  # the client hung up mid-body (it may have stopped reading)


@pytest.fixture
def file_server() -> Iterator[FileServer]:
    """A running FileServer, stopped after the test."""
    with FileServer() as server:
        yield server
