"""The GPU benchmarks' model and data: Qwen3-VL-4B-Instruct shapes with random bf16 weights, as the peers use.

The shapes come from the peers' own `qwen3vl4b_config.py` (imported, so both sides measure the same model); the
tokenizer and processor files come from the 4B-shaped folder with Qwen's real tokenizer (`demo/qwen_vocab_base.py`,
built offline), with the processor's pixel budget set so a 448 x 448 image becomes the peers' 28 x 28 patches (196
image tokens). The checkpoint is written in mlx-vlm's own parameter names, so `mlx_vlm.load` (hence our training
and inference code) reads it like any base model.
"""

from __future__ import annotations

import importlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from mondrian_assets.demo.tiny_model import SPECIAL_TOKENS

IMAGE_SIDE_PIXELS = 448
NEVER_EMITTED_EOS = 151935  # the last vocabulary row: random weights rarely pick it, so decoding runs its full length
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "processor_config.json",
)


def peer_shapes(peers_dir: Path):
    """The peers' shape module (`SMALL=1` in the environment shrinks it for a CPU shape check)."""
    sys.path.insert(0, str(peers_dir))
    return importlib.import_module("qwen3vl4b_config")


def token_ids(tokenizer_dir: Path) -> dict[str, int]:
    vocab = json.loads((tokenizer_dir / "tokenizer.json").read_text())["added_tokens"]
    ids = {t["content"]: int(t["id"]) for t in vocab}
    return {token: ids[token] for token in SPECIAL_TOKENS}


def model_config(shapes, ids: dict[str, int]) -> dict:
    """The peers' config with our tokenizer's special-token ids (the vocabulary width stays the peers')."""
    config = json.loads(json.dumps(shapes.CONFIG))
    config |= {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "eos_token_id": [NEVER_EMITTED_EOS],
        "pad_token_id": ids["<|endoftext|>"],
        "dtype": "bfloat16",
    }
    config["text_config"] |= {"dtype": "bfloat16"}
    return config


def build_checkpoint(out_dir: Path, tokenizer_dir: Path, shapes, seed: int = 0) -> Path:
    """Write config, tokenizer files and random bf16 weights (initialised by MLX) to `out_dir`."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_vlm.models.qwen3_vl import Model, ModelConfig

    if (out_dir / "model.safetensors").is_file():
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / name, out_dir / name)
    side = IMAGE_SIDE_PIXELS
    for name in ("preprocessor_config.json", "video_preprocessor_config.json"):
        processor = json.loads((out_dir / name).read_text())
        processor |= {"min_pixels": side * side, "max_pixels": side * side}
        processor["size"] = {"shortest_edge": side * side, "longest_edge": side * side}
        (out_dir / name).write_text(json.dumps(processor, indent=2))
    config = model_config(shapes, token_ids(tokenizer_dir))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    widen_vocabulary(out_dir / "tokenizer.json", config["text_config"]["vocab_size"])
    (out_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [NEVER_EMITTED_EOS]}))
    mx.random.seed(seed)
    model = Model(ModelConfig.from_dict(config))
    model.set_dtype(mx.bfloat16)
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights)
    del model, weights
    mx.clear_cache()
    return out_dir


def widen_vocabulary(tokenizer_file: Path, size: int) -> None:
    """Give every id the random model can emit a (never merged) token, so the detokenizer can show it.

    The special tokens join the model's vocabulary at their ids first: `tokenizers` numbers added tokens missing
    from it after the vocabulary's size, so around a gap Qwen's `<|image_pad|>` would move off 151655."""
    tokenizer = json.loads(tokenizer_file.read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab |= {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    taken = set(vocab.values())
    vocab |= {f"<unused{i}>": i for i in range(size) if i not in taken}
    tokenizer_file.write_text(json.dumps(tokenizer, ensure_ascii=False))


def training_examples(shapes, config: dict, batch: int, seq: int, answer_fraction: float, seed: int):
    """`batch` examples laid out like the peers' rows (one 448 x 448 image block near the start, random text
    tokens after it), with the last `answer_fraction` of each sequence as the answer (the loss targets)."""
    from mondrian_assets.core.training.examples import Example

    rng = np.random.default_rng(seed)
    grid = shapes.GRID
    image_tokens = grid * grid // 4
    patch_width = 3 * 2 * 16 * 16
    examples = []
    for _ in range(batch):
        ids = rng.integers(1000, 150000, size=seq).astype(np.int32)  # clear of every special token id
        ids[4] = config["vision_start_token_id"]
        ids[5 : 5 + image_tokens] = config["image_token_id"]
        ids[5 + image_tokens] = config["vision_end_token_id"]
        mask = np.zeros(seq, np.int32)
        mask[int(seq * (1 - answer_fraction)) :] = 1
        examples.append(
            Example(
                input_ids=ids,
                loss_mask=mask,
                pixel_values=rng.standard_normal((grid * grid, patch_width)).astype(np.float32),
                image_grid_thw=np.array([[1, grid, grid]], np.int64),
            )
        )
    return examples
