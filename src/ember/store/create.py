"""`ember create NAME -f Modelfile`: a new model from a base model and a Modelfile's defaults.

FROM names a stored model (its layers are reused, its defaults inherited), a bundled model, or a .gguf path
(relative to the Modelfile). TEMPLATE may be Jinja or one of Ollama's simple Go templates, which is translated
to Jinja once, here. PARAMETER, SYSTEM and MESSAGE become defaults beneath each request's own values. ADAPTER
adds a LoRA applied at load. `quantize` re-quantizes the model file through llama.cpp into a new blob.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ember.chat_template import ChatTemplate
from ember.errors import InvalidRequestError, ModelNotFoundError
from ember.store.bundled import find_bundled
from ember.store.gguf_file import read_gguf
from ember.store.modelfile import Modelfile, parse_modelfile
from ember.store.names import parse_model_name
from ember.store.pull import model_config
from ember.store.resolve import looks_like_path, user_path
from ember.store.store import (
    ADAPTER_MEDIA_TYPE,
    LICENSE_MEDIA_TYPE,
    MESSAGES_MEDIA_TYPE,
    MODEL_MEDIA_TYPE,
    PARAMS_MEDIA_TYPE,
    SYSTEM_MEDIA_TYPE,
    TEMPLATE_MEDIA_TYPE,
    UPSTREAM_MEDIA_TYPE,
    Layer,
    Manifest,
    ModelStore,
    PendingBlob,
)

StagedLayer = tuple[str, PendingBlob | Layer]


@dataclass
class _Base:
    """What FROM gives: a model file, and the layers and defaults a stored base brings along."""

    path: Path
    source: str
    model_layer: Layer | None = None  # set when the base is already in the store
    layers: dict[str, list[Layer]] = field(default_factory=dict)


def create(
    name: str,
    modelfile: str | Modelfile,
    *,
    base_dir: Path | None = None,
    quantize: str | None = None,
    store: ModelStore | None = None,
) -> Manifest:
    """Create (or replace) model `name` from a Modelfile's text; paths in it are relative to `base_dir`."""
    store = store or ModelStore()
    target = parse_model_name(name)
    spec = modelfile if isinstance(modelfile, Modelfile) else parse_modelfile(modelfile)
    if spec.upstream is not None:
        return _create_upstream(store, name, spec, quantize)
    base_dir = base_dir or Path.cwd()
    base = _resolve_base(store, spec.from_, base_dir)
    staged: list[StagedLayer] = []
    try:
        staged.append((MODEL_MEDIA_TYPE, _model_blob(store, base, quantize)))
        info = read_gguf(_staged_path(store, staged[0][1]))
        staged.extend(_adapter_layers(store, base, spec, base_dir, info.architecture))
        staged.extend(_text_layers(store, base, spec))
        config = model_config(info, base.source)
        return store.commit(target, staged, config)
    finally:
        store.discard([blob for _, blob in staged if isinstance(blob, PendingBlob)])


def _create_upstream(store: ModelStore, name: str, spec: Modelfile, quantize: str | None) -> Manifest:
    """An upstream model: its servers in place of a model file, and the Modelfile's own defaults."""
    assert spec.upstream is not None
    if quantize is not None:
        raise InvalidRequestError("an upstream model cannot be quantized here: its server holds the weights")
    base = _Base(path=Path(), source=spec.upstream.replicas[0])
    staged: list[StagedLayer] = []
    try:
        staged.append((UPSTREAM_MEDIA_TYPE, store.blob_from_bytes(spec.upstream.to_json())))
        staged.extend(_text_layers(store, base, spec))
        config = {"model_format": "upstream", "model_family": "", "source": spec.upstream.model}
        return store.commit(parse_model_name(name), staged, config)
    finally:
        store.discard([blob for _, blob in staged if isinstance(blob, PendingBlob)])


def _staged_path(store: ModelStore, blob: PendingBlob | Layer) -> Path:
    return blob.temp_path if isinstance(blob, PendingBlob) else store.blob_path(blob.digest)


