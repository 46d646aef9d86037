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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

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


def _timed_run(loaded: LoadedModel, example: EvalExample, tokens: int) -> float:
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
        max_tokens=tokens, temperature=0.0, logits_processors=[never_stop],
    )  # fmt: skip
    decoded = sum(1 for response in stream if response.token is not None)
    seconds = time.perf_counter() - tic
    if decoded < tokens:
        raise RuntimeError(f"a timed run decoded {decoded} tokens instead of {tokens}: the timings would not compare")
    return seconds


def measure_overhead(
    base: LoadedModel, tuned: LoadedModel, examples: Sequence[EvalExample], *, repeats: int, tokens: int
) -> OverheadMeasurement:
    """Time both models on `examples`' prompts, `repeats` times, interleaved; one untimed warm-up run each."""
    if repeats < 2 or not examples:
        raise ValueError("measuring the overhead needs at least one prompt and two repeats (to measure the noise)")
    for loaded in (base, tuned):
        _timed_run(loaded, examples[0], min(tokens, 4))
    base_s, tuned_s = [], []
    for repeat in range(repeats):
        row_base, row_tuned = [], []
        for example in examples:
            if repeat % 2 == 0:
                row_base.append(_timed_run(base, example, tokens))
                row_tuned.append(_timed_run(tuned, example, tokens))
            else:
                row_tuned.append(_timed_run(tuned, example, tokens))
                row_base.append(_timed_run(base, example, tokens))
        base_s.append(tuple(row_base))
        tuned_s.append(tuple(row_tuned))
    return OverheadMeasurement(tuple(base_s), tuple(tuned_s), tokens)
