"""The stand-in base with Qwen's real tokenizer: built offline, Qwen's ids and digit-by-digit numbers, the real
image token count, and mlx-vlm loads and runs it."""

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mondrian_assets.core.data.images import prepared_image
from mondrian_assets.core.schema import chat_messages
from mondrian_assets.core.training.config import TrainConfig, load_processor
from mondrian_assets.core.training.examples import encode_example
from helpers import random_adapter
from mondrian_assets.demo.qwen_vocab_base import (
    QWEN_EMBEDDING_ROWS,
    TOKENIZER_CACHE,
    ensure_qwen_vocab_base,
    rank_file,
)


@pytest.fixture(scope="module")
def tokenizer(qwen_vocab_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(qwen_vocab_base))


def test_builds_offline_from_an_installed_package_and_says_it_is_a_stand_in(qwen_vocab_models, qwen_vocab_base):
    assert "site-packages" in str(rank_file())
    config = json.loads((qwen_vocab_base / "config.json").read_text())
    assert config["vocab_size"] == config["text_config"]["vocab_size"] == QWEN_EMBEDDING_ROWS
    assert config["text_config"]["dtype"] == "float32" and not config["tie_word_embeddings"]
    assert "stand-in" in config["mondrian_stand_in"]
    assert (qwen_vocab_models / "base" / TOKENIZER_CACHE / "tokenizer.json").is_file()
    tic = time.perf_counter()
    assert ensure_qwen_vocab_base(qwen_vocab_models, "tiny") == qwen_vocab_base  # built: found at once
    assert time.perf_counter() - tic < 2


def test_the_4b_shape_is_a_config_and_tokenizer_folder(qwen_vocab_models):
    folder = ensure_qwen_vocab_base(qwen_vocab_models, "4b")  # reuses the session's converted tokenizer
    config = json.loads((folder / "config.json").read_text())
    text, vision = config["text_config"], config["vision_config"]
    assert (text["hidden_size"], text["num_hidden_layers"], text["head_dim"]) == (2560, 36, 128)
    assert text["rope_scaling"]["mrope_section"] == [24, 20, 20]
    assert (vision["depth"], vision["deepstack_visual_indexes"]) == (24, [5, 11, 17])
    assert config["image_token_id"] == 151655 and config["dtype"] == "bfloat16"
    assert (folder / "tokenizer.json").is_file() and not (folder / "model.safetensors").exists()


def test_numbers_tokenize_digit_by_digit(tokenizer):
    assert tokenizer.tokenize('"score":10') == ['"', "score", '":', "1", "0"]
    assert tokenizer.tokenize('"overall_score":7.5') == ['"', "overall", "_score", '":', "7", ".", "5"]


def test_qwen_ids(tokenizer):
    ids = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|vision_start|>", "<|image_pad|>", "<think>", "</think>"])
    assert ids == [151643, 151652, 151655, 151667, 151668]
    assert tokenizer.encode("assistant", add_special_tokens=False) == [77091]
    assert tokenizer.encode("<|image_pad|>", add_special_tokens=False) == [151655]
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")


