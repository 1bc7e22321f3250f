"""How long engine steps take on this machine, learned as the engine runs: the scheduler's prefill budget
(how many prompt tokens a step may take beside generating streams) and whether a KV copy pays for itself come
from here. Plain numbers in, plain numbers out; no llama.cpp (the executor times the steps)."""

from __future__ import annotations

import math
import statistics
from collections import deque

ITL_FACTOR = 2.0  # a step with prefill may take this many times a decode-only step (the target)
# Until copies and prefill are timed here: copying one KV cell is taken to cost a hundredth of prefilling one
# token (measured with SmolLM2 on 2 CPU cores: about 1/700; larger models prefill slower still per KV byte).
PRIOR_COPY_RATIO = 0.01
# A prompt token beside generating rows is taken to cost at least this share of one in a prefill-only step (so
# that a run of steps timed faster than usual cannot make the budget unbounded).
MIN_MARGINAL_SHARE = 0.1


class StepCosts:
    """How long steps take here, learned from the steps the executor timed, over the last WINDOW observations of
    each kind, so that one odd step (the first after a load, a moment when the machine was busy) does not steer
    the budgets for long.

    A step costs about the decode-only time of its generating rows plus a marginal time per prefill token. That
    marginal time is what the budget needs, learned from steps that prefill beside generating rows: their time
    over the decode-only step's, per token prefilled, the median. Every such observation counts, also one below
    zero (a step faster than the median decode-only one): with a budget of a token or two the noise is as large as
    the signal, and dropping the low side would bias the estimate up, shrink the next chunks and feed on itself.
    (Beside streams a token can cost more than in a whole-batch prefill: a small model on a small CPU computes a
    few rows less efficiently than hundreds.) Until a step beside streams was timed, the prefill-only steps give
    the estimate: their fastest time per token (noise only adds time; the first steps after a load run cold; a
    short prompt's includes the step's fixed cost).
    """

    WINDOW = 9

    def __init__(self) -> None:
        self._decode: dict[int, deque[float]] = {}  # decode-only step seconds, by the number of generating rows
        self._alone: deque[float] = deque(maxlen=self.WINDOW)  # seconds per token of prefill-only steps
        self._beside: deque[float] = deque(maxlen=self.WINDOW)  # seconds over decode-only per token, beside rows
        self._copy: deque[float] = deque(maxlen=self.WINDOW)  # seconds to copy one KV cell (every layer)

    @property
    def prefill_token(self) -> float | None:
        """Marginal seconds of one more prompt token in a step (None until a prefill was timed)."""
        alone = min(self._alone) if self._alone else None
        if not self._beside:
            return alone
        estimate = max(statistics.median(self._beside), (alone or 0.0) * MIN_MARGINAL_SHARE)
        return estimate if estimate > 0 else None

    @property
    def copy_cell(self) -> float | None:
        return statistics.median(self._copy) if self._copy else None

    def observe_step(self, decode_rows: int, prefill_tokens: int, seconds: float) -> None:
        if prefill_tokens == 0:
            if decode_rows > 0:
                self._decode.setdefault(decode_rows, deque(maxlen=self.WINDOW)).append(seconds)
            return
        if decode_rows == 0:
            self._alone.append(seconds / prefill_tokens)
            return
        base = self.decode_step(decode_rows)
        if base is not None:
            self._beside.append((seconds - base) / prefill_tokens)

    def observe_copy(self, cells: int, seconds: float) -> None:
        if cells > 0:
            self._copy.append(seconds / cells)

    def decode_step(self, rows: int) -> float | None:
        """Seconds of a decode-only step with `rows` generating rows: measured, or between the counts measured
        nearest below and above it, or, past the largest, that count's time plus a prompt token's marginal time
        for each row more (a row is a row to the matrix products). While streams are joining, every step also
        prefills, so the count running now has often never run a decode-only step: taking the time of a smaller
        count as its own would keep the prefill budget small for no reason."""
        if not self._decode:
            return None
        if rows in self._decode:
            return statistics.median(self._decode[rows])
        below = [measured for measured in self._decode if measured < rows]
        above = [measured for measured in self._decode if measured > rows]
        if not below:
            return statistics.median(self._decode[min(above)])
        low = max(below)
        low_time = statistics.median(self._decode[low])
        if above:
            high = min(above)
            high_time = statistics.median(self._decode[high])
            return low_time + (high_time - low_time) * (rows - low) / (high - low)
        return low_time + (rows - low) * (self.prefill_token or 0.0)

    def prefill_budget(self, decode_rows: int) -> int | None:
        """Prompt tokens a step may add next to `decode_rows` generating rows and stay within ITL_FACTOR times a
        decode-only step: (ITL_FACTOR - 1) decode steps' worth of prefill time. None until both are measured."""
        step = self.decode_step(decode_rows)
        prefill_token = self.prefill_token
        if step is None or prefill_token is None:
            return None
        return max(1, int((ITL_FACTOR - 1.0) * step / prefill_token))

    def copy_worth(self, cells: int) -> int:
        """Prompt tokens a copy of `cells` KV cells must save to pay for itself."""
        copy_cell, prefill_token = self.copy_cell, self.prefill_token
        if copy_cell is None or not prefill_token:
            return math.ceil(cells * PRIOR_COPY_RATIO)
        return math.ceil(cells * copy_cell / prefill_token)
