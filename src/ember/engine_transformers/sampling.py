"""One row's next token: ember's sampling options through transformers' logits processors, in llama.cpp's
order (penalties, logit bias, the JSON mask, then top_k, typical_p, top_p, min_p, temperature); temperature 0
is greedy (the most likely token, as llama.cpp's greedy sampler picks it).
"""

from __future__ import annotations

from typing import Any

from ember.options import SamplingOptions


def _processors(sampling: SamplingOptions) -> list[Any]:
    from transformers import (
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
        TypicalLogitsWarper,
    )

    chain: list[Any] = []
    if sampling.top_k > 0:
        chain.append(TopKLogitsWarper(sampling.top_k))
    if sampling.typical_p < 1.0:
        chain.append(TypicalLogitsWarper(sampling.typical_p))
    if sampling.top_p < 1.0:
        chain.append(TopPLogitsWarper(sampling.top_p))
    if sampling.min_p > 0.0:
        chain.append(MinPLogitsWarper(sampling.min_p))
    chain.append(TemperatureLogitsWarper(sampling.temperature))
    return chain


def sample_token(logits: Any, context: list[int], job: Any, torch: Any) -> int:
    """The next token of `job` from its row of logits (shape [1, vocab]); `context` is prompt + output."""
    sampling: SamplingOptions = job.sampling
    scores = logits
    if sampling.repeat_penalty != 1.0 and sampling.repeat_last_n != 0 and context:
        from transformers import RepetitionPenaltyLogitsProcessor

        recent = context if sampling.repeat_last_n < 0 else context[-sampling.repeat_last_n :]
        ids = torch.tensor([recent], dtype=torch.long, device=scores.device)
        scores = RepetitionPenaltyLogitsProcessor(sampling.repeat_penalty)(ids, scores)
    if sampling.logit_bias:
        scores = scores.clone()
        for token, bias in sampling.logit_bias.items():
            if token < scores.shape[-1]:
                scores[0, token] += bias
    if job.constraint is not None:
        scores = job.constraint.mask(scores)
    if sampling.temperature <= 0.0:
        return int(scores.argmax(dim=-1).item())
    ids = torch.tensor([context[-1:] or [0]], dtype=torch.long, device=scores.device)
    for processor in _processors(sampling):
        scores = processor(ids, scores)
    probabilities = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probabilities, 1, generator=job.generator).item())
