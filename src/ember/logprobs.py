"""Log-probabilities of generated tokens, from the engine's token ids to the entries the APIs return.

The engine computes them from the raw logits at each sampled position (a log-softmax over the whole
vocabulary, before logit_bias, penalties, temperature or truncation) and only for requests that ask: see
`ember.engine.readout.sampled_logprob`. Each entry is the token's text (its piece, decoded as UTF-8, a part of
a character replaced), its logprob, its bytes, and the most likely tokens at its position.
"""

from __future__ import annotations

from typing import Any

from ember.engine.llamacpp import LlamaModel
from ember.engine.sequence import SequenceUpdate
from ember.types import ChatRequest, GenerateRequest, TokenLogprob, TopLogprob


def requested_logprobs(request: GenerateRequest | ChatRequest) -> int | None:
    """What the engine is asked for: None (no logprobs), or how many top alternatives per token."""
    return request.top_logprobs if request.logprobs else None


def logprob_entries(model: LlamaModel, update: SequenceUpdate) -> list[TokenLogprob] | None:
    """The update's token as a list of one entry, or None when no logprob came with it."""
    logprob = update.logprob
    if logprob is None:
        return None
    top = [TopLogprob(**_view(model, token, value)) for token, value in logprob.top]
    return [TokenLogprob(**_view(model, logprob.token, logprob.logprob), top_logprobs=top)]


def _view(model: LlamaModel, token: int, logprob: float) -> dict[str, Any]:
    piece = model.piece(token)
    return {"token": piece.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(piece)}


def completion_logprobs(entries: list[dict[str, Any]], offset: int) -> dict[str, Any]:
    """OpenAI's legacy completions shape for some entries whose text starts at character `offset`:
    {tokens, token_logprobs, top_logprobs (text -> logprob, the sampled token included), text_offset}."""
    tokens, values, tops, offsets = [], [], [], []
    for entry in entries:
        tokens.append(entry["token"])
        values.append(entry["logprob"])
        top = {alternative["token"]: alternative["logprob"] for alternative in entry.get("top_logprobs") or ()}
        top.setdefault(entry["token"], entry["logprob"])
        tops.append(top)
        offsets.append(offset)
        offset += len(entry["token"])
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}
