"""The CLI's side of a running server: when `ember serve` answers at EMBER_HOST, the model commands go through it.

As Ollama's CLI does: `ember list`, `show`, `pull`, `create`, `cp`, `rm` use the server's API, and `ember run`
streams from the server's /api/generate, so the model stays loaded there for the next command. When no server
answers (a cheap probe with a short timeout), the commands act on the store and run the model in-process.
Either way they print the same lines and the same errors.

Local paths are sent as absolute paths when the server is on this machine (the store hard-links them); a
server elsewhere gets the files uploaded as blobs (POST /api/blobs/<digest>), as `ollama create` does.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from datetime import datetime
from pathlib import Path
from typing import Any

from ember.config import Settings
from ember.errors import EmberError, ModelNotFoundError
from ember.store.names import parse_model_name
from ember.store.resolve import looks_like_path, user_path
from ember.types import GenerateResponse

_PROBE_TIMEOUT_S = 0.3
_REQUEST_TIMEOUT_S = 30.0
_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
_REMOTE_PREFIXES = ("http://", "https://", "hf.co/", "huggingface.co/")

Progress = Callable[[str], AbstractContextManager[Callable[[int, int | None], None]]]
# What the server's /api/pull says about every pull; the CLI pulling in-process does not print these either.
_ROUTINE_PULL_STATUSES = ("pulling manifest", "verifying sha256 digest", "writing manifest", "success")


def _headers(settings: Settings) -> dict[str, str]:
    keys = [key.strip() for key in settings.api_keys.split(",") if key.strip()]
    return {"Authorization": f"Bearer {keys[0]}"} if keys else {}


@functools.cache
def available() -> bool:
    """An ember server answers at EMBER_HOST (checked once per command, within a fraction of a second)."""
    import httpx

    settings = Settings()
    try:
        response = httpx.get(settings.base_url + "/", headers=_headers(settings), timeout=_PROBE_TIMEOUT_S)
    except httpx.HTTPError:
        return False
    if response.status_code == 200:
        return response.text.startswith("ember")  # not another server on the port (Ollama's is 11434 too)
    return response.status_code == 401 and "API key" in response.text  # ember's, without our key: say so later


def server_is_local() -> bool:
    host, _ = Settings().host_and_port
    return host in _LOCAL_HOSTS or host.startswith("127.") or host in ("0.0.0.0", "::")


def _raise_for(response: Any) -> None:
    if response.status_code < 400:
        return
    try:
        data = json.loads(response.read() or b"{}")
    except ValueError:
        data = {}
    message = data.get("error") if isinstance(data, dict) else None
    error = ModelNotFoundError if response.status_code == 404 else EmberError
    raise error(str(message or f"the server answered {response.status_code}"))


def _unreachable() -> EmberError:
    from ember.cli.serving import ServerUnreachableError

    settings = Settings()
    return ServerUnreachableError(f"the ember server at {settings.base_url} stopped answering; try again")


def request(method: str, path: str, body: dict[str, Any] | None = None, *, content: Any = None) -> Any:
    """One request; the JSON answer (None for an empty one). An error status raises its message."""
    import httpx

    settings = Settings()
    try:
        response = httpx.request(
            method,
            settings.base_url + path,
            json=body,
            content=content,
            headers=_headers(settings),
            timeout=httpx.Timeout(_REQUEST_TIMEOUT_S, read=None),
        )
    except httpx.HTTPError:
        raise _unreachable() from None
    _raise_for(response)
    return response.json() if response.content.strip() else None


def stream(path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The NDJSON lines of a streamed answer; an error line raises its message."""
    import httpx

    settings = Settings()
    timeout = httpx.Timeout(_REQUEST_TIMEOUT_S, read=None)  # a pull or an answer may be silent for long
    try:
        with httpx.stream(
            "POST", settings.base_url + path, json=body, headers=_headers(settings), timeout=timeout
        ) as response:
            _raise_for(response)
            for text in response.iter_lines():
                if not text.strip():
                    continue
                line = json.loads(text)
                if line.get("error"):
                    raise EmberError(str(line["error"]))
                yield line
    except httpx.HTTPError:
        raise _unreachable() from None


def display_name(name: str) -> str:
    """A model's name as the store shows it (`pirate` -> `pirate:latest`)."""
    from ember.store.store import _short_name

    return str(_short_name(parse_model_name(name)))


def _upload(path: Path) -> str:
    """Send a file to the server's blob store (unless it has it already); return its digest."""
    digest = hashlib.sha256()
    with path.open("rb") as reader:
        while chunk := reader.read(1024 * 1024):
            digest.update(chunk)
    name = f"sha256:{digest.hexdigest()}"
    try:
        request("HEAD", f"/api/blobs/{name}")
    except ModelNotFoundError:
        with path.open("rb") as reader:
            request("POST", f"/api/blobs/{name}", content=reader)
    return name


# --- the commands ------------------------------------------------------------------------------------------


def list_rows() -> list[tuple[str, str, int, float]]:
    """(name, digest, size, modified) of each model on the server, newest first."""
    rows = []
    for model in request("GET", "/api/tags").get("models", []):
        modified = datetime.fromisoformat(model["modified_at"].replace("Z", "+00:00")).timestamp()
        rows.append((model["name"], model["digest"], int(model["size"]), modified))
    return rows