def _resolve_base(store: ModelStore, from_: str, base_dir: Path) -> _Base:
    if looks_like_path(from_):
        path = user_path(from_)
        path = path if path.is_absolute() else base_dir / path
        if not path.is_file():
            raise ModelNotFoundError(f"FROM {from_}: no model file at {path}")
        read_gguf(path)
        return _Base(path=path.resolve(), source=str(path.resolve()))
    parsed = parse_model_name(from_)
    manifest = store.get(parsed)
    if manifest is not None:
        layers: dict[str, list[Layer]] = {}
        for layer in manifest.layers:
            layers.setdefault(layer.media_type, []).append(layer)
        model_layer = manifest.model_layer
        return _Base(store.blob_path(model_layer.digest), str(manifest.name), model_layer, layers)
    bundled = find_bundled(parsed.model, parsed.tag) if parsed.host is None and parsed.namespace is None else None
    if bundled is not None:
        return _Base(path=bundled.locate(), source=f"python package {bundled.package}")
    raise ModelNotFoundError(f"FROM {from_}: no such model; pull it first, or give the path of a .gguf file")


def _model_blob(store: ModelStore, base: _Base, quantize: str | None) -> PendingBlob | Layer:
    if quantize is None:
        return base.model_layer or store.blob_from_file(base.path, link=True)
    from ember.engine.quantize import quantize_model

    output = store.temp_path(".gguf")
    try:
        quantize_model(base.path, output, quantize)
        read_gguf(output)
        return store.blob_from_file(output, link=True)
    finally:
        output.unlink(missing_ok=True)


def _adapter_layers(
    store: ModelStore, base: _Base, spec: Modelfile, base_dir: Path, architecture: str
) -> list[StagedLayer]:
    layers: list[StagedLayer] = [(ADAPTER_MEDIA_TYPE, layer) for layer in base.layers.get(ADAPTER_MEDIA_TYPE, [])]
    for adapter in spec.adapters:
        path = user_path(adapter)
        path = path if path.is_absolute() else base_dir / path
        if not path.is_file():
            raise ModelNotFoundError(f"ADAPTER {adapter}: no adapter file at {path}")
        check_adapter(path, architecture, f"ADAPTER {adapter}")
        layers.append((ADAPTER_MEDIA_TYPE, store.blob_from_file(path.resolve(), link=True)))
    return layers


def check_adapter(path: Path, architecture: str, what: str) -> None:
    """Refuse a file that is not a GGUF LoRA adapter for models of `architecture`; `what` names it in errors."""
    info = read_gguf(path)
    if info.metadata.get("general.type") != "adapter":
        raise InvalidRequestError(
            f"{what} is not a LoRA adapter (general.type is {info.metadata.get('general.type')!r}); "
            "convert the adapter to GGUF with llama.cpp's convert_lora_to_gguf.py"
        )
    if info.architecture != architecture:
        raise InvalidRequestError(f"{what} is for {info.architecture} models, but the base model is {architecture}")


def _inherited(store: ModelStore, base: _Base, media_type: str) -> Layer | None:
    layers = base.layers.get(media_type)
    return layers[0] if layers else None


def _text_layers(store: ModelStore, base: _Base, spec: Modelfile) -> list[StagedLayer]:
    layers: list[StagedLayer] = []

    template = spec.template
    if template is not None:
        from ember.store.go_template import is_go_template, translate_go_template

        if is_go_template(template):
            template = translate_go_template(template)
        ChatTemplate(template)  # a syntax error is reported now, not at the first request
        layers.append((TEMPLATE_MEDIA_TYPE, store.blob_from_bytes(template.encode())))
    elif (inherited := _inherited(store, base, TEMPLATE_MEDIA_TYPE)) is not None:
        layers.append((TEMPLATE_MEDIA_TYPE, inherited))

    if spec.system is not None:
        layers.append((SYSTEM_MEDIA_TYPE, store.blob_from_bytes(spec.system.encode())))
    elif (inherited := _inherited(store, base, SYSTEM_MEDIA_TYPE)) is not None:
        layers.append((SYSTEM_MEDIA_TYPE, inherited))

    parameters: dict[str, Any] = {}
    if (inherited := _inherited(store, base, PARAMS_MEDIA_TYPE)) is not None:
        parameters.update(store.read_json(inherited))
    parameters.update(spec.parameters)
    if parameters:
        layers.append((PARAMS_MEDIA_TYPE, store.blob_from_bytes(json.dumps(parameters, sort_keys=True).encode())))

    if spec.messages:
        layers.append((MESSAGES_MEDIA_TYPE, store.blob_from_bytes(json.dumps(spec.messages).encode())))
    elif (inherited := _inherited(store, base, MESSAGES_MEDIA_TYPE)) is not None:
        layers.append((MESSAGES_MEDIA_TYPE, inherited))

    layers.extend((LICENSE_MEDIA_TYPE, layer) for layer in base.layers.get(LICENSE_MEDIA_TYPE, []))
    layers.extend((LICENSE_MEDIA_TYPE, store.blob_from_bytes(text.encode())) for text in spec.license)
    return layers
