"""Reading llama.cpp's output vectors: pooled embeddings, and the log-probabilities of sampled tokens.

Kept apart from `llamacpp.py` for size; with it and `quantize.py`, the only modules that import llama_cpp.
"""

from __future__ import annotations

import llama_cpp as lib
import numpy as np

from ember.engine.llamacpp import LlamaContext, LlamaModel, TokenBatch
from ember.engine.sequence import SampledLogprob
from ember.errors import EngineError
from ember.options import LoadOptions

# Pooling types an embedding model may declare in its GGUF (`<arch>.pooling_type`); anything else (none, or
# rank for rerankers) falls back to the mean over the input's tokens.
_DECLARED_POOLING = {
    lib.LLAMA_POOLING_TYPE_MEAN: lib.LLAMA_POOLING_TYPE_MEAN,
    lib.LLAMA_POOLING_TYPE_CLS: lib.LLAMA_POOLING_TYPE_CLS,
    lib.LLAMA_POOLING_TYPE_LAST: lib.LLAMA_POOLING_TYPE_LAST,
}


class Embedder:
    """A second llama.cpp context of a loaded model, for embeddings only (generation contexts are untouched).

    Each input is decoded alone, from an empty cache, in one ubatch: its vector depends on its own tokens
    only, so the same text always gives the same vector, in a batch or not. Pooling is the mean over the
    input's tokens, unless the model declares its own (an embedding model's CLS or last token).
    """

    def __init__(self, model: LlamaModel, options: LoadOptions) -> None:
        self.model = model
        self.num_ctx = options.num_ctx
        declared = model.metadata(f"{model.metadata('general.architecture')}.pooling_type")
        pooling = _DECLARED_POOLING.get(int(declared) if declared and declared.isdigit() else -1)
        self.context = LlamaContext(model, options, pooling=pooling or lib.LLAMA_POOLING_TYPE_MEAN)
        self.batch = TokenBatch(options.num_ctx)
        n_embd_out = getattr(lib, "llama_model_n_embd_out", None)
        self.dimensions = int(n_embd_out(model.handle)) if n_embd_out else model.n_embd

    def embed(self, tokens: list[int]) -> list[float]:
        """The pooled embedding of one input (not normalized); at most num_ctx tokens."""
        if not tokens:
            raise EngineError("cannot embed an empty input")
        if len(tokens) > self.num_ctx:
            raise EngineError(f"the input is {len(tokens)} tokens but the embedding context holds {self.num_ctx}")
        self.context.clear()
        self.batch.clear()
        for position, token in enumerate(tokens):
            self.batch.add(token, position, 0, True)
        self.context.decode(self.batch)
        pointer = lib.llama_get_embeddings_seq(self.context.handle, 0)
        if not pointer:
            raise EngineError("llama.cpp returned no pooled embedding for this model")
        return np.ctypeslib.as_array(pointer, shape=(self.dimensions,)).tolist()

    def close(self) -> None:
        self.batch.close()
        self.context.close()


def sampled_logprob(context: LlamaContext, batch_index: int, token: int, top: int) -> SampledLogprob:
    """The log-probability of `token` and the `top` most likely tokens, from the raw logits at `batch_index`
    of the last decode: a log-softmax over the whole vocabulary, before any sampler changed them."""
    n_vocab = context.model.n_vocab
    pointer = lib.llama_get_logits_ith(context.handle, batch_index)
    if not pointer:
        raise EngineError(f"llama.cpp has no logits at batch index {batch_index}")
    logits = np.ctypeslib.as_array(pointer, shape=(n_vocab,)).astype(np.float64)
    peak = logits.max()
    logits -= peak + np.log(np.exp(logits - peak).sum())
    best: tuple[tuple[int, float], ...] = ()
    top = min(top, n_vocab)
    if top > 0:
        candidates = np.argpartition(-logits, top - 1)[:top]
        ranked = candidates[np.lexsort((candidates, -logits[candidates]))]  # ties: the lower token id first
        best = tuple((int(index), float(logits[index])) for index in ranked)
    return SampledLogprob(token, float(logits[token]), best)