def show(name: str) -> tuple[dict[str, Any], str]:
    """The facts `ember show` prints (as cli.models.model_facts makes them), and the Modelfile."""
    from ember.store.pull import format_parameter_count

    data = request("POST", "/api/show", {"model": name})
    info, extra = data.get("model_info", {}), data.get("ember", {})
    architecture = info.get("general.architecture")
    count = int(info.get("general.parameter_count", 0))
    facts = {
        "name": extra.get("name", name),
        "architecture": architecture,
        "parameters": count,
        "parameter_size": format_parameter_count(count),
        "quantization": data.get("details", {}).get("quantization_level"),
        "context_length": info.get(f"{architecture}.context_length"),
        "embedding_length": info.get(f"{architecture}.embedding_length"),
        "layers": info.get(f"{architecture}.block_count"),
        "digest": extra.get("digest"),
        "template": data.get("template") or None,
        "system": data.get("system") or None,
        "parameters_defaults": extra.get("parameters", {}),
        "messages": data.get("messages", []),
        "adapters": extra.get("adapters", []),
        "license": data.get("license") or info.get("general.license"),
        "engine": extra.get("engine", "llama.cpp"),
    }
    if architecture == "upstream":
        facts["context_length"] = info.get("upstream.context_length")
        facts["upstream"] = {k.removeprefix("upstream."): v for k, v in info.items() if k.startswith("upstream.")}
    return facts, data.get("modelfile", "")


def pull(
    source: str,
    *,
    name: str | None,
    sha256: str | None,
    insecure: bool = False,
    progress: Progress,
    notice: Callable[[str], None] = lambda text: None,
) -> tuple[str, str, int]:
    """Pull through the server, its download progress shown as bars and its notices passed to `notice`;
    (name, digest, size) of the model."""
    if not source.lower().startswith(_REMOTE_PREFIXES) and looks_like_path(source):
        path = user_path(source)
        if not path.is_file():
            raise ModelNotFoundError(f"no model file at {path}")
        if not server_is_local():
            from ember.store.pull import _check_sha256, name_from_filename

            _check_sha256(path, sha256)
            files = {path.name: _upload(path)}
            body = {"model": name or name_from_filename(path.name), "files": files, "stream": False}
            result = request("POST", "/api/create", body)
            return result["model"], result["digest"], int(result["size"])
        source = str(path.absolute())
    body: dict[str, Any] = {"model": source, "stream": True, "insecure": insecure}
    if name is not None:
        body["destination"] = name
    if sha256 is not None:
        body["sha256"] = sha256
    registered: tuple[str, str, int] | None = None
    with contextlib.ExitStack() as bars:
        reports: dict[str, Callable[[int, int | None], None]] = {}
        for line in stream("/api/pull", body):
            status = line.get("status", "")
            if "completed" in line:  # a download: one bar per file, as `ember pull` shows without a server
                if status not in reports:
                    reports[status] = bars.enter_context(progress(status))
                reports[status](int(line["completed"]), line.get("total"))
            elif "model_digest" in line:  # ember's addition to "writing manifest": what was registered
                registered = line["model"], line["model_digest"], int(line["size"])
            elif status == "success" and registered is not None:
                return registered
            elif status not in _ROUTINE_PULL_STATUSES:
                notice(status)
    raise EmberError("the server ended the pull without saying it succeeded")


def create(name: str, modelfile: Path, text: str, quantize: str | None) -> str:
    """Create through the server; the name of the new model."""
    body: dict[str, Any] = {"model": name, "stream": True}
    if quantize is not None:
        body["quantize"] = quantize
    if server_is_local():
        body.update(modelfile=text, path=str(modelfile.absolute()))  # relative paths are relative to it
    else:
        body["modelfile"] = _with_uploads(text, modelfile.absolute().parent)
    for line in stream("/api/create", body):
        if line.get("status") == "success":
            return str(line.get("model") or display_name(name))
    raise EmberError("the server ended the create without saying it succeeded")


def _with_uploads(text: str, base_dir: Path) -> str:
    """The Modelfile with each local file (FROM, ADAPTER) uploaded and named by digest, as `FROM @sha256:...`."""
    from ember.store.modelfile import parse_modelfile, render_modelfile

    spec = parse_modelfile(text)

    def upload(value: str, what: str, kind: str) -> str:
        if not looks_like_path(value):
            return value
        path = user_path(value)
        path = path if path.is_absolute() else base_dir / path
        if not path.is_file():
            raise ModelNotFoundError(f"{what} {value}: no {kind} file at {path}")
        return "@" + _upload(path)

    return render_modelfile(
        from_=upload(spec.from_, "FROM", "model"),
        parameters=spec.parameters,
        template=spec.template,
        system=spec.system,
        messages=spec.messages,
        license=spec.license,
        adapters=[upload(adapter, "ADAPTER", "adapter") for adapter in spec.adapters],
    )


def copy(source: str, target: str) -> str:
    parse_model_name(target)  # a bad new name is refused first, as the store does
    request("POST", "/api/copy", {"source": source, "destination": target})
    return display_name(target)


def remove(name: str) -> str:
    request("DELETE", "/api/delete", {"model": name})
    return display_name(name)


def load(model: str, options: dict[str, Any]) -> str | None:
    """Load `model` on the server (an unknown one fails now); the name to send, or None to run in-process.

    A path is checked here (it is a file on this machine) and sent absolute; a server elsewhere cannot read
    it, so that model runs in-process.
    """
    if looks_like_path(model):
        from ember.store.resolve import resolve_model

        path = resolve_model(model).path
        if not server_is_local():
            return None
        model = str(path)
    request("POST", "/api/generate", {"model": model, "prompt": "", "options": options, "stream": False})
    return model


def generate(body: dict[str, Any]) -> Iterator[GenerateResponse]:
    """The chunks of an answer from the server's /api/generate; closing the iterator cancels it there."""
    for line in stream("/api/generate", {**body, "stream": True}):
        yield GenerateResponse(**line)
