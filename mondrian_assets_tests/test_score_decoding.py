"""Score values decoded as the expected value of the model's belief, on the embedded model's real tokenizer."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from mondrian_assets.core.inference.score_decoding import ExpectedScore
from mondrian_assets.core.training.config import load_processor


@pytest.fixture(scope="module")
def tokenizer(embedded_base):
    return load_processor(embedded_base).tokenizer


def _feed(processor: ExpectedScore, tokenizer, text: str, logits: mx.array) -> mx.array:
    """Run the processor as generation does: the prefill call, then one call per generated token."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    processor(mx.array([0]), logits)  # prefill: the prompt only
    out = logits
    for token in ids:
        out = processor(mx.array([token]), logits)
    return out


def _belief(tokenizer, vocab_size: int, weights: dict[str, float]) -> mx.array:
    logits = np.full(vocab_size, -30.0, np.float32)
    for text, p in weights.items():
        (token,) = tokenizer.encode(text, add_special_tokens=False)
        logits[token] = math.log(p)
    return mx.array(logits[None, :])


def _chosen(tokenizer, logits: mx.array) -> str:
    row = np.array(logits.reshape(-1))
    assert np.isfinite(row).sum() == 1, "a score position allows exactly one token"
    return tokenizer.decode([int(np.argmax(row))])


def test_a_score_is_the_value_nearest_the_models_expectation(tokenizer):
    vocab = len(tokenizer.get_vocab())
    split_belief = _belief(tokenizer, vocab, {"6": 0.4, "9": 0.35, "3": 0.25})  # greedy says 6, expectation 6.3
    answer_so_far = '{"image_description":"A dim scene.","overall_score":'
    out = _feed(ExpectedScore(tokenizer), tokenizer, answer_so_far, split_belief)
    assert _chosen(tokenizer, out) == "6.5"
    dim = _feed(ExpectedScore(tokenizer), tokenizer, '"dimensions":[{"name":"Lighting","score":', split_belief)
    assert _chosen(tokenizer, dim) == "6.5"


def test_every_other_position_is_left_to_greedy(tokenizer):
    vocab = len(tokenizer.get_vocab())
    belief = _belief(tokenizer, vocab, {"6": 0.4, "9": 0.6})
    processor = ExpectedScore(tokenizer)
    out = _feed(processor, tokenizer, '{"image_description":"A dim scene, score 3.', belief)
    assert mx.array_equal(out, belief).item() and processor.chosen == 0


def test_values_a_mask_ruled_out_are_never_chosen(tokenizer):
    vocab = len(tokenizer.get_vocab())
    belief = np.array(_belief(tokenizer, vocab, {"4": 0.5, "10": 0.5}))
    (ten,) = tokenizer.encode("10", add_special_tokens=False)
    for value in ("7", "7.5", "6.5", "8"):  # a grammar that forbids the values around the expectation of 7
        (token,) = tokenizer.encode(value, add_special_tokens=False)
        belief[0, token] = -math.inf
    belief[0, ten] = -math.inf
    chosen = _chosen(tokenizer, _feed(ExpectedScore(tokenizer), tokenizer, '"score":', mx.array(belief)))
    assert chosen == "4"  # the only value the mask leaves with any belief


def test_a_position_where_the_mask_allows_no_score_is_passed_through(tokenizer):
    vocab = len(tokenizer.get_vocab())
    logits = np.full((1, vocab), -math.inf, np.float32)
    logits[0, 5] = 0.0
    out = _feed(ExpectedScore(tokenizer), tokenizer, '"score":', mx.array(logits))
    assert np.array_equal(np.array(out), logits)


class _DigitTokenizer:
    """A vocabulary that spells numbers digit by digit, as Qwen's does (`10` is `1`, `0`)."""

    def __init__(self) -> None:
        self.pieces = [*"0123456789", ".", '"score":', "{", "}"]

    def get_vocab(self) -> dict[str, int]:
        return {piece: i for i, piece in enumerate(self.pieces)}

    def decode(self, ids: list[int]) -> str:
        return "".join(self.pieces[i] for i in ids)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [self.pieces.index(text)] if text in self.pieces else [self.pieces.index(c) for c in text]


def test_a_tokenizer_that_spells_scores_digit_by_digit_stays_greedy():
    digits = _DigitTokenizer()
    belief = np.full((1, len(digits.pieces)), -30.0, np.float32)
    belief[0, digits.pieces.index("9")] = belief[0, digits.pieces.index("1")] = 0.0  # 9 or 10: "1" starts "10"
    processor = ExpectedScore(digits)
    out = _feed(processor, digits, '"score":', mx.array(belief))
    assert np.array_equal(np.array(out), belief) and processor.chosen == 0  # never the mean of 9 and 1
