"""What the fine-tuned model costs over the base at inference, measured so that machine drift cancels out.

Both models run the same prompts, interleaved (each prompt on one model then at once on the other, alternating
which goes first) and repeated; every run decodes exactly the same number of tokens (end-of-sequence is masked),
so a model that writes longer answers is not counted as slower. The overhead is the median of the paired time
ratios; the noise is the median change of one model against itself between repeats, measured in the same run.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mondrian_assets.core.inference.records import EvalExample

if TYPE_CHECKING:  # the measurement record stays importable without MLX (metrics and gates are pure)
    from mondrian_assets.core.inference.loading import LoadedModel


@dataclass(frozen=True)
class OverheadMeasurement:
    """Wall seconds per run, `[repeat][prompt]`, each run a prefill plus `tokens` decoded tokens."""

    base_s: tuple[tuple[float, ...], ...]
    tuned_s: tuple[tuple[float, ...], ...]
    tokens: int

    @property
    def pairs(self) -> int:
        return sum(len(row) for row in self.base_s)

    @property
    def overhead(self) -> float:
        """Median over interleaved pairs of fine-tuned time / base time, minus 1."""
        ratios = [math.log(t / b) for bs, ts in zip(self.base_s, self.tuned_s) for b, t in zip(bs, ts)]
        return math.exp(statistics.median(ratios)) - 1.0

    @property
    def noise(self) -> float:
        """Median change of a model against itself from one repeat to the next, on the same prompt."""
        changes = [
            abs(math.log(later / earlier))
            for runs in (self.base_s, self.tuned_s)
            for previous, current in zip(runs, runs[1:])
            for earlier, later in zip(previous, current)
        ]
        return math.exp(statistics.median(changes)) - 1.0 if changes else 0.0

    def as_dict(self) -> dict:
        return {
            "overhead": self.overhead,
            "noise": self.noise,
            "pairs": self.pairs,
            "repeats": len(self.base_s),
            "tokens_per_run": self.tokens,
            "base_median_s": statistics.median(t for row in self.base_s for t in row),
            "fine_tuned_median_s": statistics.median(t for row in self.tuned_s for t in row),
        }


def timed_run(
    loaded: LoadedModel, example: EvalExample, tokens: int, processors: Sequence[Callable[[Any, Any], Any]] = ()
) -> float:
    """Seconds for one prefill plus exactly `tokens` decoded tokens (end-of-sequence masked); `processors` (e.g.
    a grammar mask) run after that mask."""
    import mlx.core as mx
    from mlx_vlm import stream_generate

    from mondrian_assets.core.inference.generate import eos_ids, formatted_prompt

    stops = mx.array(eos_ids(loaded))

    def never_stop(history: mx.array, logits: mx.array) -> mx.array:
        banned = (mx.arange(logits.shape[-1])[:, None] == stops[None, :]).any(axis=1)
        return mx.where(banned, -math.inf, logits)

    tic = time.perf_counter()
    stream = stream_generate(
        loaded.model, loaded.processor, formatted_prompt(loaded, example.prompt), image=[str(example.image_path)],
        max_tokens=tokens, temperature=0.0, logits_processors=[never_stop, *processors],
    )  # fmt: skip
    decoded = sum(1 for response in stream if response.token is not None)
    seconds = time.perf_counter() - tic
    if decoded < tokens:
        raise RuntimeError(f"a timed run decoded {decoded} tokens instead of {tokens}: the timings would not compare")
    return seconds


def interleaved_timings(
    first: Callable[[EvalExample], float], second: Callable[[EvalExample], float],
    examples: Sequence[EvalExample], *, repeats: int, tokens: int,
) -> OverheadMeasurement:  # fmt: skip
    """Time `first` and `second` (each a timed run of one prompt) on `examples`, `repeats` times, interleaved and
    alternating which goes first; `second`'s cost relative to `first` is the measurement's overhead."""
    if repeats < 2 or not examples:
        raise ValueError("a paired timing needs at least one prompt and two repeats (to measure the noise)")
    first_s, second_s = [], []
    for repeat in range(repeats):
        row_first, row_second = [], []
        for example in examples:
            if repeat % 2 == 0:
                row_first.append(first(example))
                row_second.append(second(example))
            else:
                row_second.append(second(example))
                row_first.append(first(example))
        first_s.append(tuple(row_first))
        second_s.append(tuple(row_second))
    return OverheadMeasurement(tuple(first_s), tuple(second_s), tokens)


def measure_overhead(
    base: LoadedModel, tuned: LoadedModel, examples: Sequence[EvalExample], *, repeats: int, tokens: int
) -> OverheadMeasurement:
    """Time both models on `examples`' prompts, `repeats` times, interleaved; one untimed warm-up run each."""
    if not examples:
        raise ValueError("measuring the overhead needs at least one prompt")
    for loaded in (base, tuned):
        timed_run(loaded, examples[0], min(tokens, 4))
    return interleaved_timings(lambda e: timed_run(base, e, tokens), lambda e: timed_run(tuned, e, tokens),
                               examples, repeats=repeats, tokens=tokens)  # fmt: skip