def test_an_iphone_photo_gets_the_real_image_token_count(qwen_vocab_base, tmp_path):
    photo = tmp_path / "IMG_0001.jpg"
    Image.new("RGB", (4032, 3024), (120, 90, 60)).save(photo, quality=90)
    seen = prepared_image(photo, "0" * 64, tmp_path / "cache")  # what splits hand to training: <= 800 px
    width, height = Image.open(seen).size
    assert (width, height) == (800, 600)
    config = json.loads((qwen_vocab_base / "config.json").read_text())
    processor = load_processor(qwen_vocab_base)
    row = {"images": [str(seen)], "messages": chat_messages("Critique this photo.", '{"overall_score":7.5}')}
    example = encode_example(processor, config, row, TrainConfig(base_model=str(qwen_vocab_base)))
    # Qwen's smart resize rounds each side to a multiple of 32 (patch 16 x merge 2), then rescales only an image
    # outside the pixel budget: 800 x 600 is inside Qwen3-VL's released one
    h, w = 32 * round(height / 32), 32 * round(width / 32)
    budget = processor.image_processor
    assert (budget.min_pixels, budget.max_pixels) == (65_536, 16_777_216)  # Qwen3-VL's preprocessor_config
    assert (h, w) == (608, 800) and budget.min_pixels <= h * w <= budget.max_pixels
    assert int(np.sum(example.input_ids == 151655)) == (h // 32) * (w // 32) == 475


def test_mlx_vlm_loads_it_and_generates_on_a_demo_photo(qwen_vocab_base, pristine_demo, tmp_path):
    import mlx_vlm
    from mlx_vlm.prompt_utils import apply_chat_template

    photo = next(Path(pristine_demo.app_dir, "source").glob("*.jpg"))
    model, processor = mlx_vlm.load(str(qwen_vocab_base))
    config = json.loads((qwen_vocab_base / "config.json").read_text())
    prompt = apply_chat_template(processor, config, chat_messages("Critique this photo."), num_images=1)
    result = mlx_vlm.generate(model, processor, prompt, image=[str(photo)], max_tokens=4, verbose=False)
    assert result.generation_tokens == 4 and result.prompt_tokens > 20


# --- the token-dependent paths, on Qwen's tokenizer ---------------------------------------------------------------


def _example(qwen_vocab_base, tmp_path, answer: str, **config):
    photo = tmp_path / "photo.jpg"
    Image.new("RGB", (96, 72), (80, 120, 160)).save(photo)
    processor = load_processor(qwen_vocab_base)
    row = {"images": [str(photo)], "messages": chat_messages("Critique this photo.", answer)}
    model_config = json.loads((qwen_vocab_base / "config.json").read_text())
    return processor, encode_example(processor, model_config, row, TrainConfig(base_model=str(qwen_vocab_base), **config))


def test_the_answer_mask_starts_at_the_answers_first_token(qwen_vocab_base, tmp_path):
    """The answer starts with `{"` right after the template's newline: Qwen's pre-tokenizer could fuse the two,
    which would make the first target a token the prompt shares. It does not: the first target is the answer's."""
    answer = '{"image_description":"A barn.","overall_score":7.5}'
    processor, example = _example(qwen_vocab_base, tmp_path, answer)
    decode = processor.tokenizer.decode
    first, last = (int(i) for i in np.flatnonzero(example.loss_mask)[[0, -1]])
    assert decode(example.input_ids[:first].tolist()).endswith("<|im_start|>assistant\n")
    assert decode(example.input_ids[first : last + 1].tolist()) == answer + "<|im_end|>"
    assert example.loss_mask[first : last + 1].all() and not example.loss_mask[:first].any()


def test_an_example_longer_than_max_seq_length_is_refused_by_name_never_cut(qwen_vocab_base, tmp_path):
    from mondrian_assets.core.training.config import TrainingConfigError

    long_answer = '{"image_description":"' + "A barn under snow, " * 60 + '"}'
    with pytest.raises(TrainingConfigError, match="exceed max_seq_length=256 .it would cut the answer"):
        _example(qwen_vocab_base, tmp_path, long_answer, max_seq_length=256)


def test_the_loop_guard_tells_a_looping_answer_from_a_long_one_on_qwens_tokens(tokenizer, pristine_demo):
    """The guard works on token ids: a sentence repeated is a loop in Qwen's pieces too, a whole analysis of the
    demo (~260 Qwen tokens, many repeated words and keys) is not."""
    from mondrian_assets.core.inference.records import ends_in_loop

    truth = (pristine_demo.app_dir / "demo_truth.jsonl").read_text().splitlines()
    analysis = next(t["intended"] for t in map(json.loads, truth) if t.get("intended"))
    tokens = tokenizer.encode(analysis, add_special_tokens=False)
    assert len(tokens) > 200 and not any(ends_in_loop(tokens[:n]) for n in range(1, len(tokens) + 1))
    looping = tokenizer.encode(analysis[:200] + ("The light falls softly on the barn. " * 8).rstrip(), add_special_tokens=False)
    assert ends_in_loop(looping)


def test_a_fused_adapter_answers_as_the_unfused_one_on_the_151k_vocabulary(qwen_vocab_base, tmp_path):
    import mlx.core as mx

    from mondrian_assets.core.inference.loading import load_for_inference

    random_adapter(qwen_vocab_base, tmp_path)
    fused = load_for_inference(str(qwen_vocab_base), tmp_path)
    unfused = load_for_inference(str(qwen_vocab_base), tmp_path, fuse=False)
    tokens = mx.array([fused.tokenizer.encode('{"overall_score":7.5,"score":10}', add_special_tokens=False)])
    assert fused.fused_layers > 0
    assert mx.allclose(fused.model.language_model(tokens).logits, unfused.model.language_model(tokens).logits,
                       atol=1e-4).item()  # fmt: skip
