"""A tiny, randomly initialised Qwen3-VL checkpoint that stands in for a real base model.

No model weights can be downloaded where the demo and the tests run, so the pipeline builds its own base: a
Qwen3-VL-architecture model (`model_type` `qwen3_vl`) with seeded random float32 weights, a byte-level BPE tokenizer
trained on the demo corpus, a Qwen-style chat template and an image processor configured for very few image tokens.
It is written in the Hugging Face folder layout, so `mlx_vlm.load(path)` treats it exactly like a downloaded model.

The random base knows nothing (its outputs never parse); everything it produces after fine-tuning was learned by the
LoRA adapter. Its shape is sized so that the largest demo advisor fine-tunes in a few CPU minutes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mondrian_assets.core import atomic

SPEC_FILE = "tiny_model_spec.json"
FORMAT_VERSION = 2  # 2: numbers are tokens of their own, shared by every score field

# Qwen's special tokens, in Qwen's own order; each must stay a single token.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen's turn format: an image part becomes <|vision_start|><|image_pad|><|vision_end|>, which the processor
# expands to one <|image_pad|> per merged image patch.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] in ('image', 'image_url', 'input_image') -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}"
    "{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

STAND_IN_NOTE = (
    "random weights and a tokenizer trained on the demo's text: a stand-in for the pipeline's code paths, "
    "not for the quality or the token counts of a real Qwen3-VL"
)

# Text every chat carries besides the corpus; the tokenizer should know it as whole pieces.
_TEMPLATE_TEXT = ("user", "assistant", "system")


@dataclass(frozen=True)
class TinyModelSpec:
    """Everything that determines the built checkpoint (with the corpus and the seed).

    The defaults are calibrated on the demo's largest advisor (ansel, ~130 train / ~30 val examples): with
    TrainConfig's defaults (4 epochs) it fine-tunes in ~3 CPU-minutes and its greedy outputs parse for every val
    image. MLX's CPU matmuls run at ~6 GFLOP/s here, so every token and every weight counts.
    """

    # tokenizer: merges cross word boundaries but never a JSON string boundary (see _pre_tokenizer), so a
    # ~1,100-character analysis is ~80 tokens and the ~1,300-character prompt ~45
    vocab_size: int = 4096  # upper bound (special tokens and the 256 byte symbols included); the corpus runs out first
    max_token_chars: int = 64  # whole phrases and whole structure runs (a token never straddles a string boundary)
    min_pair_frequency: int = 1  # 1: text seen once (each advisor's own prompt paragraph) is merged too
    # language model
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 256
    rope_theta: float = 10_000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False  # tied, the random model predicts "repeat the last token" and learns slower
    dtype: str = "float32"  # the config's (random weights are float32): on the CPU bf16 matmuls are ~100x slower
    # vision tower
    vision_hidden_size: int = 64
    vision_depth: int = 1
    vision_heads: int = 2
    vision_intermediate_size: int = 128
    patch_size: int = 16
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    num_position_embeddings: int = 256  # a square: the pos-embedding grid is 16 x 16
    deepstack_visual_indexes: tuple[int, ...] = ()  # vision layers whose features also feed early text layers
    # image processor: the pixel budget sets the image token count (one token per 32 x 32 pixels)
    min_pixels: int = 4 * 32 * 32
    max_pixels: int = 28 * 32 * 32  # a 4:3 photo becomes 4 x 6 = 24 image tokens
    # initialisation (all calibrated): random layers are useful features for LoRA, but must not drown the token
    # signal; the frozen output head needs enough scale for confident predictions
    init_std: float = 0.02
    embed_std: float = 0.1
    head_std: float = 0.25

    def mrope_section(self) -> list[int]:
        """Qwen3-VL splits the rotary half-dimension over (time, height, width); it must sum to head_dim / 2."""
        half = self.head_dim // 2
        t = half - 2 * (half * 5 // 16)
        return [t, half * 5 // 16, half * 5 // 16]


def corpus_hash(corpus: Iterable[str]) -> str:
    digest = hashlib.sha256()
    for text in corpus:
        digest.update(text.encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()


def spec_fingerprint(spec: TinyModelSpec, corpus_digest: str, seed: int | None) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "spec": json.loads(json.dumps(dataclasses.asdict(spec))),  # as read back from the file: tuples are lists
        "corpus_sha256": corpus_digest,
        "seed": seed,
    }


def is_built(out_dir: Path, spec: TinyModelSpec, corpus_digest: str, seed: int | None) -> bool:
    marker = out_dir / SPEC_FILE
    if not marker.is_file():
        return False
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    expected = spec_fingerprint(spec, corpus_digest, seed)
    return all(recorded.get(k) == v for k, v in expected.items())


def build_tiny_base_model(
    out_dir: Path,
    corpus: Iterable[str],
    *,
    seed: int = 0,
    spec: TinyModelSpec = TinyModelSpec(),
) -> Path:
    """Write the tiny base checkpoint to `out_dir` (atomically) and return `out_dir`.

    `corpus` is the text the tokenizer is trained on (prompts and canonical JSON responses). A folder already built
    from the same spec, corpus and seed is left as it is.
    """
    texts = [t for t in corpus if t]
    if not texts:
        raise ValueError("the tokenizer corpus is empty")
    digest = corpus_hash(texts)
    if is_built(out_dir, spec, digest, seed):
        return out_dir
    check_spec(spec)
    with atomic.staged_dir(out_dir) as stage:
        tokenizer = train_tokenizer(texts, spec)
        vocab_size = tokenizer.get_vocab_size()
        write_model_files(
            stage, tokenizer, special_tokens=SPECIAL_TOKENS, spec=spec, vocab_size=vocab_size,
            stand_in_note=STAND_IN_NOTE, seed=seed,
        )  # fmt: skip
        _write_json(stage / SPEC_FILE, spec_fingerprint(spec, digest, seed) | {"vocab_size": vocab_size})
    return out_dir


def write_model_files(
    stage: Path,
    tokenizer,
    *,
    special_tokens: tuple[str, ...],
    spec: TinyModelSpec,
    vocab_size: int,
    stand_in_note: str,
    seed: int | None,
) -> dict:
    """Write a Hugging Face model folder's files into `stage` and return its config.

    `tokenizer` is a `tokenizers.Tokenizer` holding `special_tokens`; `vocab_size` is the embedding's row count
    (at least the tokenizer's size); with `seed` None no weights are written (a config and tokenizer folder).
    """
    tokenizer.save(str(stage / "tokenizer.json"))
    ids = {tok: tokenizer.token_to_id(tok) for tok in special_tokens}
    _write_json(stage / "tokenizer_config.json", _tokenizer_config(ids))
    _write_json(stage / "special_tokens_map.json", _special_tokens_map(special_tokens))
    (stage / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    _write_json(stage / "preprocessor_config.json", _preprocessor_config(spec))
    _write_json(stage / "video_preprocessor_config.json", _preprocessor_config(spec))
    _write_json(stage / "processor_config.json", {"processor_class": "Qwen3VLProcessor"})
    config = model_config(spec, vocab_size, ids) | {"mondrian_stand_in": stand_in_note}
    _write_json(stage / "config.json", config)
    _write_json(
        stage / "generation_config.json",
        {"eos_token_id": config["eos_token_id"], "pad_token_id": ids["<|endoftext|>"], "do_sample": False},
    )
    if seed is not None:
        _write_weights(stage / "model.safetensors", config, spec, seed)
    return config


def check_spec(spec: TinyModelSpec) -> None:
    if spec.num_heads * spec.head_dim <= 0 or spec.num_heads % spec.num_kv_heads:
        raise ValueError("num_heads must be a positive multiple of num_kv_heads")
    if spec.head_dim % 2 or sum(spec.mrope_section()) != spec.head_dim // 2:
        raise ValueError("head_dim must be even (mrope sections sum to head_dim / 2)")
    if spec.vision_hidden_size % spec.vision_heads or (spec.vision_hidden_size // spec.vision_heads) % 4:
        raise ValueError("vision head dim must be a multiple of 4 (2-D rotary embedding)")
    if int(spec.num_position_embeddings**0.5) ** 2 != spec.num_position_embeddings:
        raise ValueError("num_position_embeddings must be a perfect square")
    if spec.vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
        raise ValueError("vocab_size must exceed the 256 byte symbols plus the special tokens")


# --- tokenizer -----------------------------------------------------------------------------------------------


# A run of JSON structure: brackets, structural commas and colons (prose ones are followed by a space), quoted
# keys and quotes; or a number on its own. Everything between two runs is the content of a JSON string, or prose.
# Numbers stand apart so every score field writes its value with the same ~15 tokens: fused into the structure
# before them (`"}],"overall_score":6.4`), each overall score was a token of its own, most seen once or twice in
# an advisor's data, and the model could not learn which to pick from the photo.
_NUMBER = r"[0-9]+(?:\.[0-9]+)?"
_JSON_STRUCTURE = rf'(?:[\[\]{{}}]|[,:](?! )|"[A-Za-z_]+"(?=:)|")+|{_NUMBER}'


def _pre_tokenizer():
    """Split at newlines and between JSON structure and string content, then map bytes to symbols.

    GPT-style word splitting keeps every JSON punctuation run (`":"`, `","`) and every word a separate token, which
    makes an analysis several hundred tokens long. Here merges may cross word boundaries, so a recurring phrase
    ("Keep this placement.") or a run of structure (`","score":`) becomes one token and an analysis is ~80 tokens. But no token straddles a string boundary: content tokens hold no quote,
    so a model unsure which words come next still writes valid JSON, and the structure tokens are few and
    frequent, hence learnt first. (Tokens that ran on across the boundary, e.g. `Keep it even."},{"name":"Emotional`,
    made a model unsure of the words jump into the wrong place of the structure.) Prose also splits before ", ",
    so an image description is a few common clauses rather than one rare token. Newlines stay isolated so the chat
    template's `assistant\\n` never fuses with the answer: the prompt is a token prefix of the full conversation.
    """
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\n+"), behavior="isolated"),
            pre_tokenizers.Split(Regex(_JSON_STRUCTURE), behavior="isolated"),
            pre_tokenizers.Split(", ", behavior="merged_with_next"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def train_tokenizer(texts: list[str], spec: TinyModelSpec):
    """A byte-level BPE `tokenizers.Tokenizer` trained on `texts`, with Qwen's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = _pre_tokenizer()
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        min_frequency=spec.min_pair_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        max_token_length=spec.max_token_chars,
        show_progress=False,
    )
    tokenizer.train_from_iterator([*texts, *_TEMPLATE_TEXT], trainer=trainer)
    return tokenizer


