"""One sequence's state inside the engine, and the updates the engine reports about it.

Plain data: the scheduler plans with these objects and its tests build them without llama.cpp (the
sequence's sampler chain lives in the executor, keyed by the sequence's id).
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

from ember.engine.text import StopMatcher, Utf8Decoder
from ember.options import SamplingOptions


class DoneReason(enum.StrEnum):
    STOP = "stop"  # end-of-generation token or a stop string
    LENGTH = "length"  # num_predict reached, or the context window is full
    CANCELLED = "cancelled"  # the caller cancelled or went away
    ERROR = "error"  # llama.cpp failed; `Sequence.error` says why


class CacheSource(enum.StrEnum):
    SLOT = "slot"  # the KV left in the sequence's own slot by an earlier sequence
    COPY = "copy"  # copied from another slot holding the same prefix (a shared system prompt)
    HOST = "host"  # restored from the host-RAM tier
    DISK = "disk"  # restored from the disk tier (KV a model kept when it last closed)
    PARENT = "parent"  # the prompt of the sequence this one forks from (n > 1)


class Phase(enum.Enum):
    WAITING = "waiting"  # submitted, no KV slot yet
    FORKED = "forked"  # has a slot; waits for its parent's prompt to be prefilled, then copies its KV (n > 1)
    PREFILL = "prefill"  # prompt tokens still to decode
    DECODE = "decode"  # generating, one token per step
    DONE = "done"


@dataclass(frozen=True)
class SequenceRequest:
    """What the engine needs to run one sequence: tokens in, options, limits."""

    prompt_tokens: list[int]
    sampling: SamplingOptions
    max_new_tokens: int
    grammar: str | None = None
    logprobs: int | None = None  # None: no logprobs; N: the sampled token's logprob and the N most likely
    priority: int = 1  # the request's queue priority (0 high, 1 normal, 2 low): lower prompts prefill first


@dataclass(frozen=True, slots=True)
class SampledLogprob:
    """A sampled token's log-probability and the `top` most likely tokens at its position (token, logprob).

    From the raw logits (log-softmax over the whole vocabulary), before logit_bias, penalties, temperature or
    any truncation: what the model itself predicts, as OpenAI reports it.
    """

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True, slots=True)
class SequenceUpdate:
    """What one step did for one sequence: new text (possibly empty), and whether it is finished.

    `logprob` is set when the request asked for logprobs and this update sampled a token that is part of the
    answer (never for an end-of-generation token).
    """

    sequence: Sequence
    text: str
    token: int | None
    done: bool
    logprob: SampledLogprob | None = None


_ids = itertools.count(1)


@dataclass(eq=False)
class Sequence:
    """A sequence in the engine. Created by `Engine.submit`; read its fields, never set them."""

    request: SequenceRequest
    id: int = field(default_factory=lambda: next(_ids))
    phase: Phase = Phase.WAITING
    slot: int = -1
    n_past: int = 0  # tokens already in the KV cache
    next_token: int = -1  # sampled, not yet decoded
    output_tokens: list[int] = field(default_factory=list)
    done_reason: DoneReason | None = None
    error: str | None = None
    cancel_requested: bool = False
    cached_tokens: int = 0  # prompt tokens whose KV was reused from an earlier sequence (or a parent)
    parent: Sequence | None = None  # the sequence whose prompt KV this one copies (n > 1 completions)
    forks: list[Sequence] = field(default_factory=list)
    decoder: Utf8Decoder = field(default_factory=Utf8Decoder)
    stopper: StopMatcher = field(init=False)
    submitted_ns: int = field(default_factory=time.perf_counter_ns)
    cache_source: CacheSource | None = None  # where cached_tokens came from
    started_ns: int = 0  # admitted to a slot, prefill begins
    prefilled_ns: int = 0  # prompt fully decoded, first logits ready
    finished_ns: int = 0

    def __post_init__(self) -> None:
        self.stopper = StopMatcher(self.request.sampling.stop)

    @property
    def done(self) -> bool:
        return self.phase is Phase.DONE

    @property
    def prompt_tokens(self) -> list[int]:
        return self.request.prompt_tokens

    @property
    def prompt_eval_duration_ns(self) -> int:
        return max(0, self.prefilled_ns - self.started_ns) if self.prefilled_ns else 0

    @property
    def eval_duration_ns(self) -> int:
        return max(0, self.finished_ns - self.prefilled_ns) if self.prefilled_ns and self.finished_ns else 0

    @property
    def eval_count(self) -> int:
        return len(self.output_tokens)

    @property
    def prompt_eval_count(self) -> int:
        """Prompt tokens actually evaluated: the prompt less what came from the cache (Ollama reports this)."""
        return len(self.prompt_tokens) - self.cached_tokens

    def kv_tokens(self) -> list[int]:
        """The tokens whose KV is in this sequence's slot: the prompt and every generated token decoded so far."""
        return (self.prompt_tokens + self.output_tokens)[: self.n_past]
