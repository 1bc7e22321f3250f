"""Pulling by Ollama library name: `ember pull llama3.2:1b`, `ember pull user/model:tag`, `POST /api/pull`.

The protocol, as Ollama speaks it (server/images.go `pullModelManifest`, server/download.go, types/model/name.go):

    GET {registry}/v2/{namespace}/{model}/manifests/{tag}
        Accept: application/vnd.docker.distribution.manifest.v2+json
        -> {"schemaVersion": 2, "config": LAYER, "layers": [LAYER, ...]}   LAYER = {mediaType, digest, size}
    GET {registry}/v2/{namespace}/{model}/blobs/{digest}      (often redirected to a CDN; Range resumes)

A name without a host comes from EMBER_REGISTRY (Ollama's public registry by default), in namespace `library`
unless it names one, and is stored under the name as typed (`llama3.2:1b`, `user/model:tag`). A name with a host
(`example.com/team/model:tag`) comes from https://host (http:// when the pull says `insecure`) and keeps it.

The layers become an ember model:
- model: the GGUF file, checked as GGUF; adapter: a LoRA, checked against the model's architecture;
- template (or the older prompt): Ollama's Go template, translated to Jinja as `ember create` translates it; one
  that uses Go features the translation does not cover is left out, and the model file's own chat template
  (tokenizer.chat_template) is used instead;
- params: Ollama's options as JSON, kept as the model's PARAMETERs (values checked; names ember does not know,
  and values it refuses, are left out with a notice, as Ollama ignores what it does not know);
- system, messages, license: kept as they are;
- projector (vision) and tensor (safetensors) layers: the pull is refused, ember cannot run such a model;
  draft (speculative decoding) and the long-deprecated embed layers: skipped.

Every blob is checked against its digest (download.py hashes it as it streams) and its size. Blobs the store
already has are reused, not downloaded. Nothing is registered until every layer is complete and checked: an
interrupted pull keeps its downloads under partial/ and the same pull resumes them; a blob with the wrong
digest is deleted and the pull fails with nothing listed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx

from ember import __version__
from ember.errors import CorruptModelError, EmberError, InvalidOptionError, ModelNotFoundError, PullError, TemplateError
from ember.store.names import ModelName
from ember.store.store import (
    ADAPTER_MEDIA_TYPE,
    LICENSE_MEDIA_TYPE,
    MESSAGES_MEDIA_TYPE,
    MODEL_MEDIA_TYPE,
    PARAMS_MEDIA_TYPE,
    SYSTEM_MEDIA_TYPE,
    TEMPLATE_MEDIA_TYPE,
    Layer,
    ModelStore,
    PendingBlob,
    validate_digest,
)

if TYPE_CHECKING:
    from ember.store.pull import ProgressFactory, PullResult

log = logging.getLogger(__name__)

OLLAMA_REGISTRY = "https://registry.ollama.ai"
MANIFEST_ACCEPT = "application/vnd.docker.distribution.manifest.v2+json"
PROMPT_MEDIA_TYPE = "application/vnd.ollama.image.prompt"  # the template's name in Ollama's first versions
PROJECTOR_MEDIA_TYPE = "application/vnd.ollama.image.projector"
TENSOR_MEDIA_TYPE = "application/vnd.ollama.image.tensor"
DRAFT_MEDIA_TYPE = "application/vnd.ollama.image.draft"
EMBED_MEDIA_TYPE = "application/vnd.ollama.image.embed"
DEFAULT_NAMESPACE = "library"

_TEXT_TYPES = (
    TEMPLATE_MEDIA_TYPE,
    PROMPT_MEDIA_TYPE,
    SYSTEM_MEDIA_TYPE,
    PARAMS_MEDIA_TYPE,
    MESSAGES_MEDIA_TYPE,
    LICENSE_MEDIA_TYPE,
)
_REFUSED = {
    PROJECTOR_MEDIA_TYPE: "has a vision projector (it is a multimodal model), which ember cannot use; "
    "pull a text-only model",
    TENSOR_MEDIA_TYPE: "is made of safetensors weights (Ollama runs those through MLX), which ember cannot load; "
    "pull a GGUF model",
}
_SKIPPED = {
    DRAFT_MEDIA_TYPE: "a draft model for speculative decoding, which ember does not use",
    EMBED_MEDIA_TYPE: "an embeddings layer, which Ollama itself no longer uses",
}
_INDEX_MEDIA_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
_MAX_MANIFEST_BYTES = 1 << 20
_MAX_TEXT_BYTES = 4 << 20  # templates, system prompts, parameters, licenses: a few KB in practice
_TIMEOUT_S = 30.0

Status = Callable[[str], None]


@dataclass(frozen=True)
class RegistryModel:
    """Where a model lives in a registry."""

    base_url: str  # scheme://host[:port][/prefix], no trailing slash
    namespace: str
    model: str
    tag: str

    @property
    def reference(self) -> str:
        return f"{self.namespace}/{self.model}:{self.tag}"

    @property
    def display_name(self) -> str:
        """The name as users write it: `llama3.2:1b`, `user/model:tag`."""
        return self.reference.removeprefix(f"{DEFAULT_NAMESPACE}/")

    @property
    def manifest_url(self) -> str:
        return f"{self.base_url}/v2/{self.namespace}/{self.model}/manifests/{self.tag}"

    def blob_url(self, digest: str) -> str:
        return f"{self.base_url}/v2/{self.namespace}/{self.model}/blobs/{validate_digest(digest)}"


@dataclass(frozen=True)
class RegistryManifest:
    config: Layer | None
    layers: tuple[Layer, ...]


def locate(name: ModelName, *, registry: str, insecure: bool = False, as_typed: str | None = None) -> RegistryModel:
    """The registry location of a parsed name: its own host if it has one, else `registry` (EMBER_REGISTRY).

    ember stores names in lower case; the registry is asked with the case the user typed (`as_typed`), as
    Ollama asks it (`qwen2.5:0.5b-instruct-q4_K_M`).
    """
    name = _with_typed_case(name, as_typed) if as_typed is not None else name
    base = f"{'http' if insecure else 'https'}://{name.host}" if name.host else _registry_base(registry)
    return RegistryModel(base, name.namespace or DEFAULT_NAMESPACE, name.model, name.tag)


def _with_typed_case(name: ModelName, typed: str) -> ModelName:
    text = typed.strip()
    path, _, tag = text.rpartition(":") if ":" in text.rsplit("/", 1)[-1] else (text, "", name.tag)
    parts = path.split("/")
    cased = ModelName(
        model=parts[-1],
        tag=tag,
        namespace=parts[-2] if len(parts) >= 2 else None,
        host=parts[0] if len(parts) == 3 else None,
    )
    # Only a change of case is taken from the text, so every part is still the validated one.
    return cased if str(cased).lower() == str(name) else name


def stored_name(name: ModelName) -> ModelName:
    """The name a pulled model is registered under: as typed, without the implied `library/`."""
    if name.host is None and name.namespace == DEFAULT_NAMESPACE:
        return ModelName(model=name.model, tag=name.tag)
    return name


def _registry_base(registry: str) -> str:
    base = registry.strip().rstrip("/")
    parts = urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise PullError(
            f"EMBER_REGISTRY is {registry!r}, which is not a registry's URL; set it to one such as {OLLAMA_REGISTRY}"
        )
    return base


def _client() -> httpx.Client:
    return httpx.Client(
        follow_redirects=True, timeout=httpx.Timeout(_TIMEOUT_S), headers={"User-Agent": f"ember/{__version__}"}
    )


# --- the manifest --------------------------------------------------------------------------------------------


def fetch_manifest(location: RegistryModel) -> RegistryManifest:
    """GET the manifest; a missing model is ModelNotFoundError, anything else that goes wrong is PullError."""
    try:
        with _client() as client, client.stream("GET", location.manifest_url, headers={"Accept": MANIFEST_ACCEPT}) as r:
            body = _read_limited(r, _MAX_MANIFEST_BYTES)
            if r.status_code >= 400:
                raise _manifest_error(location, r.status_code, body)
            content_type = r.headers.get("Content-Type", "").split(";", 1)[0].strip()
    except httpx.TimeoutException:
        raise PullError(_unreachable(location, f"no answer within {_TIMEOUT_S:g} s")) from None
    except httpx.TransportError as error:
        raise PullError(_unreachable(location, str(error) or type(error).__name__)) from None
    except (httpx.HTTPError, httpx.InvalidURL) as error:
        raise PullError(f"cannot ask the registry {location.base_url} for {location.display_name}: {error}") from None
    return _parse_manifest(location, body, content_type)


def _read_limited(response: httpx.Response, limit: int) -> bytes:
    data = bytearray()
    for chunk in response.iter_bytes():
        data += chunk
        if len(data) > limit:
            raise PullError(f"the registry's answer for {response.url} is larger than {limit:,} bytes: not a manifest")
    return bytes(data)


def _unreachable(location: RegistryModel, reason: str) -> str:
    return (
        f"cannot reach the registry {location.base_url} ({reason}); check the network connection, "
        "or set EMBER_REGISTRY to a registry this machine can reach"
    )


def _manifest_error(location: RegistryModel, status: int, body: bytes) -> EmberError:
    detail = _registry_message(body)
    said = f" (the registry says: {detail})" if detail else ""
    if status == 404:
        where = "the Ollama library" if location.base_url == OLLAMA_REGISTRY else f"the registry {location.base_url}"
        hint = "; see https://ollama.com/library for names and tags" if location.base_url == OLLAMA_REGISTRY else ""
        return ModelNotFoundError(
            f"model '{location.display_name}' not found in {where}{said}; check the name and the tag{hint}"
        )
    if status in (401, 403):
        return PullError(
            f"the registry {location.base_url} refused access to {location.display_name} (HTTP {status}){said}; "
            "ember pulls public models only, without signing in"
        )
    if status == 429:
        return PullError(f"the registry {location.base_url} is rate limiting requests; wait a minute and try again")
    return PullError(f"the registry {location.base_url} answered HTTP {status} for {location.display_name}{said}")


def _registry_message(body: bytes) -> str | None:
    """The message of a registry error body: `{"errors": [{"code", "message"}]}` (Docker) or `{"error": ...}`."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if isinstance(data, dict) and isinstance(data.get("errors"), list) and data["errors"]:
        first = data["errors"][0]
        if isinstance(first, dict):
            return str(first.get("message") or first.get("code") or "")[:300] or None
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return data["error"][:300]
    return None


