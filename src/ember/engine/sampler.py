"""A sequence's sampler chain in llama.cpp (kept apart from `llamacpp.py` for size; it imports llama_cpp)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import llama_cpp as lib

from ember.engine.llamacpp import LlamaContext, LlamaModel
from ember.errors import InvalidRequestError
from ember.options import SamplingOptions


class Sampler:
    """One sequence's sampler chain, built from its SamplingOptions (and grammar, when one is given).

    Order as in llama.cpp's common sampler: logit_bias, grammar, penalties, then greedy, or mirostat, or
    top_k -> typical_p -> top_p -> min_p -> temperature -> random draw.
    """

    def __init__(self, model: LlamaModel, options: SamplingOptions, *, num_ctx: int, grammar: str | None) -> None:
        self._chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        self._penalties_index: int | None = None
        self.penalty_window = num_ctx if options.repeat_last_n < 0 else options.repeat_last_n
        seed = lib.LLAMA_DEFAULT_SEED if options.seed < 0 else options.seed
        if options.logit_bias:
            self._add(_init_logit_bias(model.n_vocab, options.logit_bias))
        if grammar is not None:
            grammar_sampler = lib.llama_sampler_init_grammar(model._vocab, grammar.encode(), b"root")
            if not grammar_sampler:
                self.close()
                raise InvalidRequestError("the grammar could not be parsed; check its GBNF syntax")
            self._add(grammar_sampler)
        penalized = options.repeat_penalty != 1.0 or options.frequency_penalty or options.presence_penalty
        if penalized and self.penalty_window > 0:
            self._penalties_index = self._add(
                _init_penalties(
                    model.n_vocab,
                    self.penalty_window,
                    options.repeat_penalty,
                    options.frequency_penalty,
                    options.presence_penalty,
                )
            )
        if options.temperature <= 0:
            self._add(lib.llama_sampler_init_greedy())
        elif options.mirostat == 1:
            self._add(lib.llama_sampler_init_temp(options.temperature))
            self._add(
                lib.llama_sampler_init_mirostat(model.n_vocab, seed, options.mirostat_tau, options.mirostat_eta, 100)
            )
        elif options.mirostat == 2:
            self._add(lib.llama_sampler_init_temp(options.temperature))
            self._add(lib.llama_sampler_init_mirostat_v2(seed, options.mirostat_tau, options.mirostat_eta))
        else:
            if options.top_k > 0:
                self._add(lib.llama_sampler_init_top_k(options.top_k))
            if options.typical_p < 1.0:
                self._add(lib.llama_sampler_init_typical(options.typical_p, 1))
            if options.top_p < 1.0:
                self._add(lib.llama_sampler_init_top_p(options.top_p, 1))
            if options.min_p > 0.0:
                self._add(lib.llama_sampler_init_min_p(options.min_p, 1))
            self._add(lib.llama_sampler_init_temp(options.temperature))
            self._add(lib.llama_sampler_init_dist(seed))

    def _add(self, sampler: lib.llama_sampler_p) -> int:
        lib.llama_sampler_chain_add(self._chain, sampler)
        return lib.llama_sampler_chain_n(self._chain) - 1

    def remember(self, tokens: list[int]) -> None:
        """Show prompt tokens to the repetition penalties only (the grammar must not see them)."""
        if self._penalties_index is None or not tokens:
            return
        penalties = lib.llama_sampler_chain_get(self._chain, self._penalties_index)
        for token in tokens[-self.penalty_window :]:
            lib.llama_sampler_accept(penalties, token)

    def sample(self, context: LlamaContext, batch_index: int) -> int:
        """Pick the next token from the logits at `batch_index` of the last decode, and accept it."""
        return int(lib.llama_sampler_sample(self._chain, context.handle, batch_index))

    def close(self) -> None:
        if self._chain:
            lib.llama_sampler_free(self._chain)
            self._chain = None

    def __del__(self) -> None:
        self.close()


def _init_penalties(n_vocab: int, last_n: int, repeat: float, frequency: float, presence: float) -> object:
    # llama.cpp added n_vocab as the first parameter in late 2025; older builds take four.
    if len(lib.llama_sampler_init_penalties.argtypes) == 5:
        return lib.llama_sampler_init_penalties(n_vocab, last_n, repeat, frequency, presence)
    return lib.llama_sampler_init_penalties(last_n, repeat, frequency, presence)


def _init_logit_bias(n_vocab: int, biases: Mapping[int, float]) -> object:
    # -100 is OpenAI's "ban": -inf makes it exact whatever the logit; llama.cpp copies the array.
    entries = (lib.llama_logit_bias * len(biases))()
    for entry, (token, bias) in zip(entries, sorted(biases.items()), strict=True):
        entry.token = token
        entry.bias = -math.inf if bias <= -100 else bias
    return lib.llama_sampler_init_logit_bias(n_vocab, len(biases), entries)
