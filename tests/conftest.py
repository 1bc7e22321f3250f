"""Shared fixtures. The real default model (SmolLM2-135M-Instruct) is loaded once per session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import ember
from ember.store.bundled import DEFAULT_MODEL
from ember.store.defaults import mark_bundled_models_offered
from ember.store.store import ModelStore
from tests.http_server import FileServer


@pytest.fixture(scope="session")
def model_path() -> Path:
    return DEFAULT_MODEL.locate()


@pytest.fixture(scope="session")
def model() -> Iterator[ember.Model]:
    """The default model with a small context: shared by the tests that only read from it."""
    with ember.Model("smollm2", num_ctx=1024) as loaded:
        yield loaded


@pytest.fixture(scope="session", autouse=True)
def _session_environment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Set before any other fixture, so that session and module fixtures (a loaded model, a server) see them too:
    an EMBER_HOME of the session's own (each test then gets its own below), and as EMBER_REGISTRY a local
    registry with no models, so a pull of an unknown name gets its 404 and nothing reaches the internet."""
    home = tmp_path_factory.mktemp("session-home")
    mark_bundled_models_offered(ModelStore(home / "models"))
    with FileServer() as registry, pytest.MonkeyPatch.context() as patch:
        patch.setenv("EMBER_HOME", str(home))
        patch.setenv("EMBER_REGISTRY", registry.base_url)
        yield


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads or writes the user's real EMBER_HOME.

    The store starts empty, as after a user removed the bundled model, so that a test sees only the models it
    put there; `fresh_home` gives the home of a new user, where the bundled model is registered on first use.
    """
    home = tmp_path_factory.mktemp("ember-home")
    monkeypatch.setenv("EMBER_HOME", str(home))
    mark_bundled_models_offered(ModelStore(home / "models"))


@pytest.fixture
def fresh_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """EMBER_HOME as a new user has it: nothing there yet."""
    home = tmp_path_factory.mktemp("fresh-home")
    monkeypatch.setenv("EMBER_HOME", str(home))
    return home


def greedy(**extra: object) -> dict[str, object]:
    """Options for deterministic output: greedy, no repetition penalty unless asked."""
    return {"temperature": 0, "repeat_penalty": 1.0, **extra}


CPU_COUNT = os.cpu_count() or 1