def _parse_manifest(location: RegistryModel, body: bytes, content_type: str) -> RegistryManifest:
    def damaged(reason: str) -> PullError:
        return PullError(f"the registry's manifest of {location.display_name} is not usable: {reason}")

    try:
        document = json.loads(body)
    except ValueError:
        raise damaged("it is not JSON") from None
    if not isinstance(document, dict):
        raise damaged("it is not a JSON object")
    if document.get("mediaType") in _INDEX_MEDIA_TYPES or content_type in _INDEX_MEDIA_TYPES:
        raise damaged("it is an index of container images, not an Ollama model")
    if not isinstance(document.get("layers"), list):
        raise damaged("it lists no layers")
    config = document.get("config")
    try:
        layers = tuple(_layer(item) for item in document["layers"])
        config_layer = _layer(config) if isinstance(config, dict) and config.get("digest") else None
    except (KeyError, TypeError, ValueError, EmberError) as error:
        raise damaged(f"a layer is malformed ({error})") from None
    return RegistryManifest(config_layer, layers)


def _layer(item: Any) -> Layer:
    if not isinstance(item, dict):
        raise TypeError("not an object")
    media_type, digest, size = item["mediaType"], item["digest"], item["size"]
    if not isinstance(media_type, str) or not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ValueError(f"mediaType {media_type!r}, size {size!r}")
    return Layer(media_type, validate_digest(digest), size)


