"""Ollama's model-management routes (docs/api.md): pull, create, copy, delete, blobs, and `GET /`.

Pulling and creating are blocking work (downloads, hashing, copying gigabytes): each runs in a worker thread
and its progress reaches the event loop through a queue, so the server keeps answering meanwhile. A stream
(the default) is NDJSON status lines ending with `{"status": "success"}`; `stream: false` returns that last
line alone. An error known within the first moments (an unknown model, a bad name, a missing file) is an
HTTP error status; one that comes later, after lines were sent, arrives as a line `{"error": "..."}`.

Paths in a request (`model` of a pull, `from` of a create, FROM and ADAPTER of a Modelfile) name files on the
server's machine. That is allowed because ember serves this machine (it binds 127.0.0.1 by default and checks
the Host header; API keys guard it when it is exposed), and every file is checked as GGUF before it becomes a
model. Relative paths are refused unless the request says what they are relative to: the server cannot know
its client's working directory. A client elsewhere uploads its files with POST /api/blobs/<digest> and refers
to them by digest (`files`, `adapters`, or `FROM @sha256:...` in a Modelfile), as `ollama create` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import ClientDisconnect

from ember.api import schemas
from ember.api.ollama import read_json
from ember.errors import EmberError, InvalidRequestError
from ember.store.modelfile import Modelfile, ModelfileError, parse_modelfile, render_modelfile
from ember.store.names import parse_model_name
from ember.store.resolve import looks_like_path, user_path
from ember.store.store import ModelStore, StoreError

log = logging.getLogger(__name__)
router = APIRouter()

Line = dict[str, Any]
Emit = Callable[[Line], None]

_EARLY_ERROR_WAIT_S = 2.0  # how long a stream waits for its first line, so that an early error gets a status
_DIGEST = re.compile(r"sha256[:-]([0-9a-fA-F]{64})")
_WRITE_BATCH = 4 * 1024 * 1024
_REMOTE_PREFIXES = ("http://", "https://", "hf.co/", "huggingface.co/")
_DONE = object()


class BlobNotFoundError(EmberError):
    http_status = 404


class OperationCancelledError(EmberError):
    """The client went away: the worker stops at its next progress report."""

    http_status = 499


# --- the worker thread and its progress --------------------------------------------------------------------


class _Job:
    """`work(emit)` in a worker thread; each `emit(line)` is a status line, the return value the last line."""

    def __init__(self, work: Callable[[Emit], Line]) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.stopped = threading.Event()
        self.task = asyncio.ensure_future(asyncio.to_thread(work, self.emit))
        self.task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Future[Line]) -> None:
        if not task.cancelled():
            task.exception()  # retrieved here, so a client that left early leaves no "never retrieved" warning
        self.queue.put_nowait(_DONE)

    def emit(self, line: Line) -> None:
        """Called in the worker thread."""
        if self.stopped.is_set():
            raise OperationCancelledError("the client went away; stopped")
        self.loop.call_soon_threadsafe(self.queue.put_nowait, line)

    async def first(self) -> asyncio.Future[Any]:
        """Wait a moment for the first line; raise the job's error if it failed by then."""
        getter = asyncio.ensure_future(self.queue.get())
        await asyncio.wait({getter}, timeout=_EARLY_ERROR_WAIT_S)
        if getter.done() and getter.result() is _DONE:
            self.task.result()  # raises the job's error, if any
        return getter

    async def lines(self, first: asyncio.Future[Any] | None = None) -> AsyncIterator[Line]:
        try:
            while True:
                item = await (first if first is not None else self.queue.get())
                first = None
                if item is _DONE:
                    yield self.task.result()
                    return
                yield item
        finally:
            self.stopped.set()


