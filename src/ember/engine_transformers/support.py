"""Which requests the transformers engine answers, checked before a load (serve/resolve.py) and again in
its runner (the Python API). What it lacks is a 400 that names the option, never a silent difference.

transformers has temperature, top_k, top_p, min_p, typical_p, a repetition penalty (over the last
repeat_last_n tokens here), logit_bias (SequenceBias), a seed, num_predict and stop strings. It has no
mirostat and no presence or frequency penalty; ember's GBNF grammars, tool calls and logprobs belong to the
llama.cpp engine.
"""

from __future__ import annotations

from ember.errors import InvalidRequestError
from ember.options import SamplingOptions
from ember.types import ChatRequest, EmbedRequest, GenerateRequest

_DEFAULTS = SamplingOptions()
UNSUPPORTED_OPTIONS = ("mirostat", "mirostat_tau", "mirostat_eta", "presence_penalty", "frequency_penalty")


def check_request(request: GenerateRequest | ChatRequest | EmbedRequest, sampling: SamplingOptions) -> None:
    """Raise InvalidRequestError (400) naming the first thing the transformers engine cannot do."""
    engine = "the transformers engine"
    if isinstance(request, EmbedRequest):
        raise InvalidRequestError(f"{engine} does not make embeddings; use a GGUF embedding model")
    for name in UNSUPPORTED_OPTIONS:
        if getattr(sampling, name) != getattr(_DEFAULTS, name):
            raise InvalidRequestError(
                f"option {name} is not supported by {engine} (transformers has no {name.split('_')[0]} sampler); "
                "leave it unset, or use a GGUF model"
            )
    if request.grammar:
        raise InvalidRequestError(f"grammar (GBNF) is not supported by {engine}; use format (JSON schema) instead")
    if request.logprobs or request.top_logprobs:
        raise InvalidRequestError(f"logprobs are not supported by {engine} yet")
    if isinstance(request, ChatRequest):
        if request.tools:
            raise InvalidRequestError(f"tools are not supported by {engine} yet; use a GGUF model for tool calls")
        if request.continue_final:
            raise InvalidRequestError(f"continue_final is not supported by {engine}")
    elif request.suffix:
        raise InvalidRequestError(f"insert (suffix) is not supported by {engine}")