# --- choosing and fetching the layers ------------------------------------------------------------------------


def _layers_to_fetch(location: RegistryModel, manifest: RegistryManifest, status: Status) -> list[Layer]:
    """The layers ember uses, small ones first so that the model's download is the last to start."""
    for layer in manifest.layers:
        if layer.media_type in _REFUSED:
            raise PullError(f"cannot pull {location.display_name}: it {_REFUSED[layer.media_type]}")
    models = [layer for layer in manifest.layers if layer.media_type == MODEL_MEDIA_TYPE]
    if not models:
        raise PullError(f"cannot pull {location.display_name}: its manifest has no model layer")
    if len(models) > 1:
        raise PullError(f"cannot pull {location.display_name}: it has {len(models)} model files; ember loads one")
    wanted: list[Layer] = []
    for layer in manifest.layers:
        if layer.media_type in _SKIPPED:
            status(f"skipping {_SKIPPED[layer.media_type]}")
        elif layer.media_type in _TEXT_TYPES:
            if layer.size > _MAX_TEXT_BYTES:
                raise PullError(
                    f"cannot pull {location.display_name}: its {layer.media_type.rsplit('.', 1)[-1]} layer is "
                    f"{layer.size:,} bytes, more than the {_MAX_TEXT_BYTES:,} ember accepts for text"
                )
            wanted.append(layer)
        elif layer.media_type in (MODEL_MEDIA_TYPE, ADAPTER_MEDIA_TYPE):
            wanted.append(layer)
        else:
            status(f"skipping a layer of unknown type {layer.media_type}")
    if manifest.config is not None:
        if manifest.config.size > _MAX_MANIFEST_BYTES:
            raise PullError(f"cannot pull {location.display_name}: its config is {manifest.config.size:,} bytes")
        wanted.append(manifest.config)
    order = {ADAPTER_MEDIA_TYPE: 1, MODEL_MEDIA_TYPE: 2}
    unique = {layer.digest: layer for layer in wanted}.values()  # a digest listed twice is fetched once
    return sorted(unique, key=lambda layer: order.get(layer.media_type, 0))


