"""Under the grammar mask every answer is a valid analysis, on both tokenizers, whatever the weights: the base
with random weights and a random (under-trained) adapter, none cut off by the budget or by the loop guard."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import pytest

from mondrian_assets.core import schema
from mondrian_assets.core.inference import loading
from mondrian_assets.core.inference.constrained import AnalysisConstraint
from mondrian_assets.core.inference.generate import generate_one
from helpers import random_image

MAX_TOKENS = 600


def _random_adapter(base: Path, out: Path) -> Path:
    """A LoRA adapter with non-zero B, saved by mlx-vlm's own utilities: it moves the model, and teaches nothing."""
    import mlx_vlm
    from mlx_vlm.trainer import get_peft_model, save_adapter

    model, _ = mlx_vlm.load(str(base))
    model = get_peft_model(model, rank=4, alpha=8.0, dropout=0.0, verbose=False)
    mx.random.seed(1)
    for _, module in model.named_modules():
        if "lora_b" in module:
            module.lora_b = mx.random.normal(module.lora_b.shape) * 0.2
    out.mkdir()
    save_adapter(model, out / "adapters.safetensors")
    return out


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
    _answers_under_the_mask(embedded_base, _random_adapter(embedded_base, tmp_path / "adapter"), images)


def test_the_qwen_vocabulary_base_and_a_random_adapter_always_answer_valid(qwen_vocab_base, images, tmp_path):
    _answers_under_the_mask(qwen_vocab_base, None, images[:1])
    _answers_under_the_mask(qwen_vocab_base, _random_adapter(qwen_vocab_base, tmp_path / "adapter"), images[:1])


def test_the_constraint_is_built_once_per_tokenizer(embedded_base):
    from transformers import PreTrainedTokenizerFast

    first = AnalysisConstraint.for_processor(PreTrainedTokenizerFast.from_pretrained(str(embedded_base)))
    again = AnalysisConstraint.for_processor(PreTrainedTokenizerFast.from_pretrained(str(embedded_base)))
    assert first is again and first.grammar(MAX_TOKENS) is again.grammar(MAX_TOKENS)
