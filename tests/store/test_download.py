"""Downloads resume after an interruption, restart when the remote file changed, and verify their digest."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember.errors import PullError
from ember.store import download as download_module
from ember.store.download import DownloadResult, download, normalize_digest, rich_progress
from tests.http_server import FileServer, etag_of

DATA = os.urandom(300_000)
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def server() -> Iterator[FileServer]:
    with FileServer() as running:
        running.files["/m.gguf"] = DATA
        yield running


@pytest.fixture
def partial(tmp_path: Path) -> Path:
    return tmp_path / "blobs" / "m.gguf.partial"


def meta_of(partial: Path) -> Path:
    return partial.with_suffix(partial.suffix + ".meta")


def test_full_download_reports_digest_size_and_progress(server: FileServer, partial: Path) -> None:
    calls: list[tuple[int, int | None]] = []

    result = download(
        server.url("/m.gguf"), partial, expected_sha256=DIGEST, progress=lambda d, t: calls.append((d, t))
    )

    assert result == DownloadResult(path=partial, digest=DIGEST, size=len(DATA))
    assert partial.read_bytes() == DATA
    assert not meta_of(partial).exists()
    assert calls[-1] == (len(DATA), len(DATA))
    assert all(total == len(DATA) for _, total in calls)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)
    (request,) = server.requests
    assert request.method == "GET"
    assert request.path == "/m.gguf"
    assert "Range" not in request.headers


def test_interrupted_download_keeps_the_partial_and_resumes(server: FileServer, partial: Path) -> None:
    server.interrupt_next_after(100_000)
    with pytest.raises(PullError, match=r"download interrupted after [\d,]+ of 300,000 bytes.*again to resume"):
        download(server.url("/m.gguf"), partial)
    kept = partial.stat().st_size
    assert 0 < kept <= 100_000
    assert partial.read_bytes() == DATA[:kept]
    assert json.loads(meta_of(partial).read_text())["etag"] == etag_of(DATA)

    result = download(server.url("/m.gguf"), partial, expected_sha256=DIGEST)

    resumed = server.requests[-1]
    assert resumed.headers["Range"] == f"bytes={kept}-"
    assert resumed.headers["If-Range"] == etag_of(DATA)
    assert result.digest == DIGEST
    assert result.size == len(DATA)
    assert partial.read_bytes() == DATA
    assert not meta_of(partial).exists()


def test_a_changed_remote_file_restarts_from_zero(server: FileServer, partial: Path) -> None:
    server.interrupt_next_after(50_000)
    with pytest.raises(PullError, match="interrupted"):
        download(server.url("/m.gguf"), partial)
    changed = os.urandom(200_000)
    server.files["/m.gguf"] = changed

    result = download(server.url("/m.gguf"), partial)

    assert server.requests[-1].headers["If-Range"] == etag_of(DATA)  # the old ETag: the server sends it all
    assert result.digest == "sha256:" + hashlib.sha256(changed).hexdigest()
    assert partial.read_bytes() == changed


def test_a_partial_without_meta_resumes_without_if_range(server: FileServer, partial: Path) -> None:
    partial.parent.mkdir(parents=True)
    partial.write_bytes(DATA[:1234])

    result = download(server.url("/m.gguf"), partial)

    assert server.requests[-1].headers["Range"] == "bytes=1234-"
    assert "If-Range" not in server.requests[-1].headers
    assert result.digest == DIGEST


def test_a_complete_partial_is_accepted_after_416(server: FileServer, partial: Path) -> None:
    partial.parent.mkdir(parents=True)
    partial.write_bytes(DATA)

    result = download(server.url("/m.gguf"), partial, expected_sha256=DIGEST)

    assert server.requests[-1].headers["Range"] == f"bytes={len(DATA)}-"
    assert result.size == len(DATA)


def test_a_partial_longer_than_the_remote_file_restarts(server: FileServer, partial: Path) -> None:
    partial.parent.mkdir(parents=True)
    partial.write_bytes(DATA + b"extra bytes")

    result = download(server.url("/m.gguf"), partial, expected_sha256=DIGEST)

    assert "Range" not in server.requests[-1].headers
    assert partial.read_bytes() == DATA
    assert result.digest == DIGEST


def test_a_wrong_digest_is_refused_and_the_download_deleted(server: FileServer, partial: Path) -> None:
    wrong = "ab" * 32
    with pytest.raises(PullError) as caught:
        download(server.url("/m.gguf"), partial, expected_sha256=wrong)
    assert DIGEST in str(caught.value)
    assert f"sha256:{wrong}" in str(caught.value)
    assert not partial.exists()
    assert not meta_of(partial).exists()


@pytest.mark.parametrize("value", ["", "abc", "sha256:" + "g" * 64, "md5:" + "a" * 64, "a" * 63, "a" * 65])
def test_a_malformed_expected_digest_is_refused_before_any_request(
    server: FileServer, partial: Path, value: str
) -> None:
    with pytest.raises(PullError, match="64 hexadecimal characters"):
        download(server.url("/m.gguf"), partial, expected_sha256=value)
    assert server.requests == []


def test_digest_forms() -> None:
    hex_digest = DIGEST.removeprefix("sha256:")
    assert normalize_digest(hex_digest.upper()) == DIGEST
    assert normalize_digest(f" sha256:{hex_digest} ") == DIGEST


def test_http_404_gives_a_clear_error(server: FileServer, partial: Path) -> None:
    url = server.url("/missing.gguf")
    with pytest.raises(PullError, match="HTTP 404") as caught:
        download(url, partial)
    assert url in str(caught.value)
    assert "check the URL" in str(caught.value)
    assert not partial.exists()


@pytest.mark.parametrize("status", [401, 403])
def test_http_401_and_403_point_at_a_token(server: FileServer, partial: Path, status: int) -> None:
    server.errors["/m.gguf"] = status
    with pytest.raises(PullError, match=f"HTTP {status}.*HF_TOKEN"):
        download(server.url("/m.gguf"), partial)


def test_headers_and_redirects(server: FileServer, partial: Path) -> None:
    server.redirects["/model"] = "/m.gguf"

    result = download(server.url("/model"), partial, headers={"Authorization": "Bearer t0ken"})

    assert result.digest == DIGEST
    assert [request.headers["Authorization"] for request in server.requests] == ["Bearer t0ken"] * 2


def test_not_enough_disk_space_is_refused_before_writing(
    server: FileServer, partial: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    usage = shutil.disk_usage(partial.parent.parent)
    monkeypatch.setattr(download_module.shutil, "disk_usage", lambda _: usage._replace(free=1000))
    with pytest.raises(PullError, match=r"not enough disk space in .*: need 293\.0 KiB, have 1000 B"):
        download(server.url("/m.gguf"), partial)
    assert not partial.exists()


def test_a_stalled_server_times_out_and_the_pull_resumes(server: FileServer, partial: Path) -> None:
    server.interrupt_next_after(20_000, stall_s=1.5)
    with pytest.raises(PullError, match=r"interrupted after [\d,]+ of 300,000 bytes \(no answer for 0.3 s\)"):
        download(server.url("/m.gguf"), partial, timeout=0.3)
    assert partial.exists()

    assert download(server.url("/m.gguf"), partial).digest == DIGEST


def test_an_unreachable_server_is_reported(partial: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(PullError, match="cannot reach the server"):
        download(f"http://127.0.0.1:{port}/m.gguf", partial, timeout=2)


def test_unsupported_url_scheme(partial: Path) -> None:
    with pytest.raises(PullError, match="only http:// and https://"):
        download("ftp://example.com/m.gguf", partial)


def test_rich_progress_drives_a_bar(capsys: pytest.CaptureFixture[str]) -> None:
    with rich_progress("pulling m.gguf") as update:
        update(100, None)
        update(1000, 2000)
        update(2000, 2000)
    assert "pulling m.gguf" in capsys.readouterr().err