class _Fetcher:
    """Downloads blobs into partial/, holding each one's lock until the model is registered (or has failed), so
    that two pulls of the same blob never write one partial file and a finished one is not moved under another."""

    def __init__(self, store: ModelStore, location: RegistryModel, progress: ProgressFactory) -> None:
        self.store = store
        self.location = location
        self.progress = progress
        self.locks = contextlib.ExitStack()
        self.downloaded: dict[str, Path] = {}  # digest -> complete, checked file in partial/

    def __enter__(self) -> _Fetcher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.locks.close()

    def partial_path(self, digest: str) -> Path:
        self.store.partial.mkdir(parents=True, exist_ok=True)
        return self.store.partial / f"{digest.replace(':', '-')}.partial"

    def lock_all(self, layers: list[Layer]) -> None:
        for digest in sorted({layer.digest for layer in layers}):  # one order for every process: no deadlock
            lock_file = self.partial_path(digest).with_suffix(".lock")
            handle = self.locks.enter_context(open(lock_file, "a+b"))  # noqa: SIM115 (closed by the ExitStack)
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)  # released when the file is closed

    def fetch(self, layer: Layer) -> Path:
        """The layer's bytes on disk: the store's blob when it has it, else a checked download."""
        from ember.store.download import download

        description = f"pulling {layer.digest[7:19]}"
        existing = self.store.blob_path(layer.digest)
        if existing.is_file() and existing.stat().st_size == layer.size:
            with self.progress(description, layer.digest) as report:
                report(layer.size, layer.size)
            return existing
        with self.progress(description, layer.digest) as report:
            result = download(
                self.location.blob_url(layer.digest),
                self.partial_path(layer.digest),
                expected_sha256=layer.digest,
                expected_size=layer.size,
                progress=lambda done, total: report(done, layer.size if total is None else total),
            )
        self.downloaded[layer.digest] = result.path
        return result.path

    def forget(self, digest: str) -> None:
        """Delete a download whose bytes are right but unusable (not GGUF): a resume would only keep them."""
        path = self.downloaded.pop(digest, None)
        if path is not None:
            path.unlink(missing_ok=True)

    def stage(self, layer: Layer) -> PendingBlob | Layer:
        """A big layer for commit: the downloaded file moved into tmp/, or the store's blob reused."""
        path = self.downloaded.pop(layer.digest, None)
        if path is None:
            return layer
        return self.store.adopt(path, layer.digest, layer.size)

    def clean_up(self) -> None:
        """After the commit: the small downloads were copied into blobs, their partial files can go."""
        for path in self.downloaded.values():
            path.unlink(missing_ok=True)
        self.downloaded.clear()


