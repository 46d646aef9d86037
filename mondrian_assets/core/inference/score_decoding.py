"""Score fields decoded as the expected value of the model's belief instead of its single most likely token.

Where the answer has just written a score key (`"score":` or `"overall_score":`), what follows is the model's
belief about the score. Greedy decoding takes its mode: a model torn between 6, 6.5 and 7.5 answers whichever is a
hair ahead, and a small spread of errors becomes large ones. The probability-weighted mean (as G-Eval scores with
an LLM judge) is the estimate with the least squared error under that belief; the allowed value nearest to it is
written. Every other token stays greedy.

How the belief is read depends on the tokenizer (`score_rule`):
- "one token per score" (the embedded tokenizer): every whole score is a token of its own, so the next token's
  distribution over the score tokens is the belief.
- "look-ahead" (Qwen's tokenizer writes numbers digit by digit: `10` is `1`,`0`; `7.5` is `7`,`.`,`5`): each value
  the schema allows, in the training data's steps (whole and half points), gets the probability of its whole token
  sequence, ended (the next token continues no number), scored in one batched forward from the state after the
  key, on copies of the prefix's KV cache. The chosen value's tokens are then written one by one, and the number
  is closed after them.
Values a grammar mask upstream ruled out are never chosen. Evaluation, the registry's comparison and serving all
decode through `generate`, so they read scores the same way; where neither rule applies, decoding stays greedy
and says so (`decoding_label`).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from mondrian_assets.core import schema

ONE_TOKEN = "one token per score"
LOOK_AHEAD = "look-ahead"
SCORE_STEP = 0.5  # the steps the training data writes scores in: whole and half points

_AFTER_SCORE_KEY = re.compile(r'"(?:overall_)?score"\s*:\s*$')
_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]+)?")
_NUMBER_PIECE = re.compile(r"[0-9.]")  # a token whose text starts so would continue a number
_TAIL_TOKENS = 8  # enough to hold `"overall_score":` in any tokenizer's pieces

# (rows of token ids, (rows, length) -> log-probabilities (rows, length, vocabulary)): the look-ahead's forward
LookAhead = Callable[[np.ndarray], mx.array]


@dataclass(frozen=True)
class ScoreVocabulary:
    rule: str | None  # ONE_TOKEN, LOOK_AHEAD, or None (greedy)
    values: np.ndarray  # the candidate values
    ids: np.ndarray  # ONE_TOKEN: each value's token
    sequences: tuple[tuple[int, ...], ...]  # LOOK_AHEAD: each value's tokens
    continuing: np.ndarray  # LOOK_AHEAD: tokens that would continue a number


def _value_text(value: float) -> str:
    return f"{value:g}"


@functools.cache
def score_vocabulary(tokenizer: Any) -> ScoreVocabulary:
    """How this tokenizer's score values are read (cached per tokenizer)."""
    # digits stand for themselves in a vocabulary's keys: decoding only those keys keeps this quick on 151k tokens
    numeric = [(key, i) for key, i in tokenizer.get_vocab().items() if _NUMBER_PIECE.match(key)]
    pairs = sorted(
        (float(text), token_id)
        for token_id, text in ((i, tokenizer.decode([i])) for key, i in numeric if _NUMBER.fullmatch(key))
        if _NUMBER.fullmatch(text) and schema.SCORE_MIN <= float(text) <= schema.SCORE_MAX
    )
    whole = {v for v, _ in pairs if v.is_integer()}
    if {float(v) for v in range(int(schema.SCORE_MIN), int(schema.SCORE_MAX) + 1)} <= whole:
        ids = np.array([i for _, i in pairs], np.int64)
        return ScoreVocabulary(ONE_TOKEN, np.array([v for v, _ in pairs]), ids, (), np.zeros(0, np.int64))
    values = np.arange(schema.SCORE_MIN, schema.SCORE_MAX + SCORE_STEP / 2, SCORE_STEP)
    sequences = tuple(tuple(tokenizer.encode(_value_text(v), add_special_tokens=False)) for v in values)
    if any(tokenizer.decode(list(s)) != _value_text(v) for s, v in zip(sequences, values, strict=True)):
        return ScoreVocabulary(None, np.zeros(0), np.zeros(0, np.int64), (), np.zeros(0, np.int64))  # greedy
    continuing = np.array(sorted({i for key, i in numeric if _NUMBER_PIECE.match(tokenizer.decode([i]))}), np.int64)
    return ScoreVocabulary(LOOK_AHEAD, values, np.zeros(0, np.int64), sequences, continuing)


def score_rule(tokenizer: Any) -> str | None:
    return score_vocabulary(tokenizer).rule


