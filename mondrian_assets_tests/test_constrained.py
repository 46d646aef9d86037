"""Under the grammar mask every answer is a valid analysis, on both tokenizers, whatever the weights: the base
with random weights and a random (under-trained) adapter, none cut off by the budget or by the loop guard."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

from mondrian_assets.core import schema
from mondrian_assets.core.inference import loading
from mondrian_assets.core.inference.constrained import AnalysisConstraint, GrammarMask
from mondrian_assets.core.inference.generate import generate_one
from helpers import random_adapter, random_image

MAX_TOKENS = 600


def _answers_under_the_mask(folder: Path, adapter: Path | None, images: list[Path]) -> None:
    loaded = loading.load_for_inference(str(folder), adapter)
    constraint = AnalysisConstraint.for_processor(loaded.processor)
    prompt = schema.build_prompt(None, "You are Ansel Adams.")
    for image in images:
        generation = generate_one(loaded, image, prompt, max_tokens=MAX_TOKENS,
                                  logits_processors=[constraint.processor(MAX_TOKENS)])  # fmt: skip
        result = schema.parse_analysis(generation.text)
        assert generation.finish_reason == "stop", (generation.finish_reason, generation.text[-200:])
        assert result.ok, (result.error, result.detail)
        assert generation.generation_tokens < MAX_TOKENS


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("constrained")
    return [random_image(folder / f"photo{i}.jpg", size, seed=i) for i, size in enumerate([(96, 72), (64, 96)])]


def test_the_embedded_base_and_a_random_adapter_always_answer_valid(embedded_base, images, tmp_path):
    _answers_under_the_mask(embedded_base, None, images)
    _answers_under_the_mask(embedded_base, random_adapter(embedded_base, tmp_path / "adapter"), images)


def test_the_qwen_vocabulary_base_and_a_random_adapter_always_answer_valid(qwen_vocab_base, images, tmp_path):
    _answers_under_the_mask(qwen_vocab_base, None, images[:1])
    _answers_under_the_mask(qwen_vocab_base, random_adapter(qwen_vocab_base, tmp_path / "adapter"), images[:1])


def test_the_constraint_is_built_once_per_tokenizer(embedded_base):
    from transformers import PreTrainedTokenizerFast

    first = AnalysisConstraint.for_processor(PreTrainedTokenizerFast.from_pretrained(str(embedded_base)))
    again = AnalysisConstraint.for_processor(PreTrainedTokenizerFast.from_pretrained(str(embedded_base)))
    assert first is again and first.grammar(MAX_TOKENS) is again.grammar(MAX_TOKENS)


class _FixedGrammar(GrammarMask):
    """A mask whose grammar allows the same few tokens at every step (the counting rule, without a grammar)."""

    def __init__(self, allowed: set[int], vocab: int) -> None:
        super().__init__(matcher=None, tokenizer=SimpleNamespace(vocab_size=vocab))
        self._fixed = np.isin(np.arange(vocab), list(allowed))

    def consume(self, token: int) -> None:
        pass

    def allowed(self) -> np.ndarray:
        return self._fixed


def _prefers(token: int, vocab: int = 16) -> mx.array:
    logits = np.zeros((1, vocab), np.float32)
    logits[0, token] = 5.0
    return mx.array(logits)


def test_a_later_processors_choice_among_allowed_tokens_is_not_a_grammar_correction():
    """The expected-value score rule runs after the mask and may write another allowed token than the model's
    greedy one: that is not the grammar overriding the model, so the served "unaided" rate must not lose it. A
    model whose own choice the grammar rules out is corrected, and counted."""
    mask = _FixedGrammar({1, 2, 9}, vocab=16)
    mask(mx.array([0]), _prefers(1))  # after prefill: the model wants 1, which is allowed
    mask(mx.array([2]), _prefers(1))  # a later processor wrote 2 instead; the model wants 1 again
    assert mask.corrections == 0
    mask(mx.array([1]), _prefers(5))  # the model wants 5: ruled out
    mask(mx.array([2]), _prefers(9))
    assert mask.corrections == 1
    mask.settle({9})  # it stopped on 9, the model's own end token
    assert mask.corrections == 1