# --- from layers to an ember model ---------------------------------------------------------------------------


def _text(path: Path, layer: Layer, location: RegistryModel) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        kind = layer.media_type.rsplit(".", 1)[-1]
        raise PullError(f"cannot pull {location.display_name}: its {kind} layer is not UTF-8 text") from None


def _json(path: Path, layer: Layer, location: RegistryModel) -> Any:
    try:
        return json.loads(_text(path, layer, location))
    except ValueError:
        kind = layer.media_type.rsplit(".", 1)[-1]
        raise PullError(f"cannot pull {location.display_name}: its {kind} layer is not valid JSON") from None


def translate_template(text: str, status: Status) -> str | None:
    """The registry's Go template as the Jinja ember renders; None (with a notice) when it cannot be translated."""
    from ember.chat_template import ChatTemplate
    from ember.store.go_template import translate_go_template

    try:
        jinja = translate_go_template(text)
        ChatTemplate(jinja)
    except TemplateError as error:
        log.info("the registry's template was not translated: %s", error)
        status(
            "using the chat template inside the model file: the registry's template uses Go template features "
            "that ember does not translate"
        )
        return None
    return jinja


def registry_parameters(data: Any, status: Status) -> dict[str, Any]:
    """Ollama's params JSON as ember parameters; what ember does not know or refuses is left out, with a notice."""
    from ember.options import ALL_OPTION_NAMES, IGNORED_OLLAMA_OPTIONS, resolve_options

    if not isinstance(data, dict):
        status("ignoring the registry's parameters: they are not a JSON object")
        return {}
    kept: dict[str, Any] = {}
    for name, value in data.items():
        if name in IGNORED_OLLAMA_OPTIONS:
            continue  # Ollama accepts and ignores these too
        if name not in ALL_OPTION_NAMES:
            status(f"ignoring the registry's parameter {name!r}: ember has no such option")
            continue
        if name == "stop" and isinstance(value, str):
            value = [value]
        try:
            resolve_options({name: value})
        except InvalidOptionError as error:
            status(f"ignoring the registry's parameter {name!r}: {error}")
            continue
        kept[name] = value
    return kept


def _messages(data: Any, status: Status) -> list[dict[str, str]] | None:
    from ember.store.modelfile import MESSAGE_ROLES

    if isinstance(data, list) and all(
        isinstance(m, dict) and m.get("role") in MESSAGE_ROLES and isinstance(m.get("content"), str) for m in data
    ):
        return [{"role": m["role"], "content": m["content"]} for m in data]
    status("ignoring the registry's messages: they are not a list of {role, content}")
    return None


def _config_notes(config: dict[str, Any], status: Status) -> None:
    for key, what in (("renderer", "renderer"), ("parser", "output parser")):
        if config.get(key):
            status(
                f"the registry's model uses Ollama's built-in {what} {config[key]!r}; ember uses the model's chat "
                "template instead"
            )


# --- the pull ------------------------------------------------------------------------------------------------


