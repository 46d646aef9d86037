"""Score fields decoded as the expected value of the model's belief instead of its single most likely token.

Where the answer has just written a score key (`"score":` or `"overall_score":`), the next token's distribution is
the model's belief about the score. Greedy decoding takes its mode: a model torn between 6, 6.5 and 7.5 answers
whichever is a hair ahead, and a small spread of errors becomes large ones. The probability-weighted mean (as
G-Eval scores with an LLM judge) is the estimate with the least squared error under that belief; the score token
nearest to it is written. Every other token stays greedy.

Evaluation, the registry's comparison and serving all decode through `generate`, so they read scores the same way.
It needs every whole score from SCORE_MIN to SCORE_MAX to be a token of its own, so that a score's first token says
which score it starts. Qwen's tokenizer writes numbers digit by digit (`10` is `1`, `0`): there a belief split
between 9 and 10 would read as the mean of 9 and 1, so such tokenizers are left greedy.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any

import mlx.core as mx
import numpy as np

from mondrian_assets.core import schema

_AFTER_SCORE_KEY = re.compile(r'"(?:overall_)?score"\s*:\s*$')
_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]+)?")
_TAIL_TOKENS = 8  # enough to hold `"overall_score":` in any tokenizer's pieces


@functools.cache
def _score_tokens(tokenizer: Any) -> tuple[np.ndarray, np.ndarray]:
    """The token ids whose text is a score value within the schema's range, and those values (none when a whole score
    is not a token of its own)."""
    # digits stand for themselves in a vocabulary's keys: decoding only those keeps this quick on a 151k vocabulary
    candidates = [i for key, i in tokenizer.get_vocab().items() if _NUMBER.fullmatch(key)]
    pairs = sorted(
        (float(text), token_id)
        for token_id, text in ((i, tokenizer.decode([i])) for i in candidates)
        if _NUMBER.fullmatch(text) and schema.SCORE_MIN <= float(text) <= schema.SCORE_MAX
    )
    whole = {v for v, _ in pairs if v.is_integer()}
    if not {float(v) for v in range(int(schema.SCORE_MIN), int(schema.SCORE_MAX) + 1)} <= whole:
        pairs = []  # a first token would not say which score it starts: stay greedy
    return np.array([i for _, i in pairs], np.int64), np.array([v for v, _ in pairs], np.float64)


class ExpectedScore:
    """Per-sequence logits processor (mlx-vlm's `(history, logits) -> logits`). Like the loop guard, the first
    call (after prefill) sees only the prompt; from then on `history[-1]` is the token just generated."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids, self.values = _score_tokens(tokenizer)
        self._ids = mx.array(self.ids)
        self.tokens: list[int] = []
        self.chosen = 0  # score tokens this processor chose
        self._primed = False

    def __call__(self, history: mx.array, logits: mx.array) -> mx.array:
        if not self._primed:
            self._primed = True
            return logits
        self.tokens.append(int(history[-1].item()))
        if not self.ids.size or not _AFTER_SCORE_KEY.search(self.tokenizer.decode(self.tokens[-_TAIL_TOKENS:])):
            return logits
        scores = np.array(logits.reshape(-1)[self._ids].astype(mx.float32))
        allowed = np.isfinite(scores)  # a grammar mask upstream may rule some values out
        if not allowed.any():
            return logits
        belief = np.exp(scores[allowed] - scores[allowed].max())
        expected = float((belief * self.values[allowed]).sum() / belief.sum())
        token = int(self.ids[allowed][np.argmin(np.abs(self.values[allowed] - expected))])
        self.chosen += 1
        only = mx.arange(logits.shape[-1]) == token
        return mx.where(only, mx.zeros_like(logits), mx.full(logits.shape, -math.inf, logits.dtype))
