"""The model store: content-addressed blobs and one manifest per `name:tag`, Ollama's layout.

    EMBER_HOME/models/blobs/sha256-<hex>                    file contents, named by their digest
    EMBER_HOME/models/manifests/<host>/<namespace>/<model>/<tag>   JSON listing a model's layers
    EMBER_HOME/models/tmp/                                  files being written (moved into blobs/ when done)
    EMBER_HOME/models/partial/                              interrupted downloads, kept to resume

Every path is built from a parsed ModelName or a validated digest, so nothing a user types can point outside
the store. Blobs are written to tmp/, fsynced and renamed into place; a manifest is written the same way. The
steps that make blobs visible, write or delete manifests, and collect unreferenced blobs hold one exclusive
lock (flock on `.lock`), so concurrent processes never see a manifest whose blobs are missing, and a blob is
removed only when no manifest refers to it.

The bundled default model is registered the first time a store is used, read or written (see
`ember.store.defaults`): a fresh EMBER_HOME lists it, and a user who removes it does not see it come back.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ember.config import ember_home
from ember.errors import EmberError, InvalidRequestError, ModelNotFoundError
from ember.store.names import ModelName, parse_model_name

DEFAULT_HOST = "ember.local"
DEFAULT_NAMESPACE = "library"
MANIFEST_MEDIA_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_MEDIA_TYPE = "application/vnd.docker.container.image.v1+json"
MODEL_MEDIA_TYPE = "application/vnd.ollama.image.model"
ADAPTER_MEDIA_TYPE = "application/vnd.ollama.image.adapter"
TEMPLATE_MEDIA_TYPE = "application/vnd.ollama.image.template"
SYSTEM_MEDIA_TYPE = "application/vnd.ollama.image.system"
PARAMS_MEDIA_TYPE = "application/vnd.ollama.image.params"
MESSAGES_MEDIA_TYPE = "application/vnd.ollama.image.messages"
LICENSE_MEDIA_TYPE = "application/vnd.ollama.image.license"
# A Hugging Face model directory: one layer per file (MODEL_FILE_MEDIA_TYPE, content-addressed like any blob)
# and, as its model layer, the JSON index of those files by relative path (see ModelStore.model_tree).
MODEL_FILES_MEDIA_TYPE = "application/vnd.ember.model.files"
MODEL_FILE_MEDIA_TYPE = "application/vnd.ember.model.file"
UPSTREAM_MEDIA_TYPE = "application/vnd.ember.upstream"  # an upstream model's servers, in place of a model file
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_CHUNK = 1024 * 1024


class StoreError(EmberError):
    """The store could not be read or written (disk full, permissions, a damaged manifest)."""

    http_status = 500


def validate_digest(text: str) -> str:
    """A digest is `sha256:` and 64 lower-case hex digits; anything else is refused."""
    if not isinstance(text, str) or not _DIGEST.fullmatch(text):
        raise InvalidRequestError(f"invalid digest {text!r}: expected sha256: followed by 64 lower-case hex digits")
    return text


@dataclass(frozen=True)
class Layer:
    media_type: str
    digest: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True)
class PendingBlob:
    """A blob written to tmp/ and hashed, not yet visible; `ModelStore.commit` moves it into place."""

    digest: str
    size: int
    temp_path: Path


@dataclass(frozen=True)
class Manifest:
    name: ModelName
    config: Layer
    layers: tuple[Layer, ...]
    modified: float  # seconds since the epoch

    def layer(self, media_type: str) -> Layer | None:
        return next((layer for layer in self.layers if layer.media_type == media_type), None)

    def all_layers(self, media_type: str) -> list[Layer]:
        return [layer for layer in self.layers if layer.media_type == media_type]

    @property
    def model_layer(self) -> Layer:
        """The layer that answers: the model file, a model directory's file index, or an upstream model's servers
        (its digest is the model's ID)."""
        layer = self.layer(MODEL_MEDIA_TYPE) or self.layer(MODEL_FILES_MEDIA_TYPE) or self.layer(UPSTREAM_MEDIA_TYPE)
        if layer is None:
            raise StoreError(f"the manifest of {self.name} has no model layer; remove it and pull again")
        return layer

    @property
    def digests(self) -> set[str]:
        return {self.config.digest, *(layer.digest for layer in self.layers)}

    @property
    def size(self) -> int:
        return sum(layer.size for layer in self.layers) + self.config.size


def _disk_error(error: OSError, doing: str) -> StoreError:
    if error.errno == errno.ENOSPC:
        return StoreError(f"the disk is full while {doing}; free some space and try again (nothing was registered)")
    return StoreError(f"cannot write the model store while {doing}: {error.strerror or error}")


class ModelStore:
    """The store under `root` (default EMBER_HOME/models). Cheap to create; safe across processes."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = (root if root is not None else ember_home() / "models").expanduser()
        self.blobs = self.root / "blobs"
        self.manifests = self.root / "manifests"
        self.tmp = self.root / "tmp"
        self.partial = self.root / "partial"
        self.trees = self.root / "trees"  # model directories laid out as links to their blobs, by index digest
        self._defaults_checked = False

    def _ensure_defaults(self) -> None:
        """Register the bundled models in a store that has not had them offered (after that: one small file read
        per instance). Never called under the lock: registering commits, and commit takes the lock itself."""
        if self._defaults_checked:
            return
        self._defaults_checked = True
        from ember.store.defaults import register_bundled_models

        register_bundled_models(self)

    # --- paths ---------------------------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        return self.blobs / validate_digest(digest).replace(":", "-")

    def model_tree(self, index: Layer) -> Path:
        """A model directory's files under their names, as symbolic links to the blobs (the layout of the
        Hugging Face cache's snapshots), made from the index layer the first time and kept while it is used."""
        tree = self.trees / index.digest.removeprefix("sha256:")
        if tree.is_dir():
            return tree
        files = self.read_json(index)
        staging = self.trees / f".{os.getpid()}-{uuid.uuid4().hex}"
        try:
            for relative, digest in files.items():
                parts = Path(relative).parts
                if not parts or any(part in ("", ".", "..") for part in parts) or Path(relative).is_absolute():
                    raise StoreError(f"the file index {index.digest} names a path outside its directory: {relative!r}")
                link = staging.joinpath(*parts)
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(self.blob_path(digest))
            try:
                os.rename(staging, tree)
            except OSError:  # another process made it meanwhile
                if not tree.is_dir():
                    raise
        except OSError as error:
            raise _disk_error(error, f"laying out {tree}") from None
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        return tree

    def manifest_path(self, name: ModelName) -> Path:
        host = name.host or DEFAULT_HOST
        return self.manifests / host / (name.namespace or DEFAULT_NAMESPACE) / name.model / name.tag

    def _ensure_dirs(self) -> None:
        try:
            for folder in (self.blobs, self.manifests, self.tmp, self.partial):
                folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise _disk_error(error, f"creating {self.root}") from None

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the store's exclusive lock (across processes) for the duration."""
        self._ensure_dirs()
        with open(self.root / ".lock", "a+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def temp_path(self, suffix: str = "") -> Path:
        """A fresh file name in tmp/ (pid in the name, so cleanup can tell whose it is)."""
        self._ensure_dirs()
        return self.tmp / f"{os.getpid()}-{uuid.uuid4().hex}{suffix}"

    # --- writing blobs -------------------------------------------------------------------------------

    def blob_from_bytes(self, data: bytes) -> PendingBlob:
        temp = self.temp_path()
        try:
            with temp.open("wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as error:
            temp.unlink(missing_ok=True)
            raise _disk_error(error, "writing a layer") from None
        return PendingBlob(f"sha256:{hashlib.sha256(data).hexdigest()}", len(data), temp)

    def blob_from_file(self, source: Path, *, link: bool = True) -> PendingBlob:
        """Stage a file as a blob: hard-linked when possible (same file system), else copied; hashed."""
        temp = self.temp_path()
        try:
            if link:
                try:
                    os.link(source, temp)
                except OSError:
                    link = False
            digest = hashlib.sha256()
            if link:
                with source.open("rb") as reader:
                    while chunk := reader.read(_CHUNK):
                        digest.update(chunk)
            else:
                free = shutil.disk_usage(self.tmp).free
                needed = source.stat().st_size
                if needed > free:
                    raise StoreError(f"not enough disk space to copy {source.name}: need {needed} bytes, have {free}")
                with source.open("rb") as reader, temp.open("wb") as writer:
                    while chunk := reader.read(_CHUNK):
                        digest.update(chunk)
                        writer.write(chunk)
                    writer.flush()
                    os.fsync(writer.fileno())
            return PendingBlob(f"sha256:{digest.hexdigest()}", temp.stat().st_size, temp)
        except OSError as error:
            temp.unlink(missing_ok=True)
            raise _disk_error(error, f"copying {source}") from None
        except BaseException:
            temp.unlink(missing_ok=True)
            raise

    def adopt(self, path: Path, digest: str, size: int) -> PendingBlob:
        """Stage a finished file (a completed download): move it into tmp/ under a fresh name."""
        temp = self.temp_path()
        try:
            os.replace(path, temp)
        except OSError:
            shutil.move(str(path), temp)
        return PendingBlob(validate_digest(digest), size, temp)

    @staticmethod
    def discard(pending: Sequence[PendingBlob]) -> None:
        for blob in pending:
            blob.temp_path.unlink(missing_ok=True)

    # --- manifests -----------------------------------------------------------------------------------

    def commit(
        self, name: str | ModelName, layers: Sequence[tuple[str, PendingBlob | Layer]], config: dict[str, Any]
    ) -> Manifest:
        """Make staged blobs visible and write the manifest of `name`, atomically, under the lock.

        `layers` pairs a media type with a staged blob or an existing layer (reused from another manifest).
        """
        self._ensure_defaults()  # a fresh store's first model is the bundled one, whatever the first command
        parsed = _short_name(name if isinstance(name, ModelName) else parse_model_name(name))
        pending = [blob for _, blob in layers if isinstance(blob, PendingBlob)]
        config_blob = self.blob_from_bytes(json.dumps(config, sort_keys=True).encode())
        pending.append(config_blob)
        try:
            with self.locked():
                for _, blob in layers:  # a reused layer may have been removed by another process meanwhile
                    if isinstance(blob, Layer) and not self.blob_path(blob.digest).exists():
                        raise StoreError(f"layer {blob.digest} is missing from the store; pull the model again")
                try:
                    for blob in pending:
                        target = self.blob_path(blob.digest)
                        if target.exists():
                            blob.temp_path.unlink(missing_ok=True)
                        else:
                            os.replace(blob.temp_path, target)
                    written = tuple(Layer(media_type, blob.digest, blob.size) for media_type, blob in layers)
                    config_layer = Layer(CONFIG_MEDIA_TYPE, config_blob.digest, config_blob.size)
                    manifest = Manifest(parsed, config_layer, written, time.time())
                    self._replace_manifest(manifest)
                except BaseException:
                    self._collect_garbage()  # blobs made visible for a manifest that was not written
                    raise
                return manifest
        except OSError as error:
            raise _disk_error(error, f"registering {parsed}") from None
        finally:
            self.discard(pending)

    def _replace_manifest(self, manifest: Manifest) -> None:
        """Write a manifest; blobs only the replaced one used are deleted. Call with the lock held."""
        replaced = self.manifest_path(manifest.name).exists()
        self._write_manifest(manifest)
        if replaced:
            self._collect_garbage()

    def _write_manifest(self, manifest: Manifest) -> None:
        document = {
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "config": manifest.config.to_json(),
            "layers": [layer.to_json() for layer in manifest.layers],
        }
        path = self.manifest_path(manifest.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = self.temp_path(".manifest")
        try:
            with temp.open("w", encoding="utf-8") as handle:
                json.dump(document, handle, indent=2)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, path)
        finally:
            temp.unlink(missing_ok=True)

    def get(self, name: str | ModelName) -> Manifest | None:
        self._ensure_defaults()
        return self._get(name)

    def _get(self, name: str | ModelName) -> Manifest | None:
        parsed = _short_name(name if isinstance(name, ModelName) else parse_model_name(name))
        path = self.manifest_path(parsed)
        try:
            text = path.read_text(encoding="utf-8")
            modified = path.stat().st_mtime
        except FileNotFoundError:
            return None
        except OSError as error:
            raise StoreError(f"cannot read the manifest of {parsed}: {error.strerror}") from None
        return self._parse_manifest(parsed, text, modified)

    def require(self, name: str | ModelName) -> Manifest:
        self._ensure_defaults()
        return self._require(name)

    def _require(self, name: str | ModelName) -> Manifest:
        manifest = self._get(name)
        if manifest is None:
            raise ModelNotFoundError(f"model '{name}' not found; `ember list` shows the models there are")
        return manifest

    def _parse_manifest(self, name: ModelName, text: str, modified: float) -> Manifest:
        try:
            document = json.loads(text)
            config = _layer(document["config"])
            layers = tuple(_layer(item) for item in document["layers"])
        except (ValueError, KeyError, TypeError, InvalidRequestError) as error:
            raise StoreError(f"the manifest of {name} is damaged ({error}); remove it with `ember rm {name}`") from None
        return Manifest(name, config, layers, modified)

    def list(self) -> list[Manifest]:
        """Every manifest in the store, newest first; damaged ones are skipped (and logged)."""
        self._ensure_defaults()
        return self._list()

    def _list(self) -> list[Manifest]:
        manifests = []
        if not self.manifests.is_dir():
            return []
        for path in self.manifests.glob("*/*/*/*"):
            if not path.is_file():
                continue
            host, namespace, model, tag = path.relative_to(self.manifests).parts
            try:
                name = _short_name(parse_model_name(f"{host}/{namespace}/{model}:{tag}"))
                manifest = self._parse_manifest(name, path.read_text(encoding="utf-8"), path.stat().st_mtime)
            except (EmberError, OSError):
                continue
            manifests.append(manifest)
        return sorted(manifests, key=lambda manifest: manifest.modified, reverse=True)

    def copy(self, source: str, target: str) -> Manifest:
        target_name = _short_name(parse_model_name(target))  # refuse a bad name before touching anything
        self._ensure_defaults()
        with self.locked():
            manifest = self._require(source)
            copied = Manifest(target_name, manifest.config, manifest.layers, time.time())
            self._replace_manifest(copied)
            return copied

    def remove(self, name: str) -> Manifest:
        """Delete a manifest, then every blob no manifest refers to any more."""
        self._ensure_defaults()  # `ember rm smollm2` as the first command on a fresh home removes it for good
        with self.locked():
            manifest = self._require(name)
            path = self.manifest_path(manifest.name)
            path.unlink()
            for folder in (path.parent, path.parent.parent, path.parent.parent.parent):
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only succeeds when empty
            self._collect_garbage()
            return manifest

    def _collect_garbage(self) -> None:
        referenced: set[str] = set()
        for manifest in self._list():
            referenced |= manifest.digests
        for blob in self.blobs.glob("sha256-*"):
            if blob.name.replace("-", ":", 1) not in referenced:
                blob.unlink(missing_ok=True)
        if self.trees.is_dir():
            for tree in self.trees.iterdir():
                if not tree.name.startswith(".") and f"sha256:{tree.name}" not in referenced:
                    shutil.rmtree(tree, ignore_errors=True)

    def cleanup_temp(self) -> int:
        """Remove temp files left by processes that are no longer running; return how many."""
        removed = 0
        if not self.tmp.is_dir():
            return 0
        for path in self.tmp.iterdir():
            pid_text = path.name.split("-", 1)[0]
            if pid_text.isdigit() and int(pid_text) != os.getpid() and not _process_alive(int(pid_text)):
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def read_text(self, layer: Layer) -> str:
        return self.blob_path(layer.digest).read_text(encoding="utf-8")

    def read_json(self, layer: Layer) -> Any:
        return json.loads(self.read_text(layer))


def _short_name(name: ModelName) -> ModelName:
    """The name as users write it: without ember's default host, and without `library/` when that is implied."""
    if name.host == DEFAULT_HOST:
        namespace = None if name.namespace == DEFAULT_NAMESPACE else name.namespace
        return ModelName(model=name.model, tag=name.tag, namespace=namespace)
    return name


def _layer(item: Any) -> Layer:
    return Layer(str(item["mediaType"]), validate_digest(item["digest"]), int(item["size"]))


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
