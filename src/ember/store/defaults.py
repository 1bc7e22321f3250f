"""The bundled models (the default model, SmolLM2) registered in a store the first time it is read.

So a fresh EMBER_HOME lists `smollm2:latest` in `ember list`, `/api/tags` and `/v1/models`, and any client can
pick it. Each bundled model is offered to a store once: `bundled-models.json` in the store's root records the
names already offered, so a model the user removed (`ember rm smollm2`) never comes back by itself. It stays
runnable by name, since it ships with ember, and `ember pull smollm2` lists it again.

Registering hard-links the package's .gguf into blobs/ (a copy when the store is on another file system) and
hashes it, once per store. After that, opening a store costs one small file read.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from ember.errors import EmberError, ModelNotFoundError
from ember.store.bundled import BUNDLED_MODELS, BundledModel
from ember.store.store import ModelStore

log = logging.getLogger(__name__)

MARKER_NAME = "bundled-models.json"


def register_bundled_models(store: ModelStore) -> None:
    """Register each installed bundled model not yet offered to `store`; a failure is logged, never raised."""
    waiting = _not_offered(store)
    if not any(_installed_path(model) for model in waiting):
        return  # nothing to do, or the package is missing: try again when it is installed
    try:
        with _registration_lock(store):
            waiting = _not_offered(store)  # another process may have done it meanwhile
            offered = set(_offered(store))
            for model in waiting:
                if _installed_path(model) is None:
                    continue
                _register(store, model)
                offered.add(model.name)
            _write_marker(store, offered)
    except (EmberError, OSError) as error:
        log.warning("could not register the bundled models in %s: %s", store.root, error)


def mark_bundled_models_offered(store: ModelStore) -> None:
    """Record every bundled model as offered, so `store` starts empty (as after the user removed them)."""
    store.root.mkdir(parents=True, exist_ok=True)
    _write_marker(store, set(BUNDLED_MODELS))


def _register(store: ModelStore, model: BundledModel) -> None:
    from ember.store.pull import pull

    name = f"{model.name}:{model.tags[0]}"
    if store._get(name) is None:  # pulled before: keep it (and its date) as it is
        pull(name, store=store)
        log.info("registered the bundled model %s in %s", name, store.root)


@functools.cache
def _installed_path(model: BundledModel) -> Path | None:
    """Where the model's package keeps its .gguf; None when it is not installed (looked up once per process)."""
    try:
        return model.locate()
    except ModelNotFoundError:
        return None


def _marker(store: ModelStore) -> Path:
    return store.root / MARKER_NAME


def _offered(store: ModelStore) -> list[str]:
    try:
        data = json.loads(_marker(store).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError):
        # A damaged record: treat every model as offered rather than bring back one the user removed.
        return list(BUNDLED_MODELS)
    offered = data.get("offered") if isinstance(data, dict) else None
    return [name for name in offered if isinstance(name, str)] if isinstance(offered, list) else list(BUNDLED_MODELS)


def _not_offered(store: ModelStore) -> list[BundledModel]:
    offered = set(_offered(store))
    return [model for name, model in BUNDLED_MODELS.items() if name not in offered]


def _write_marker(store: ModelStore, offered: set[str]) -> None:
    temp = store.temp_path(".marker")
    try:
        temp.write_text(json.dumps({"offered": sorted(offered)}) + "\n", encoding="utf-8")
        os.replace(temp, _marker(store))
    finally:
        temp.unlink(missing_ok=True)


@contextlib.contextmanager
def _registration_lock(store: ModelStore) -> Iterator[None]:
    """Its own lock file, not the store's: registering commits a manifest, which takes the store's lock."""
    store.root.mkdir(parents=True, exist_ok=True)
    with open(store.root / ".bundled-models.lock", "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
