"""From what a user typed (a model name or a path to a .gguf) to a file and its defaults."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ember.errors import ModelNotFoundError
from ember.store.bundled import find_bundled
from ember.store.model_directory import read_model_directory
from ember.store.names import parse_model_name
from ember.store.store import (
    ADAPTER_MEDIA_TYPE,
    LICENSE_MEDIA_TYPE,
    MESSAGES_MEDIA_TYPE,
    MODEL_FILES_MEDIA_TYPE,
    PARAMS_MEDIA_TYPE,
    SYSTEM_MEDIA_TYPE,
    TEMPLATE_MEDIA_TYPE,
    UPSTREAM_MEDIA_TYPE,
    Manifest,
    ModelStore,
)
from ember.store.upstream import UPSTREAM, UpstreamSpec

LLAMA_CPP = "llama.cpp"  # the engine of a GGUF file: every model but those a store entry says otherwise of
TRANSFORMERS = "transformers"  # the engine of a Hugging Face model directory (safetensors, tokenizer, template)


@dataclass(frozen=True)
class ModelSource:
    """A model file and the defaults that travel with it (a Modelfile's SYSTEM, TEMPLATE, PARAMETER ...)."""

    name: str
    path: Path
    system: str | None = None
    template: str | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)
    messages: tuple[Mapping[str, Any], ...] = ()
    adapters: tuple[Path, ...] = ()  # LoRA adapter GGUF files applied at load (a Modelfile's ADAPTER)
    license: str | None = None
    digest: str | None = None  # "sha256:..." of the model blob, when it comes from the store
    engine: str = LLAMA_CPP  # what produces its tokens (serve/engines.py starts the runner for it)
    upstream: UpstreamSpec | None = None  # engine "upstream": the servers that answer (path is this spec's blob)


def user_path(text: str | os.PathLike[str]) -> Path:
    """A path a user gave, with `~` expanded; `~nosuchuser/...` is a clear error rather than a crash."""
    try:
        return Path(text).expanduser()
    except RuntimeError:
        raise ModelNotFoundError(f"cannot find the home folder in {str(text)!r}; give the path in full") from None


def looks_like_path(text: str) -> bool:
    """A .gguf name, anything with a directory part, or an existing file or directory is a path, not a name."""
    return (
        text.lower().endswith(".gguf")
        or text.startswith((".", "~", os.sep))
        or (os.altsep is not None and os.altsep in text)
        or Path(text).is_file()
        or (Path(text) / "config.json").is_file()
    )


def source_from_manifest(store: ModelStore, manifest: Manifest) -> ModelSource:
    """A stored model: its GGUF blob, with the defaults its Modelfile gave it."""
    parameters: dict[str, Any] = {}
    messages: list[Mapping[str, Any]] = []
    template = system = None
    params_layer = manifest.layer(PARAMS_MEDIA_TYPE)
    if params_layer is not None:
        parameters = dict(store.read_json(params_layer))
    messages_layer = manifest.layer(MESSAGES_MEDIA_TYPE)
    if messages_layer is not None:
        messages = list(store.read_json(messages_layer))
    if (layer := manifest.layer(TEMPLATE_MEDIA_TYPE)) is not None:
        template = store.read_text(layer)
    if (layer := manifest.layer(SYSTEM_MEDIA_TYPE)) is not None:
        system = store.read_text(layer)
    licenses = [store.read_text(layer) for layer in manifest.all_layers(LICENSE_MEDIA_TYPE)]
    model_layer = manifest.model_layer
    directory = model_layer.media_type == MODEL_FILES_MEDIA_TYPE
    upstream = None
    if model_layer.media_type == UPSTREAM_MEDIA_TYPE:
        upstream = UpstreamSpec.from_json(store.read_json(model_layer))
    return ModelSource(
        name=str(manifest.name),
        path=store.model_tree(model_layer) if directory else store.blob_path(model_layer.digest),
        system=system,
        template=template,
        parameters=parameters,
        messages=tuple(messages),
        adapters=tuple(store.blob_path(layer.digest) for layer in manifest.all_layers(ADAPTER_MEDIA_TYPE)),
        license="\n\n".join(licenses) if licenses else None,
        digest=model_layer.digest,
        engine=TRANSFORMERS if directory else UPSTREAM if upstream is not None else LLAMA_CPP,
        upstream=upstream,
    )


def resolve_model(name_or_path: str | os.PathLike[str], store: ModelStore | None = None) -> ModelSource:
    """Find a model by store name or file path. Raises ModelNotFoundError with what to do next."""
    if isinstance(name_or_path, os.PathLike) or looks_like_path(str(name_or_path)):
        path = user_path(name_or_path)
        if path.is_dir():
            read_model_directory(path)  # refuse a directory that is not a model, saying what it lacks
            return ModelSource(name=path.name, path=path.resolve(), engine=TRANSFORMERS)
        if not path.is_file():
            raise ModelNotFoundError(f"no model file at {path}")
        return ModelSource(name=path.name, path=path.resolve())
    name = parse_model_name(str(name_or_path))
    store = store or ModelStore()
    manifest = store.get(name)
    if manifest is not None:
        return source_from_manifest(store, manifest)
    if name.host is None and name.namespace in (None, "library"):
        bundled = find_bundled(name.model, name.tag)
        if bundled is not None:
            return ModelSource(name=f"{bundled.name}:{name.tag}", path=bundled.locate(), license=bundled.license)
    raise ModelNotFoundError(
        f"model '{name}' not found; try `ember pull {name.path_name}`, or pass the path of a .gguf file"
    )