async def _respond(job: _Job, stream: bool, opening: Line | None = None) -> Response:
    if not stream:
        last: Line = {}
        async for line in job.lines():
            last = line
        return JSONResponse(last)
    first = await job.first()

    async def body() -> AsyncIterator[bytes]:
        try:
            if opening is not None:
                yield (json.dumps(opening) + "\n").encode()
            async for line in job.lines(first):
                yield (json.dumps(line) + "\n").encode()
        except EmberError as error:
            yield (json.dumps({"error": str(error)}) + "\n").encode()
        except Exception as error:
            log.exception("unexpected error in a model-management stream")
            yield (
                json.dumps({"error": f"internal error: {type(error).__name__}; see the server's log"}) + "\n"
            ).encode()

    return StreamingResponse(body(), media_type="application/x-ndjson")


# --- request fields ----------------------------------------------------------------------------------------


def _model_field(body: dict[str, Any], doing: str) -> str:
    name = body.get("model") or body.get("name")  # `name` is Ollama's older spelling
    if not isinstance(name, str) or not name.strip():
        raise InvalidRequestError(f'give the model to {doing}: {{"model": "NAME"}}')
    return name


def _optional_str(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InvalidRequestError(f"{key} must be a string")
    return value


def _stream_flag(body: dict[str, Any]) -> bool:
    stream = body.get("stream")
    if stream is None:
        return True
    if not isinstance(stream, bool):
        raise InvalidRequestError("stream must be true or false")
    return stream


def normalize_digest(text: str) -> str:
    """`sha256:<hex>` (or `sha256-<hex>`, as Ollama also accepts) as `sha256:<lower-case hex>`; else a 400."""
    match = _DIGEST.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise InvalidRequestError(f"invalid digest {text!r}: expected sha256: followed by 64 hex digits")
    return "sha256:" + match.group(1).lower()


def _blob(store: ModelStore, digest: str, what: str) -> Path:
    path = store.blob_path(normalize_digest(digest))
    if not path.is_file():
        raise InvalidRequestError(
            f"{what}: no blob {digest} on this server; upload the file first with POST /api/blobs/{digest}"
        )
    return path


def _check_local_path(text: str, what: str, base_dir: Path | None) -> None:
    if looks_like_path(text) and not user_path(text).is_absolute() and base_dir is None:
        raise InvalidRequestError(
            f"{what} {text}: give an absolute path (the server does not know the client's working directory), "
            "or upload the file with POST /api/blobs/<digest>"
        )


# --- pull --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _download_lines(emit: Emit, description: str, digest: str | None) -> Iterator[Callable[[int, int | None], None]]:
    def report(done: int, total: int | None) -> None:
        line: Line = {"status": description, "completed": done}
        if total is not None:
            line["total"] = total
        if digest is not None:
            line["digest"] = digest
        emit(line)

    yield report


@router.post("/api/pull", openapi_extra=schemas.PULL)
async def pull_route(request: Request) -> Response:
    """{model, insecure, stream}; ember's own fields: `destination` (the name to register) and `sha256`.

    The lines are Ollama's: "pulling manifest"; for each file {"status": "pulling <12 hex digits>", "digest",
    "total", "completed"} (Open WebUI shows a line with a digest as progress); notices as plain status lines;
    "verifying sha256 digest"; "writing manifest", which also carries ember's `model`, `model_digest` and `size`
    of the registered model (no `digest` key, so that it does not read as progress); and a bare
    {"status": "success"}, the only line with `stream: false`.
    """
    from ember.store.pull import pull

    body = await read_json(request)
    source = _model_field(body, "pull")
    destination = _optional_str(body, "destination")
    sha256 = _optional_str(body, "sha256")
    insecure = body.get("insecure", False)
    if not isinstance(insecure, bool):
        raise InvalidRequestError("insecure must be true or false")
    stream = _stream_flag(body)
    if destination is not None:
        parse_model_name(destination)
    if not source.lower().startswith(_REMOTE_PREFIXES):
        _check_local_path(source, "pull", None)
    registry = request.app.state.settings.registry

    def work(emit: Emit) -> Line:
        result = pull(
            source,
            name=destination,
            sha256=sha256,
            insecure=insecure,
            registry=registry,
            progress=lambda description, digest=None: _download_lines(emit, description, digest),
            status=lambda text: emit({"status": text}),
        )
        emit({"status": "verifying sha256 digest"})
        emit(
            {
                "status": "writing manifest",
                "model": result.name,
                "model_digest": result.digest,
                "size": result.manifest.size,
            }
        )
        return {"status": "success"}

    return await _respond(_Job(work), stream, opening={"status": "pulling manifest"})


# --- create ------------------------------------------------------------------------------------------------


def _without_line_number(error: ModelfileError) -> InvalidRequestError:
    return InvalidRequestError(re.sub(r"^Modelfile line \d+: ", "", str(error)))


def _from_modelfile(body: dict[str, Any], store: ModelStore) -> tuple[Modelfile, Path | None]:
    """Ollama's older form: {model, modelfile, path}. Relative paths are relative to `path`'s folder."""
    text = body["modelfile"]
    if not isinstance(text, str):
        raise InvalidRequestError("modelfile must be the text of a Modelfile")
    path = _optional_str(body, "path")
    base_dir = None
    if path is not None:
        modelfile_path = user_path(path)
        if not modelfile_path.is_absolute():
            raise InvalidRequestError(f"path {path}: give the absolute path of the Modelfile")
        base_dir = modelfile_path.parent
    spec = parse_modelfile(text)

    def locate(value: str, what: str) -> str:
        if value.startswith("@"):  # a blob the client uploaded: `FROM @sha256:...`, as older Ollama clients send
            return str(_blob(store, value[1:], f"{what} {value}"))
        _check_local_path(value, what, base_dir)
        return value

    spec.from_ = locate(spec.from_, "FROM")
    spec.adapters = [locate(adapter, "ADAPTER") for adapter in spec.adapters]
    return spec, base_dir


def _string_map(value: Any, key: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise InvalidRequestError(f'{key} must map file names to digests, as {{"model.gguf": "sha256:..."}}')
    return value


def _from_fields(body: dict[str, Any], store: ModelStore) -> Modelfile:
    """Ollama's current form: {model, from | files, adapters, template, license, system, parameters, messages}."""
    from_ = _optional_str(body, "from")
    files = body.get("files")
    if from_ is not None:  # `from` wins over `files`, as in Ollama
        _check_local_path(from_, "from", None)
    elif files:
        files = _string_map(files, "files")
        if len(files) != 1:
            raise InvalidRequestError(
                f"ember creates a model from one GGUF file, not {len(files)} (split GGUF and safetensors are "
                "not supported)"
            )
        ((filename, digest),) = files.items()
        from_ = str(_blob(store, digest, f"files[{filename!r}]"))
    else:
        raise InvalidRequestError("give `from` (a model name or a path) or `files` (uploaded GGUF blobs)")
    adapters = [
        str(_blob(store, digest, f"adapters[{name!r}]"))
        for name, digest in _string_map(body.get("adapters") or {}, "adapters").items()
    ]
    parameters = body.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidRequestError("parameters must be an object of option names and values")
    messages = body.get("messages") or []
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    ):
        raise InvalidRequestError('messages must be a list of {"role": ..., "content": ...}')
    license_ = body.get("license") or []
    licenses = [license_] if isinstance(license_, str) else license_
    if not isinstance(licenses, list) or not all(isinstance(text, str) for text in licenses):
        raise InvalidRequestError("license must be a string or a list of strings")
    # Written out as a Modelfile and read back, so the request is checked exactly as a Modelfile is.
    text = render_modelfile(
        from_=from_,
        parameters=parameters,
        template=_optional_str(body, "template"),
        system=_optional_str(body, "system"),
        messages=[{"role": m["role"], "content": m["content"]} for m in messages],
        license=licenses,
        adapters=adapters,
    )
    try:
        return parse_modelfile(text)
    except ModelfileError as error:
        raise _without_line_number(error) from None


@router.post("/api/create", openapi_extra=schemas.CREATE)
async def create_route(request: Request) -> Response:
    from ember.store.create import create

    body = await read_json(request)
    name = _model_field(body, "create")
    parse_model_name(name)
    stream = _stream_flag(body)
    quantize = _optional_str(body, "quantize") or _optional_str(body, "quantization")
    store = ModelStore()
    if body.get("modelfile"):
        spec, base_dir = await asyncio.to_thread(_from_modelfile, body, store)
    else:
        spec, base_dir = await asyncio.to_thread(_from_fields, body, store), None

    def work(emit: Emit) -> Line:
        manifest = create(name, spec, base_dir=base_dir, quantize=quantize, store=store)
        for layer in manifest.layers:
            emit({"status": f"using layer {layer.digest}", "digest": layer.digest, "total": layer.size})
        emit({"status": "writing manifest"})
        digest = manifest.model_layer.digest
        return {"status": "success", "model": str(manifest.name), "digest": digest, "size": manifest.size}

    return await _respond(_Job(work), stream)


# --- copy, delete ------------------------------------------------------------------------------------------


@router.post("/api/copy", openapi_extra=schemas.COPY)
async def copy_route(request: Request) -> Response:
    body = await read_json(request)
    source, destination = body.get("source"), body.get("destination")
    if not (isinstance(source, str) and source and isinstance(destination, str) and destination):
        raise InvalidRequestError('give {"source": "NAME", "destination": "NEW_NAME"}')
    await asyncio.to_thread(ModelStore().copy, source, destination)
    return Response(status_code=200)


@router.delete("/api/delete", openapi_extra=schemas.NAMED_MODEL)
async def delete_route(request: Request) -> Response:
    body = await read_json(request)
    name = _model_field(body, "delete")
    await asyncio.to_thread(ModelStore().remove, name)
    return Response(status_code=200)


# --- blobs -------------------------------------------------------------------------------------------------


@router.head("/api/blobs/{digest}")
async def head_blob(digest: str) -> Response:
    path = ModelStore().blob_path(normalize_digest(digest))
    if not await asyncio.to_thread(path.is_file):
        raise BlobNotFoundError(f"blob {digest} not found")
    return Response(status_code=200)


def _write(handle: Any, hasher: Any, data: bytes) -> None:
    hasher.update(data)
    handle.write(data)


def _sync(handle: Any) -> None:
    handle.flush()
    os.fsync(handle.fileno())


def _place(store: ModelStore, temp: Path, target: Path) -> None:
    with store.locked():
        if target.exists():
            temp.unlink(missing_ok=True)
        else:
            os.replace(temp, target)


@router.post("/api/blobs/{digest}")
async def upload_blob(digest: str, request: Request) -> Response:
    """The body is a file; it is streamed to the store's tmp/ (never held in memory), hashed, checked against
    the digest and moved into blobs/. 201 when stored, 200 when the blob was there already."""
    digest = normalize_digest(digest)
    store = ModelStore()
    target = store.blob_path(digest)
    try:
        if await asyncio.to_thread(target.is_file):
            async for _ in request.stream():  # read and dropped, so the client can finish sending
                pass
            return Response(status_code=200)
        temp = await asyncio.to_thread(store.temp_path)
        length = request.headers.get("content-length", "")
        free = (await asyncio.to_thread(shutil.disk_usage, store.tmp)).free
        if length.isdigit() and int(length) > free:
            raise StoreError(f"not enough disk space for the blob: need {length} bytes, have {free}")
        hasher = hashlib.sha256()
        try:
            with temp.open("wb") as handle:
                pending = bytearray()
                async for chunk in request.stream():
                    pending += chunk
                    if len(pending) >= _WRITE_BATCH:
                        await asyncio.to_thread(_write, handle, hasher, bytes(pending))
                        pending.clear()
                await asyncio.to_thread(_write, handle, hasher, bytes(pending))
                await asyncio.to_thread(_sync, handle)
            got = "sha256:" + hasher.hexdigest()
            if got != digest:
                raise InvalidRequestError(f"digest mismatch, expected {digest!r}, got {got!r}")
            await asyncio.to_thread(_place, store, temp, target)
        except OSError as error:
            raise StoreError(f"cannot store the blob: {error.strerror or error}") from None
        finally:
            temp.unlink(missing_ok=True)
    except ClientDisconnect:
        return Response(status_code=400)  # nobody is left to read it; the partial file is gone
    return Response(status_code=201)
