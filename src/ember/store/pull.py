"""`ember pull SOURCE`: bring a model into the store from a file, a URL, Hugging Face, a bundled package, or an
Ollama registry (any other name: `llama3.2:1b`, `user/model:tag`; see registry.py).

Whatever the source, the file is checked as GGUF before it is registered, and it becomes visible (in
`ember list`) only when its manifest is written, after the blob is complete: a failed or interrupted pull
never leaves a half model behind. An interrupted download keeps its partial file under `partial/` and the
same pull resumes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import re
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ember.config import Settings
from ember.errors import CorruptModelError, InvalidRequestError, ModelNotFoundError
from ember.store.bundled import find_bundled
from ember.store.gguf_file import GGUFInfo, read_gguf
from ember.store.names import parse_model_name
from ember.store.resolve import looks_like_path, user_path
from ember.store.store import LICENSE_MEDIA_TYPE, MODEL_MEDIA_TYPE, Layer, Manifest, ModelStore, PendingBlob

ProgressCallback = Callable[[int, int | None], None]
Status = Callable[[str], None]


class ProgressFactory(Protocol):
    """Makes the progress display of one download: `description` to show, `digest` of the file when known."""

    def __call__(self, description: str, digest: str | None = None) -> AbstractContextManager[ProgressCallback]: ...


@dataclass(frozen=True)
class PullResult:
    manifest: Manifest
    source: str

    @property
    def name(self) -> str:
        return str(self.manifest.name)

    @property
    def digest(self) -> str:
        return self.manifest.model_layer.digest


def model_config(info: GGUFInfo, source: str) -> dict[str, Any]:
    """The manifest's config blob: facts about the model file, as Ollama's config carries them."""
    return {
        "model_format": "gguf",
        "model_family": info.architecture,
        "model_type": format_parameter_count(info.parameter_count),
        "file_type": info.file_type,
        "source": source,
    }


def format_parameter_count(count: int) -> str:
    """134515008 -> '134.52M', as Ollama shows parameter sizes."""
    for limit, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= limit:
            return f"{count / limit:.2f}".rstrip("0").rstrip(".") + suffix
    return str(count)


def name_from_filename(filename: str) -> str:
    """A model name made from a file name: `SmolLM2-135M-Instruct.Q4_1.gguf` -> `smollm2-135m-instruct.q4_1`."""
    stem = filename[: -len(".gguf")] if filename.lower().endswith(".gguf") else filename
    cleaned = re.sub(r"[^a-z0-9_.-]+", "-", stem.lower()).lstrip(".-")[:80].rstrip(".-")
    if not cleaned:
        raise InvalidRequestError(f"cannot make a model name from {filename!r}; give one with --name")
    return cleaned


def _no_progress(description: str, digest: str | None = None) -> AbstractContextManager[ProgressCallback]:
    return contextlib.nullcontext(lambda done, total: None)


def _no_status(text: str) -> None:
    pass


def pull(
    source: str,
    *,
    name: str | None = None,
    sha256: str | None = None,
    progress: ProgressFactory | None = None,
    status: Status | None = None,
    registry: str | None = None,
    insecure: bool = False,
    store: ModelStore | None = None,
) -> PullResult:
    """Register a model from `source` under `name` (a default name is derived from the source).

    `status` receives notices worth showing (a registry layer left out, and why); `registry` is the registry of
    names without a host (default EMBER_REGISTRY); `insecure` lets a name with a host use http://.
    """
    store = store or ModelStore()
    progress = progress or _no_progress
    target = parse_model_name(name) if name is not None else None  # refuse a bad name before any work
    store.cleanup_temp()
    if source.lower().startswith(("http://", "https://")):
        return _pull_url(store, source, target_name=name, sha256=sha256, progress=progress)
    if source.lower().startswith(("hf.co/", "huggingface.co/")):
        return _pull_huggingface(store, source, target_name=name, sha256=sha256, progress=progress)
    if looks_like_path(source):
        path = user_path(source)
        if path.is_dir():
            from ember.store.pull_directory import pull_local_directory

            return pull_local_directory(store, path, name or name_from_filename(path.name))
        if not path.is_file():
            raise ModelNotFoundError(f"no model file at {path}")
        _check_sha256(path, sha256)
        info = _validated(path)
        blob = store.blob_from_file(path.resolve(), link=True)
        return _register(store, name or name_from_filename(path.name), blob, info, str(path.resolve()))
    parsed = parse_model_name(source)
    bundled = find_bundled(parsed.model, parsed.tag) if parsed.host is None and parsed.namespace is None else None
    if bundled is None:
        from ember.store.registry import pull_from_registry

        return pull_from_registry(
            store,
            parsed,
            target=target,
            registry=registry or Settings().registry,
            insecure=insecure,
            as_typed=source,
            model_digest=f"sha256:{_normalize_sha256(sha256)}" if sha256 is not None else None,
            progress=progress,
            status=status or _no_status,
        )
    path = bundled.locate()
    info = _validated(path)
    blob = store.blob_from_file(path, link=True)
    license_blob = store.blob_from_bytes(bundled.license.encode())
    return _register(
        store,
        str(target or parsed),
        blob,
        info,
        f"python package {bundled.package}",
        extra=[(LICENSE_MEDIA_TYPE, license_blob)],
    )


def _validated(path: Path) -> GGUFInfo:
    return read_gguf(path)


def _check_sha256(path: Path, expected: str | None) -> None:
    if expected is None:
        return
    wanted = _normalize_sha256(expected)
    digest = hashlib.sha256()
    with path.open("rb") as reader:
        while chunk := reader.read(1024 * 1024):
            digest.update(chunk)
    if digest.hexdigest() != wanted:
        from ember.errors import PullError

        raise PullError(
            f"{path.name} has sha256 {digest.hexdigest()}, not the expected {wanted}; nothing was registered"
        )


def _normalize_sha256(value: str) -> str:
    hex_part = value.lower().removeprefix("sha256:")
    if not re.fullmatch(r"[0-9a-f]{64}", hex_part):
        raise InvalidRequestError(f"invalid --sha256 {value!r}: give 64 hex digits, optionally after sha256:")
    return hex_part


def _register(
    store: ModelStore,
    name: str,
    blob: PendingBlob,
    info: GGUFInfo,
    source: str,
    extra: list[tuple[str, PendingBlob | Layer]] | None = None,
) -> PullResult:
    layers: list[tuple[str, PendingBlob | Layer]] = [(MODEL_MEDIA_TYPE, blob), *(extra or [])]
    manifest = store.commit(name, layers, model_config(info, source))
    return PullResult(manifest, source)


def _partial_path(store: ModelStore, url: str) -> Path:
    store.partial.mkdir(parents=True, exist_ok=True)
    return store.partial / f"{hashlib.sha256(url.encode()).hexdigest()[:40]}.partial"


def _download_and_register(
    store: ModelStore,
    url: str,
    *,
    name: str,
    sha256: str | None,
    progress: ProgressFactory,
    headers: dict[str, str] | None = None,
) -> PullResult:
    from ember.store.download import download, normalize_digest

    partial = _partial_path(store, url)
    digest = normalize_digest(sha256) if sha256 is not None else None
    # One process at a time downloads a given URL: two writers on one partial file would corrupt it.
    with open(partial.with_suffix(".lock"), "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        with progress(f"pulling {name}", digest) as report:
            result = download(url, partial, expected_sha256=sha256, headers=headers, progress=report)
        try:
            info = read_gguf(result.path)
        except CorruptModelError as error:
            result.path.unlink(missing_ok=True)
            raise CorruptModelError(f"the file downloaded from {url} is not a usable GGUF model: {error}") from None
        blob = store.adopt(result.path, result.digest, result.size)
    try:
        return _register(store, name, blob, info, url)
    except BaseException:
        store.discard([blob])
        raise


def _pull_url(
    store: ModelStore, url: str, *, target_name: str | None, sha256: str | None, progress: ProgressFactory
) -> PullResult:
    filename = url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    name = target_name or name_from_filename(filename)
    return _download_and_register(store, url, name=name, sha256=sha256, progress=progress)


def _pull_huggingface(
    store: ModelStore, reference: str, *, target_name: str | None, sha256: str | None, progress: ProgressFactory
) -> PullResult:
    from ember.store.huggingface import HFDirectory, resolve_hf_reference

    hf_file = resolve_hf_reference(reference)
    if isinstance(hf_file, HFDirectory):  # no GGUF file: a transformers model directory
        from ember.store.pull_directory import pull_hf_directory

        return pull_hf_directory(store, hf_file, target_name or hf_file.suggested_name, progress)
    name = target_name or hf_file.suggested_name
    expected = sha256 or hf_file.sha256  # the hub lists each file's sha256: a download is always checked
    return _download_and_register(
        store, hf_file.url, name=name, sha256=expected, progress=progress, headers=dict(hf_file.headers)
    )
