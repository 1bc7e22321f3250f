"""Resumable, verified HTTP downloads for `ember pull`.

A download streams into a *partial* file chosen by the caller. When the connection drops, the bytes already
written stay on disk (fsynced), so running the same pull again resumes with a `Range` request instead of
starting over. A small JSON file next to the partial (`<partial>.meta`) remembers the URL and the server's
validator (ETag or Last-Modified); it is sent back as `If-Range`, so a remote file that changed in between is
fetched again from zero instead of being stitched onto stale bytes. The sha256 always covers the whole file:
the bytes already on disk are hashed first, then the stream.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx

from ember.errors import PullError

ProgressCallback = Callable[[int, int | None], None]
"""Called with (bytes done, total bytes or None when the server did not say) as data arrives."""

_PROGRESS_INTERVAL_S = 0.1  # at most ~10 progress calls a second, plus a final one
_HASH_CHUNK = 1 << 20
_MAX_ATTEMPTS = 3  # a resume can fall back to a full download once; a third try means the server is inconsistent
_SHA256 = re.compile(r"(?:sha256:)?([0-9a-fA-F]{64})")
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED_RANGE = re.compile(r"bytes\s+\*/(\d+)")


@dataclass(frozen=True)
class DownloadResult:
    path: Path
    digest: str  # "sha256:<64 lowercase hex>"
    size: int


def normalize_digest(value: str) -> str:
    """Return `sha256:<lowercase hex>` for a bare hex digest or a `sha256:` one; refuse anything else."""
    match = _SHA256.fullmatch(value.strip())
    if match is None:
        raise PullError(
            f"invalid sha256 digest {value!r}: expected 64 hexadecimal characters, optionally prefixed with "
            "'sha256:' (for example sha256:" + "0" * 64 + ")"
        )
    return "sha256:" + match.group(1).lower()


def download(
    url: str,
    partial_path: Path,
    *,
    expected_sha256: str | None = None,
    expected_size: int | None = None,
    headers: Mapping[str, str] | None = None,
    progress: ProgressCallback | None = None,
    timeout: float = 30.0,
) -> DownloadResult:
    """Download `url` into `partial_path`, resuming what an earlier interrupted call left there.

    On success the file is complete and fsynced at `partial_path`; moving it into place is the caller's job.
    Every failure raises PullError: an interruption keeps the partial for the next call, a digest mismatch
    deletes it (its bytes are wrong, resuming would only keep them). With `expected_size` (a registry's
    manifest says each blob's size), a file of another size is refused as soon as the server says so or the
    bytes run past it, so a wrong answer never fills the disk.
    """
    expected = normalize_digest(expected_sha256) if expected_sha256 is not None else None
    partial_path = Path(partial_path)
    meta_path = _meta_path(partial_path)
    report = _Throttled(progress)
    try:
        partial_path.parent.mkdir(parents=True, exist_ok=True)
        with httpx.Client(follow_redirects=True, timeout=httpx.Timeout(timeout)) as client:
            for _ in range(_MAX_ATTEMPTS):
                outcome = _attempt(
                    client, url, partial_path, meta_path, dict(headers or {}), report, timeout, expected_size
                )
                if outcome is not None:
                    break
            else:
                raise PullError(f"the server of {url} answers resumed downloads inconsistently; try again later")
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise PullError(
                f"not enough disk space in {partial_path.parent}: the disk filled up while downloading {url}; "
                "free some space and run the same pull again to resume"
            ) from exc
        raise PullError(f"cannot write the download to {partial_path}: {exc}") from exc
    digest, size = outcome
    if expected is not None and digest != expected:
        _discard(partial_path, meta_path)
        raise PullError(
            f"the file downloaded from {url} is damaged or not the one expected: its digest is {digest} but "
            f"{expected} was expected; the download was deleted, run the pull again"
        )
    meta_path.unlink(missing_ok=True)
    return DownloadResult(path=partial_path, digest=digest, size=size)


def _attempt(
    client: httpx.Client,
    url: str,
    partial_path: Path,
    meta_path: Path,
    headers: dict[str, str],
    report: _Throttled,
    timeout: float,
    expected_size: int | None = None,
) -> tuple[str, int] | None:
    """One request. Returns (digest, size) when the file is complete, None to start over from zero."""
    offset = partial_path.stat().st_size if partial_path.exists() else 0
    meta = _read_meta(meta_path)
    too_long = expected_size is not None and offset > expected_size
    if offset and (too_long or (meta is not None and meta.get("url") != url)):
        _discard(partial_path, meta_path)  # unreadable meta, another URL's partial, or too long: not ours to extend
        offset, meta = 0, None
    # identity: byte ranges and Content-Length must count the file's bytes, not a compressed stream's
    request_headers = {"Accept-Encoding": "identity", **headers}
    if offset:
        request_headers["Range"] = f"bytes={offset}-"
        validator = _validator(meta)
        if validator:
            request_headers["If-Range"] = validator
    total: int | None = None
    started = False
    try:
        with client.stream("GET", url, headers=request_headers) as response:
            status = response.status_code
            if status == 416 and offset:
                match = _UNSATISFIED_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
                if match and int(match.group(1)) == offset:  # an earlier run got every byte but did not finish
                    report(offset, offset, final=True)
                    return "sha256:" + _hash_file(partial_path).hexdigest(), offset
                _discard(partial_path, meta_path)
                return None
            if status >= 400:
                raise _status_error(url, response)
            if status == 206 and offset:
                match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
                saved_etag, etag = (meta or {}).get("etag"), response.headers.get("ETag")
                if match is None or int(match.group(1)) != offset or (saved_etag and etag and saved_etag != etag):
                    _discard(partial_path, meta_path)
                    return None
                total = int(match.group(3)) if match.group(3) != "*" else None
                hasher, mode = _hash_file(partial_path), "ab"
            elif status == 200:
                offset, total = 0, _content_length(response)
                hasher, mode = hashlib.sha256(), "wb"
            else:
                raise PullError(f"unexpected answer from {url}: HTTP {status} {response.reason_phrase}")
            if expected_size is not None and total is not None and total != expected_size:
                _discard(partial_path, meta_path)
                raise PullError(
                    f"{url} is {total:,} bytes, not the {expected_size:,} expected; nothing was kept, try again later"
                )
            if total is not None:
                _check_disk_space(partial_path.parent, total - offset)
            _write_meta(meta_path, url, response.headers)
            started = True
            done = offset
            report(done, total)
            limit = expected_size if expected_size is not None else float("inf")
            overflow = False
            with open(partial_path, mode) as out:
                try:
                    for chunk in response.iter_bytes():
                        if done + len(chunk) > limit:
                            overflow = True
                            break
                        out.write(chunk)
                        hasher.update(chunk)
                        done += len(chunk)
                        report(done, total)
                except BaseException:
                    with contextlib.suppress(OSError):  # keep what arrived for the resume; report the first error
                        _sync(out)
                    raise
                _sync(out)
            if overflow:
                _discard(partial_path, meta_path)
                raise PullError(f"{url} sent more than the {expected_size:,} bytes expected; nothing was kept")
            if total is not None and done < total:
                raise PullError(_interrupted(done, total, "the server closed the connection early"))
            report(done, total, final=True)
            return "sha256:" + hasher.hexdigest(), done
    except httpx.UnsupportedProtocol as exc:
        raise PullError(f"cannot download {url}: only http:// and https:// URLs are supported") from exc
    except httpx.TimeoutException as exc:
        reason = f"no answer for {timeout:g} s"
        if started:
            raise PullError(_interrupted(_size(partial_path), total, reason)) from exc
        raise PullError(f"cannot reach the server of {url}: {reason}; {_again(offset)}") from exc
    except httpx.TransportError as exc:
        reason = str(exc) or type(exc).__name__
        if started:
            raise PullError(_interrupted(_size(partial_path), total, reason)) from exc
        raise PullError(f"cannot reach the server of {url}: {reason}; {_again(offset)}") from exc
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise PullError(f"cannot download {url}: {exc}") from exc


class _Throttled:
    """Wraps a ProgressCallback so a fast stream calls it at most every 0.1 s (plus once at the end)."""

    def __init__(self, callback: ProgressCallback | None) -> None:
        self._callback = callback
        self._last = float("-inf")

    def __call__(self, done: int, total: int | None, *, final: bool = False) -> None:
        if self._callback is None:
            return
        now = time.monotonic()
        if final or now - self._last >= _PROGRESS_INTERVAL_S:
            self._last = now
            self._callback(done, total)


def _status_error(url: str, response: httpx.Response) -> PullError:
    status = response.status_code
    if status == 404:
        hint = "check the URL (owner, repository, file name or quantization)"
    elif status in (401, 403):
        hint = (
            "the file needs an access token or your token lacks access: for hf.co models set HF_TOKEN "
            "(and accept the model's licence on its page if it is gated)"
        )
    elif status == 429:
        hint = "the server is rate limiting requests; wait a minute and try again"
    elif status >= 500:
        hint = "the server failed; try again later"
    else:
        hint = "the server refused the request"
    return PullError(f"download failed: HTTP {status} {response.reason_phrase} for {url}; {hint}")


def _interrupted(done: int, total: int | None, reason: str) -> str:
    of = f"{done:,} of {total:,} bytes" if total is not None else f"{done:,} bytes"
    return f"download interrupted after {of} ({reason}); run the same pull again to resume"


def _again(offset: int) -> str:
    return "check the network connection and run the same pull again" + (" to resume" if offset else "")


def _content_length(response: httpx.Response) -> int | None:
    if response.headers.get("Content-Encoding", "identity").lower() != "identity":
        return None  # the length would count compressed bytes
    try:
        length = int(response.headers["Content-Length"])
    except (KeyError, ValueError):
        return None
    return length if length >= 0 else None


def _check_disk_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise PullError(f"not enough disk space in {folder}: need {_human(needed)}, have {_human(free)}")


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _hash_file(path: Path) -> Any:  # hashlib's hash object has no public type name
    hasher = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(_HASH_CHUNK):
            hasher.update(chunk)
    return hasher


def _sync(out: IO[bytes]) -> None:
    """Flush and fsync, so the bytes a resume will count on survive a crash or power loss."""
    out.flush()
    os.fsync(out.fileno())


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _meta_path(partial_path: Path) -> Path:
    return partial_path.with_suffix(partial_path.suffix + ".meta")


def _read_meta(meta_path: Path) -> dict[str, str | None] | None:
    """The saved URL and validators; None when there is no meta file, `{}` when it is unreadable."""
    if not meta_path.exists():
        return None
    try:
        data = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_meta(meta_path: Path, url: str, headers: httpx.Headers) -> None:
    meta = {"url": url, "etag": headers.get("ETag"), "last_modified": headers.get("Last-Modified")}
    meta_path.write_text(json.dumps(meta), encoding="utf-8")


def _validator(meta: dict[str, str | None] | None) -> str | None:
    """The If-Range value: a strong ETag, else Last-Modified (a weak ETag never matches If-Range)."""
    if not meta:
        return None
    etag = meta.get("etag")
    if etag and not etag.startswith("W/"):
        return etag
    return meta.get("last_modified")


def _discard(partial_path: Path, meta_path: Path) -> None:
    partial_path.unlink(missing_ok=True)
    meta_path.unlink(missing_ok=True)


@contextlib.contextmanager
def rich_progress(description: str) -> Iterator[ProgressCallback]:
    """A progress bar on stderr (bytes, rate, ETA) for the duration of the `with` block.

    Rich decides itself how to render when stderr is not a terminal, so callers need no TTY check.
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int | None) -> None:
            bar.update(task, completed=done, total=total)

        yield update
