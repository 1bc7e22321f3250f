"""The transformers engine: Hugging Face model directories (safetensors, tokenizer, chat template) served
with `transformers` and `torch`, in a runner process of their own like llama.cpp models.

Only this package imports torch and transformers, and only when a model of this engine is loaded, so ember
without the extra works as before. `support` (which requests the engine can answer) imports neither, nor
does store/model_directory.py (what a model directory holds).
"""

from __future__ import annotations

from typing import Any

from ember.errors import ModelLoadError
from ember.store.resolve import TRANSFORMERS

__all__ = ["INSTALL_HINT", "TRANSFORMERS", "import_transformers"]
INSTALL_HINT = "pip install 'ember[transformers]'"


def import_transformers() -> tuple[Any, Any]:
    """(torch, transformers), or a ModelLoadError that says how to install them."""
    try:
        import torch
        import transformers
    except ImportError as error:
        raise ModelLoadError(
            f"this model needs the transformers engine, which is not installed ({error.name} is missing); "
            f"run: {INSTALL_HINT}"
        ) from None
    return torch, transformers
