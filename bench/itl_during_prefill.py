"""Inter-token latency of running streams while a long prompt is prefilled beside them (ember's engine alone).

N streams decode; the step times are measured decode-only, then while a ~1,500-token prompt prefills next to
them. The engine bounds the prefill tokens per step (scheduler.ITL_FACTOR, from the step times it measured),
so the steps with prefill should stay within ITL_FACTOR times a decode-only step. Also printed: how long the
long prompt took to prefill next to the streams, against alone.

    .venv/bin/python bench/itl_during_prefill.py [--streams 1,7] [--deterministic]
"""

from __future__ import annotations

import argparse
import statistics
import time

import ember
from ember.engine.engine import Engine
from ember.engine.sequence import Phase, SequenceRequest
from ember.engine.step_costs import ITL_FACTOR
from ember.options import sampling_options

LONG = " ".join(f"Note {i}: the river flows past the old mill and the bridge." for i in range(120))


def steps_until(engine: Engine, condition: object, limit: int = 10_000) -> list[float]:
    durations = []
    for _ in range(limit):
        if condition():  # type: ignore[operator]
            break
        started = time.perf_counter()
        engine.step()
        durations.append(time.perf_counter() - started)
    return durations


def measure(model: ember.Model, streams: int) -> dict[str, float]:
    engine = model.loaded.engine
    engine.forget_cache()
    sampling = sampling_options({"temperature": 0, "repeat_penalty": 1.0})
    long_tokens = model.tokenize(LONG)[:1500]

    alone = engine.submit(SequenceRequest(long_tokens, sampling, 1))
    prefill_alone = steps_until(engine, lambda: alone.done)
    engine.forget_cache()

    running = [
        engine.submit(SequenceRequest(model.tokenize(f"Story {i}: once upon a time"), sampling, 100_000))
        for i in range(streams)
    ]
    steps_until(engine, lambda: all(s.phase is Phase.DECODE for s in running))
    decode_only = steps_until(engine, lambda: False, limit=40)
    late = engine.submit(SequenceRequest(long_tokens, sampling, 1))
    with_prefill = steps_until(engine, lambda: late.done)
    for sequence in running:
        engine.cancel(sequence)
    engine.step()
    step = statistics.median(decode_only)
    return {
        "decode_step_s": step,
        "prefill_step_p50_s": statistics.median(with_prefill),
        "prefill_step_max_s": max(with_prefill),
        "ratio_p50": statistics.median(with_prefill) / step,
        "ratio_p90": sorted(with_prefill)[int(0.9 * (len(with_prefill) - 1))] / step,
        "prefill_alone_s": sum(prefill_alone),
        "prefill_beside_streams_s": sum(with_prefill),
        "steps": len(with_prefill),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", default="1,7")
    parser.add_argument("--deterministic", action="store_true")
    args = parser.parse_args()
    counts = [int(part) for part in args.streams.split(",")]
    with ember.Model("smollm2", num_ctx=2048, num_parallel=max(counts) + 1, deterministic=args.deterministic) as model:
        print(f"target: steps with prefill within {ITL_FACTOR:g}x a decode-only step")
        for count in counts:
            result = measure(model, count)
            print(
                f"{count} streams: decode step {result['decode_step_s'] * 1000:.1f} ms; with prefill p50 "
                f"{result['ratio_p50']:.2f}x, p90 {result['ratio_p90']:.2f}x, max "
                f"{result['prefill_step_max_s'] * 1000:.1f} ms; 1500-token prefill {result['prefill_alone_s']:.2f} s "
                f"alone, {result['prefill_beside_streams_s']:.2f} s beside the streams ({result['steps']} steps)"
            )


if __name__ == "__main__":
    main()
