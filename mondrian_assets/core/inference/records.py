"""What generation and evaluation exchange: examples, generations, and the repetition (loop) rules both apply."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# --- records -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalExample:
    """One validation example: the image, the exact user text, and the reference analysis text."""

    example_id: str
    image_path: Path
    prompt: str
    reference: str


@dataclass(frozen=True)
class Generation:
    """One model output with its cost. `finish_reason`: stop (EOS), length (max_tokens) or repetition (the
    loop guard cut it). In batched runs latency is the batch's wall time and the rates are the batch's."""

    text: str
    latency_s: float
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    finish_reason: str = "stop"
    batched: bool = False
    score_values_by_rule: int = 0  # score values the expected-value rule wrote (the rest of the text is greedy)


# --- repetition ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoopRule:
    """A loop is one unit of at most `max_period` items repeated back to back at least `min_repeats` times,
    covering at least `min_span` items."""

    max_period: int
    min_repeats: int
    min_span: int

    def span_needed(self, period: int) -> int:
        return max(period * self.min_repeats, self.min_span)


TOKEN_LOOP_RULE = LoopRule(max_period=64, min_repeats=4, min_span=32)  # the generation-time guard, in tokens
TEXT_LOOP_RULE = LoopRule(max_period=400, min_repeats=4, min_span=64)  # the metric, in characters


def ends_in_loop(seq: Sequence[Hashable], rule: LoopRule = TOKEN_LOOP_RULE) -> bool:
    """Whether the tail of `seq` is a loop. Cheap enough to call after every generated token: most periods are
    rejected by their first comparison."""
    n = len(seq)
    if n < rule.min_span:
        return False
    last = seq[-1]
    for period in range(1, min(rule.max_period, n // rule.min_repeats) + 1):
        if seq[n - 1 - period] != last:
            continue
        span = rule.span_needed(period)
        if span <= n and all(seq[i] == seq[i - period] for i in range(n - 2, n - span + period - 1, -1)):
            return True
    return False


def _longest_true_run(mask: np.ndarray) -> int:
    if not mask.any():
        return 0
    padded = np.concatenate(([False], mask, [False])).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return int((edges[1::2] - edges[0::2]).max())


def find_loop(text: str, rule: LoopRule = TEXT_LOOP_RULE) -> tuple[int, int] | None:
    """(period, span) of the longest looping stretch anywhere in `text`, or None."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    best: tuple[int, int] | None = None
    for period in range(1, min(rule.max_period, len(codes) // rule.min_repeats) + 1):
        span = _longest_true_run(codes[period:] == codes[:-period]) + period
        if span >= rule.span_needed(period) and (best is None or span > best[1]):
            best = (period, span)
    return best


def is_repetitive(generation: Generation, rule: LoopRule = TEXT_LOOP_RULE) -> bool:
    return generation.finish_reason == "repetition" or find_loop(generation.text, rule) is not None