def _tokenizer_config(ids: dict[str, int]) -> dict:
    added = {
        str(token_id): {
            "content": tok,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for tok, token_id in ids.items()
    }
    return {
        # The generic fast tokenizer: transformers' Qwen2Tokenizer would rebuild the BPE from vocab/merges and
        # lose the special tokens (DESIGN.md), so <|image_pad|> would no longer be one token.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": 32768,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
        "padding_side": "right",
        "split_special_tokens": False,
        "image_token": "<|image_pad|>",
        "video_token": "<|video_pad|>",
        "vision_start_token": "<|vision_start|>",
        "vision_end_token": "<|vision_end|>",
        "extra_special_tokens": {
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_start_token": "<|vision_start|>",
            "vision_end_token": "<|vision_end|>",
        },
    }


def _special_tokens_map(special_tokens: tuple[str, ...]) -> dict:
    return {
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "additional_special_tokens": [t for t in special_tokens if t not in ("<|im_end|>", "<|endoftext|>")],
    }


def _preprocessor_config(spec: TinyModelSpec) -> dict:
    return {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen3VLProcessor",
        "patch_size": spec.patch_size,
        "temporal_patch_size": spec.temporal_patch_size,
        "merge_size": spec.spatial_merge_size,
        "min_pixels": spec.min_pixels,
        "max_pixels": spec.max_pixels,
        "size": {"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels},
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "do_convert_rgb": True,
    }


# --- model ---------------------------------------------------------------------------------------------------


def model_config(spec: TinyModelSpec, vocab_size: int, ids: dict[str, int]) -> dict:
    text = {
        "model_type": "qwen3_vl_text",
        "vocab_size": vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": spec.rope_theta,
        "rope_scaling": {"rope_type": "default", "mrope_section": spec.mrope_section(), "mrope_interleaved": True},
        "max_position_embeddings": spec.max_position_embeddings,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "attention_bias": False,
        "initializer_range": spec.init_std,
        "dtype": spec.dtype,
    }
    vision = {
        "model_type": "qwen3_vl",
        "depth": spec.vision_depth,
        "hidden_size": spec.vision_hidden_size,
        "intermediate_size": spec.vision_intermediate_size,
        "num_heads": spec.vision_heads,
        "out_hidden_size": spec.hidden_size,
        "patch_size": spec.patch_size,
        "spatial_merge_size": spec.spatial_merge_size,
        "temporal_patch_size": spec.temporal_patch_size,
        "in_channels": 3,
        "num_position_embeddings": spec.num_position_embeddings,
        "deepstack_visual_indexes": list(spec.deepstack_visual_indexes),
        "hidden_act": "gelu_pytorch_tanh",
        "initializer_range": spec.init_std,
    }
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "model_type": "qwen3_vl",
        "text_config": text,
        "vision_config": vision,
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_token_id": ids["<|endoftext|>"],
        "tie_word_embeddings": spec.tie_word_embeddings,
        "vocab_size": vocab_size,
        "dtype": spec.dtype,
    }


def weight_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint, under its Hugging Face name (PyTorch layouts)."""
    t, v = config["text_config"], config["vision_config"]
    d, f, hd = t["hidden_size"], t["intermediate_size"], t["head_dim"]
    nq, nkv = t["num_attention_heads"], t["num_key_value_heads"]
    vd, vf = v["hidden_size"], v["intermediate_size"]
    merged = vd * v["spatial_merge_size"] ** 2
    ps, tps = v["patch_size"], v["temporal_patch_size"]
    shapes: dict[str, tuple[int, ...]] = {"model.language_model.embed_tokens.weight": (t["vocab_size"], d)}
    for i in range(t["num_hidden_layers"]):
        p = f"model.language_model.layers.{i}"
        shapes |= {
            f"{p}.input_layernorm.weight": (d,),
            f"{p}.post_attention_layernorm.weight": (d,),
            f"{p}.self_attn.q_proj.weight": (nq * hd, d),
            f"{p}.self_attn.k_proj.weight": (nkv * hd, d),
            f"{p}.self_attn.v_proj.weight": (nkv * hd, d),
            f"{p}.self_attn.o_proj.weight": (d, nq * hd),
            f"{p}.self_attn.q_norm.weight": (hd,),
            f"{p}.self_attn.k_norm.weight": (hd,),
            f"{p}.mlp.gate_proj.weight": (f, d),
            f"{p}.mlp.up_proj.weight": (f, d),
            f"{p}.mlp.down_proj.weight": (d, f),
        }
    shapes["model.language_model.norm.weight"] = (d,)
    if not t["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (t["vocab_size"], d)
    shapes |= {
        "model.visual.patch_embed.proj.weight": (vd, 3, tps, ps, ps),
        "model.visual.patch_embed.proj.bias": (vd,),
        "model.visual.pos_embed.weight": (v["num_position_embeddings"], vd),
    }
    for i in range(v["depth"]):
        p = f"model.visual.blocks.{i}"
        shapes |= {
            f"{p}.norm1.weight": (vd,),
            f"{p}.norm1.bias": (vd,),
            f"{p}.norm2.weight": (vd,),
            f"{p}.norm2.bias": (vd,),
            f"{p}.attn.qkv.weight": (3 * vd, vd),
            f"{p}.attn.qkv.bias": (3 * vd,),
            f"{p}.attn.proj.weight": (vd, vd),
            f"{p}.attn.proj.bias": (vd,),
            f"{p}.mlp.linear_fc1.weight": (vf, vd),
            f"{p}.mlp.linear_fc1.bias": (vf,),
            f"{p}.mlp.linear_fc2.weight": (vd, vf),
            f"{p}.mlp.linear_fc2.bias": (vd,),
        }
    shapes |= {
        "model.visual.merger.norm.weight": (vd,),
        "model.visual.merger.norm.bias": (vd,),
        "model.visual.merger.linear_fc1.weight": (merged, merged),
        "model.visual.merger.linear_fc1.bias": (merged,),
        "model.visual.merger.linear_fc2.weight": (t["hidden_size"], merged),
        "model.visual.merger.linear_fc2.bias": (t["hidden_size"],),
    }
    return shapes


def _initial_value(name: str, shape: tuple[int, ...], spec: TinyModelSpec, rng: np.random.Generator) -> np.ndarray:
    if name.endswith("norm.weight") or ".norm1.weight" in name or ".norm2.weight" in name:
        return np.ones(shape, np.float32)
    if name.endswith(".bias"):
        return np.zeros(shape, np.float32)
    if "embed_tokens" in name:
        return rng.normal(0.0, spec.embed_std, shape).astype(np.float32)
    if name == "lm_head.weight":
        return rng.normal(0.0, spec.head_std, shape).astype(np.float32)
    if "patch_embed" in name or "visual" in name:
        # a fan-in scaled vision tower, so random image features keep the image's information at a usable scale
        fan_in = int(np.prod(shape[1:]))
        return rng.normal(0.0, fan_in**-0.5, shape).astype(np.float32)
    return rng.normal(0.0, spec.init_std, shape).astype(np.float32)


def _write_weights(path: Path, config: dict, spec: TinyModelSpec, seed: int) -> None:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {name: _initial_value(name, shape, spec, rng) for name, shape in weight_shapes(config).items()}
    save_file(tensors, str(path), metadata={"format": "pt"})


def count_parameters(config: dict) -> int:
    return sum(int(np.prod(s)) for s in weight_shapes(config).values())


def _write_json(path: Path, value: object) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