def cache_look_ahead(language_model: Any, prompt_cache: list) -> LookAhead:
    """The look-ahead forward for a generation whose KV cache is `prompt_cache`: rows continue the current state
    on copies of the cache (the generation's own cache is untouched)."""

    def run(rows: np.ndarray) -> mx.array:
        forks = []
        for layer in prompt_cache:
            keys, values = layer.state
            fork = type(layer)()
            fork.state = (mx.repeat(keys, len(rows), axis=0), mx.repeat(values, len(rows), axis=0))
            forks.append(fork)
        logits = language_model(mx.array(rows), cache=forks).logits.astype(mx.float32)
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)

    return run


def only_token(token: int, logits: mx.array) -> mx.array:
    """Logits that allow `token` alone (what a processor returns to force it)."""
    only = mx.arange(logits.shape[-1]) == token
    return mx.where(only, mx.zeros_like(logits), mx.full(logits.shape, -math.inf, logits.dtype))


class ExpectedScore:
    """Per-sequence logits processor (mlx-vlm's `(history, logits) -> logits`). Like the loop guard, the first
    call (after prefill) sees only the prompt; from then on `history[-1]` is the token just generated.
    `look_ahead` is needed where the tokenizer writes numbers in pieces (else those fields stay greedy)."""

    def __init__(self, tokenizer: Any, look_ahead: LookAhead | None = None) -> None:
        self.tokenizer = tokenizer
        self.vocabulary = score_vocabulary(tokenizer)
        self.look_ahead = look_ahead
        self._ids = mx.array(self.vocabulary.ids)
        self.tokens: list[int] = []
        self.chosen = 0  # score values this processor wrote
        self._pending: list[int] = []  # the rest of a chosen value's tokens
        self._close_number = False  # the value is written: no digit or point may follow
        self._primed = False

    @property
    def active(self) -> bool:
        rule = self.vocabulary.rule
        return rule == ONE_TOKEN or (rule == LOOK_AHEAD and self.look_ahead is not None)

    def __call__(self, history: mx.array, logits: mx.array) -> mx.array:
        if not self._primed:
            self._primed = True
            return logits
        self.tokens.append(int(history[-1].item()))
        if self._pending:
            return only_token(self._pending.pop(0), logits)
        if self._close_number:
            self._close_number = False
            return logits.at[..., mx.array(self.vocabulary.continuing)].add(-math.inf)
        if not self.active or not self.at_score_value():
            return logits
        if self.vocabulary.rule == ONE_TOKEN:
            return self._one_token(logits)
        return self._looked_ahead(logits)

    def at_score_value(self) -> bool:
        """Whether the answer so far has just written a score key."""
        return bool(_AFTER_SCORE_KEY.search(self.tokenizer.decode(self.tokens[-_TAIL_TOKENS:])))

    def _one_token(self, logits: mx.array) -> mx.array:
        scores = np.array(logits.reshape(-1)[self._ids].astype(mx.float32))
        allowed = np.isfinite(scores)  # a grammar mask upstream may rule some values out
        if not allowed.any():
            return logits
        token = int(self.vocabulary.ids[allowed][self._nearest(scores[allowed], self.vocabulary.values[allowed])])
        self.chosen += 1
        return only_token(token, logits)

    def _looked_ahead(self, logits: mx.array) -> mx.array:
        vocab = self.vocabulary
        first = np.array((logits - mx.logsumexp(logits, axis=-1, keepdims=True)).reshape(-1).astype(mx.float32))
        allowed = np.array([np.isfinite(first[s[0]]) for s in vocab.sequences])
        if not allowed.any():
            return logits
        # one row per sequence that is no other's prefix ("7" is read off the row of "7.5"), padded at the end
        longest = [s for s in vocab.sequences if not any(o != s and o[: len(s)] == s for o in vocab.sequences)]
        width = max(len(s) for s in longest)
        rows = np.array([list(s) + [s[-1]] * (width - len(s)) for s in longest], np.int32)
        steps = np.array(self.look_ahead(rows))  # after row[:k+1], for every k
        ended = np.log1p(-np.minimum(np.exp(steps[:, :, vocab.continuing]).sum(-1), 1 - 1e-7))
        log_belief = np.full(len(vocab.values), -np.inf)
        for index, sequence in enumerate(vocab.sequences):
            if not allowed[index]:
                continue
            row = next(r for r, s in enumerate(longest) if s[: len(sequence)] == sequence)
            inner = sum(steps[row, k - 1, sequence[k]] for k in range(1, len(sequence)))
            log_belief[index] = first[sequence[0]] + inner + ended[row, len(sequence) - 1]
        choice = self._nearest(log_belief[allowed], vocab.values[allowed])
        tokens = list([s for s, ok in zip(vocab.sequences, allowed, strict=True) if ok][choice])
        self.chosen += 1
        self._pending, self._close_number = tokens[1:], True
        return only_token(tokens[0], logits)

    @staticmethod
    def _nearest(log_belief: np.ndarray, values: np.ndarray) -> int:
        """Index of the value nearest the belief's expectation."""
        belief = np.exp(log_belief - log_belief.max())
        expected = float((belief * values).sum() / belief.sum())
        return int(np.argmin(np.abs(values - expected)))
