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
