"""Embedding requests on a loaded model, and the vector arithmetic the API routes apply to their results.

The runner embeds each input in its own decode (see `ember.engine.readout.Embedder`); an `EmbedJob` does one
input per `step()`, so a runner can keep its generation streams going between the inputs of a long batch.
Vectors leave the runner as the model pooled them; Ollama's /api/embed and OpenAI's /v1/embeddings normalize
them (L2), Ollama's legacy /api/embeddings does not.
"""

from __future__ import annotations

import base64
import math
import sys
import time
from array import array
from typing import TYPE_CHECKING

from ember.engine.readout import Embedder
from ember.errors import InvalidRequestError
from ember.types import EmbedRequest, EmbedResponse

if TYPE_CHECKING:
    from ember.loaded_model import LoadedModel

__all__ = ["EmbedJob", "Embedder", "finish_vector", "float32_base64"]


class EmbedJob:
    """One embedding request: every input tokenized and checked at creation, then embedded one per step."""

    def __init__(self, model: LoadedModel, request: EmbedRequest) -> None:
        self.started_ns = time.perf_counter_ns()
        self.model = model
        self.name = request.model or model.name
        limit = model.options.num_ctx
        self.inputs: list[list[int]] = []
        for index, item in enumerate(request.inputs()):
            if not item:
                raise InvalidRequestError(f"input {index} is empty; give a non-empty text to embed")
            if isinstance(item, str):
                tokens = model.prompts.tokenize_prompt(item)
            else:  # token ids of the model's own vocabulary
                for token in item:
                    model.model.validate_token(token)
                tokens = list(item)
            if len(tokens) > limit:
                if not request.truncate:
                    raise InvalidRequestError(
                        f"input {index} is {len(tokens)} tokens but the context window (num_ctx) is {limit} tokens; "
                        "shorten it, load the model with a larger num_ctx, or set truncate to true"
                    )
                tokens = tokens[:limit]
            self.inputs.append(tokens)
        self.vectors: list[list[float]] = []

    @property
    def done(self) -> bool:
        return len(self.vectors) == len(self.inputs)

    def step(self) -> None:
        """Embed the next input."""
        if not self.done:
            self.vectors.append(self.model.embed_tokens(self.inputs[len(self.vectors)]))

    def result(self) -> EmbedResponse:
        return EmbedResponse(
            model=self.name,
            embeddings=self.vectors,
            prompt_eval_count=sum(len(tokens) for tokens in self.inputs),
            **self.model._metrics(self.started_ns),
        )


def finish_vector(vector: list[float], *, normalize: bool, dimensions: int | None = None) -> list[float]:
    """The vector as the API returns it: cut to `dimensions`, L2-normalized when asked (as Ollama does), and
    rounded to float32, so the JSON floats and OpenAI's base64 encoding carry exactly the same values."""
    if dimensions is not None:
        if dimensions > len(vector):
            raise InvalidRequestError(f"dimensions is {dimensions} but this model's embeddings have {len(vector)}")
        vector = vector[:dimensions]
    if normalize:
        norm = math.sqrt(math.fsum(value * value for value in vector))
        if norm > 0:
            vector = [value / norm for value in vector]
    return array("f", vector).tolist()


def float32_base64(vector: list[float]) -> str:
    """OpenAI's encoding_format "base64": the little-endian float32 bytes of the vector, base64-encoded."""
    values = array("f", vector)
    if sys.byteorder != "little":
        values.byteswap()
    return base64.b64encode(values.tobytes()).decode("ascii")
