"""Score values decoded as the expected value of the model's belief, on the embedded model's real tokenizer."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from mondrian_assets.core.inference.score_decoding import ExpectedScore, only_token
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


def _digit_belief(digits: _DigitTokenizer, weights: dict[str, float]) -> np.ndarray:
    row = np.full(len(digits.pieces), -30.0, np.float32)
    for piece, p in weights.items():
        row[digits.pieces.index(piece)] = math.log(p)
    return row - np.log(np.exp(row).sum())


def _model_torn_between_9_and_10(digits: _DigitTokenizer):
    """A look-ahead whose model, after `"score":`, writes 9 or 10 (each then ends the number with `}`)."""
    after = {("1",): {"0": 1.0}, ("1", "0"): {"}": 1.0}, ("9",): {"}": 1.0}}

    def look_ahead(rows: np.ndarray) -> mx.array:
        out = np.zeros((*rows.shape, len(digits.pieces)), np.float32)
        for r, row in enumerate(rows):
            for k in range(rows.shape[1]):
                prefix = tuple(digits.pieces[i] for i in row[: k + 1])
                out[r, k] = _digit_belief(digits, after.get(prefix, {"5": 0.5, "}": 0.5}))
        return mx.array(out)

    return look_ahead


def test_without_a_look_ahead_a_digit_by_digit_tokenizer_stays_greedy():
    digits = _DigitTokenizer()
    belief = mx.array(_digit_belief(digits, {"9": 0.5, "1": 0.5})[None, :])  # 9 or 10: "1" starts "10"
    processor = ExpectedScore(digits)
    out = _feed(processor, digits, '"score":', belief)
    assert mx.array_equal(out, belief).item() and processor.chosen == 0  # never the mean of 9 and 1


def test_a_digit_by_digit_score_is_the_value_nearest_the_expectation_of_whole_values():
    """Qwen's tokenizer writes 10 as 1, 0: the look-ahead scores each value's whole sequence, so a belief split
    between 9 and 10 writes 9.5 (not 5, the mean of 9 and the first digit 1), token by token, then closes it."""
    digits = _DigitTokenizer()
    belief = mx.array(_digit_belief(digits, {"9": 0.5, "1": 0.5})[None, :])
    processor = ExpectedScore(digits, _model_torn_between_9_and_10(digits))
    written = []
    out = _feed(processor, digits, '"score":', belief)
    for _ in range(4):
        row = np.array(out.reshape(-1))
        if np.isfinite(row).sum() != 1:
            break
        written.append(digits.pieces[int(np.argmax(row))])
        out = processor(mx.array([digits.pieces.index(written[-1])]), belief)
    assert "".join(written) == "9.5" and processor.chosen == 1
    closed = np.array(out.reshape(-1))  # after the value: no digit or point may continue the number
    assert all(np.isneginf(closed[digits.pieces.index(p)]) for p in "0123456789.")
    assert np.isfinite(closed[digits.pieces.index("}")])


def test_a_digit_by_digit_value_the_mask_forbids_is_never_written():
    digits = _DigitTokenizer()
    belief = _digit_belief(digits, {"9": 0.5, "1": 0.5})[None, :]
    belief[0, digits.pieces.index("9")] = -math.inf  # a grammar that allows no 9-something here
    processor = ExpectedScore(digits, _model_torn_between_9_and_10(digits))
    out = np.array(_feed(processor, digits, '"score":', mx.array(belief)).reshape(-1))
    assert digits.pieces[int(np.argmax(out))] == "1" and np.isfinite(out).sum() == 1  # 1-something: 10, 1 or 1.5


class _Probe:
    """A logits processor that, at its third call, looks ahead over two rows, then forces the first row's tokens
    and records the log-probabilities generation itself computes after each of them."""

    def __init__(self, look_ahead, rows: np.ndarray) -> None:
        self.look_ahead, self.rows, self.calls = look_ahead, rows, 0
        self.predicted: np.ndarray | None = None
        self.seen: list[np.ndarray] = []

    def __call__(self, history: mx.array, logits: mx.array) -> mx.array:
        self.calls += 1
        if self.predicted is not None and len(self.seen) < self.rows.shape[1]:
            self.seen.append(np.array((logits - mx.logsumexp(logits, axis=-1, keepdims=True)).reshape(-1)))
        if self.calls == 3:
            self.predicted = np.array(self.look_ahead(self.rows))
        forced = self.calls - 3
        if self.predicted is not None and 0 <= forced < self.rows.shape[1]:
            return only_token(int(self.rows[0, forced]), logits)
        return logits


@pytest.mark.parametrize("base", ["embedded_base", "qwen_vocab_base"])
def test_the_look_ahead_predicts_what_generation_computes_next(base, request, pristine_demo):
    """The look-ahead continues the generation's state on copies of its KV cache (positions included): its
    log-probabilities for a row are those generation computes after feeding that row, which it could not be if
    the look-ahead had written to the generation's own cache."""
    from mlx_vlm import stream_generate
    from mlx_vlm.models.cache import make_prompt_cache

    from mondrian_assets.core import schema
    from mondrian_assets.core.inference.generate import formatted_prompt
    from mondrian_assets.core.inference.loading import load_for_inference
    from mondrian_assets.core.inference.score_decoding import cache_look_ahead

    loaded = load_for_inference(str(request.getfixturevalue(base)), None)
    image = str(next((pristine_demo.app_dir / "source").glob("*.jpg")))
    prompt = formatted_prompt(loaded, schema.build_prompt("You critique photographs.", "You are Ansel.", "JSON."))
    ids = loaded.tokenizer.encode('7.5,"score":10 in the light of the day', add_special_tokens=False)
    rows = np.array([ids[:3], ids[3:6]], np.int32)

    cache = make_prompt_cache(loaded.model.language_model)
    processor = _Probe(cache_look_ahead(loaded.model.language_model, cache), rows)
    stream = stream_generate(loaded.model, loaded.processor, prompt, image=[image], max_tokens=10,
                             prompt_cache=cache, logits_processors=[processor])  # fmt: skip
    probed = [int(r.token) for r in stream if r.token is not None]
    assert processor.predicted.shape[:2] == rows.shape and len(processor.seen) == rows.shape[1]
    for k, seen in enumerate(processor.seen):
        np.testing.assert_allclose(processor.predicted[0, k], seen, atol=2e-4)
    assert probed[2 : 2 + rows.shape[1]] == rows[0].tolist()
