"""Shared fixtures. The real default model (SmolLM2-135M-Instruct) is loaded once per session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import ember
from ember.store.bundled import DEFAULT_MODEL


@pytest.fixture(scope="session")
def model_path() -> Path:
    return DEFAULT_MODEL.locate()


@pytest.fixture(scope="session")
def model() -> Iterator[ember.Model]:
    """The default model with a small context: shared by the tests that only read from it."""
    with ember.Model("smollm2", num_ctx=1024) as loaded:
        yield loaded


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads or writes the user's real EMBER_HOME."""
    monkeypatch.setenv("EMBER_HOME", str(tmp_path_factory.mktemp("ember-home")))


def greedy(**extra: object) -> dict[str, object]:
    """Options for deterministic output: greedy, no repetition penalty unless asked."""
    return {"temperature": 0, "repeat_penalty": 1.0, **extra}


CPU_COUNT = os.cpu_count() or 1