def pull_from_registry(
    store: ModelStore,
    name: ModelName,
    *,
    target: ModelName | None,
    registry: str,
    insecure: bool,
    as_typed: str | None = None,
    model_digest: str | None,
    progress: ProgressFactory,
    status: Status,
) -> PullResult:
    """Fetch `name` from its registry, check every layer, and register it under `target` (default: the name).

    `model_digest`, when given, is the digest the model file must have (`ember pull --sha256`)."""
    from ember.store.create import check_adapter
    from ember.store.gguf_file import read_gguf
    from ember.store.pull import PullResult, model_config

    location = locate(name, registry=registry, insecure=insecure, as_typed=as_typed)
    manifest = fetch_manifest(location)
    wanted = _layers_to_fetch(location, manifest, status)
    (model_layer,) = (layer for layer in wanted if layer.media_type == MODEL_MEDIA_TYPE)
    if model_digest is not None and model_layer.digest != model_digest:
        raise PullError(
            f"the model file of {location.display_name} has digest {model_layer.digest}, not the expected "
            f"{model_digest}; nothing was downloaded"
        )
    source = f"{location.base_url}/{location.reference}"
    with _Fetcher(store, location, progress) as fetcher:
        fetcher.lock_all(wanted)
        files = {layer.digest: fetcher.fetch(layer) for layer in wanted}

        try:
            info = read_gguf(files[model_layer.digest])
        except CorruptModelError as error:
            fetcher.forget(model_layer.digest)
            raise CorruptModelError(
                f"the model file of {location.display_name} is not a usable GGUF model: {error}"
            ) from None
        for layer in wanted:
            if layer.media_type == ADAPTER_MEDIA_TYPE:
                check_adapter(files[layer.digest], info.architecture, f"the adapter {layer.digest[7:19]}")

        config: dict[str, Any] = {}
        if manifest.config is not None:
            registry_config = _json(files[manifest.config.digest], manifest.config, location)
            if isinstance(registry_config, dict):
                _config_notes(registry_config, status)
                config.update(registry_config)
        config.update(model_config(info, source))

        staged: list[tuple[str, PendingBlob | Layer]] = []
        try:
            staged.extend(_text_layers(store, wanted, files, location, status))
            adapters = [layer for layer in wanted if layer.media_type == ADAPTER_MEDIA_TYPE]
            staged.extend((ADAPTER_MEDIA_TYPE, fetcher.stage(layer)) for layer in adapters)
            staged.insert(0, (MODEL_MEDIA_TYPE, fetcher.stage(model_layer)))
            registered = store.commit(target or stored_name(name), staged, config)
        finally:
            store.discard([blob for _, blob in staged if isinstance(blob, PendingBlob)])
        fetcher.clean_up()
    return PullResult(registered, source)


def _text_layers(
    store: ModelStore, wanted: list[Layer], files: dict[str, Path], location: RegistryModel, status: Status
) -> Iterator[tuple[str, PendingBlob | Layer]]:
    """The template, system, parameters, messages and licenses, as ember stores them."""
    template_done = False
    for layer in wanted:
        path = files[layer.digest]
        kind = layer.media_type
        if kind in (TEMPLATE_MEDIA_TYPE, PROMPT_MEDIA_TYPE) and not template_done:
            template_done = True
            jinja = translate_template(_text(path, layer, location), status)
            if jinja is not None:
                yield TEMPLATE_MEDIA_TYPE, store.blob_from_bytes(jinja.encode())
        elif kind in (SYSTEM_MEDIA_TYPE, LICENSE_MEDIA_TYPE):
            yield kind, store.blob_from_bytes(_text(path, layer, location).encode())
        elif kind == PARAMS_MEDIA_TYPE:
            parameters = registry_parameters(_json(path, layer, location), status)
            if parameters:
                yield PARAMS_MEDIA_TYPE, store.blob_from_bytes(json.dumps(parameters, sort_keys=True).encode())
        elif kind == MESSAGES_MEDIA_TYPE:
            messages = _messages(_json(path, layer, location), status)
            if messages:
                yield MESSAGES_MEDIA_TYPE, store.blob_from_bytes(json.dumps(messages).encode())
