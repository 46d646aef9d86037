"""LoRA fine-tuning of a Qwen3-VL advisor with MLX (through mlx-vlm), as plain functions.

The loop reads top to bottom like mlx-examples' LoRA trainer: load the base, freeze it, attach LoRA, iterate
batches, `value_and_grad`, update, report, save. Around it sit the guarantees the pipeline needs:

- training text is built with mlx-vlm's own chat-template and input utilities, the same calls generation makes, and
  the loss covers the assistant's answer only (prompt and image tokens carry none) when `answer_only_loss`;
- the data order and every random draw derive from the seed and the step, and checkpoints (adapter, optimizer,
  step, best-so-far) are keyed by a fingerprint of the config and data, so a resumed run ends where an
  uninterrupted one would;
- `run_training_subprocess` runs all of it in a child process, so an MLX crash cannot take the caller down.

Data: JSONL, one example per line, `{"images": ["/abs/path.jpg"], "messages": schema.chat_messages(prompt,
response)}`. Put the splits in one folder as `train.jsonl` and `valid.jsonl` and the same files feed
`python -m mlx_vlm.train --data <folder> --train-on-completions` (its completion mask also counts the template's
newline after `<|im_end|>`, which ours leaves out: one token an example).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mondrian_assets.core import atomic

Report = dict[str, Any]
ReportFn = Callable[[Report], None]

CHECKPOINT_FORMAT = 1
SUPPORTED_MODEL_TYPES = ("qwen3_vl",)
LANGUAGE_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class TrainingConfigError(ValueError):
    """The config or the data cannot produce a meaningful training run; the message says which and why."""


class TrainingFailed(RuntimeError):
    """The training child process died (crash, signal, or an error it reported)."""

    def __init__(self, message: str, *, returncode: int | None = None, stderr_tail: str = "") -> None:
        super().__init__(message)
        self.returncode = returncode
        self.stderr_tail = stderr_tail


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a run. The defaults are calibrated for the embedded tiny model on the demo's largest advisor
    (6 epochs of 67 examples: ~2.5 minutes on 2 CPU cores, every val output parses); for a real 4B base lower
    learning_rate (~1e-4) and expect far slower steps."""

    base_model: str = ""  # a model folder or a Hugging Face hub id
    dtype: str = "auto"  # auto: float32 on the CPU, the checkpoint's own dtype (bf16) on a GPU
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = LANGUAGE_PROJECTIONS  # language-model attention + MLP projections
    train_vision: bool = False  # also fully train the vision tower
    quantize_bits: int | None = None  # None, 4 or 8: quantize the frozen base (QLoRA)
    quantize_group_size: int = 64
    learning_rate: float = 1e-3  # calibrated for the embedded tiny model; for a 4B base use ~1e-4
    min_learning_rate: float = 1e-4  # where the cosine schedule ends
    weight_decay: float = 0.0
    warmup_steps: int = 10
    lr_schedule: str = "cosine"  # or "constant" (after warm-up)
    epochs: int = 6
    iters: int | None = None  # optimizer steps; overrides epochs
    batch_size: int = 1
    grad_accumulation: int = 1
    max_grad_norm: float | None = 1.0
    grad_checkpointing: bool = False
    max_seq_length: int = 2048
    answer_only_loss: bool = True
    seed: int = 0
    report_interval: int = 10
    eval_interval: int = 60
    save_interval: int = 60
    early_stopping_patience: int | None = 3  # evaluations without a new best val loss; None: never stop early

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"target_modules": list(self.target_modules)}

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise TrainingConfigError(f"unknown TrainConfig keys: {', '.join(sorted(unknown))}")
        values = dict(values)
        if "target_modules" in values:
            values["target_modules"] = tuple(values["target_modules"])
        return cls(**values)


@dataclass(frozen=True)
class TrainResult:
    adapter_dir: str
    first_val_loss: float | None
    best_val_loss: float | None
    final_val_loss: float | None
    best_step: int
    steps: int
    trainable_params: int
    tokens_per_sec: float
    peak_memory_gb: float
    duration_sec: float
    stopped_early: bool
    resumed_from_step: int = 0
    train_examples: int = 0
    val_examples: int = 0
    fingerprint: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- validation ----------------------------------------------------------------------------------------------


def validate_config(config: TrainConfig, train_path: Path, val_path: Path | None) -> None:
    """Raise TrainingConfigError naming the first problem, before any weights are loaded.

    Checks the numbers, the base model folder, and every example: it is tokenized with the base model's own
    processor, so an over-long sequence or an image whose tokens do not match its features is caught here.
    """
    _check_numbers(config)
    model_path = resolve_base_model(config.base_model)
    model_config = _read_model_config(model_path)
    processor = load_processor(model_path)
    train = prepare_examples(processor, model_config, Path(train_path), config)
    if not train:
        raise TrainingConfigError(f"the training set {train_path} is empty")
    if val_path is not None and Path(val_path).exists():
        prepare_examples(processor, model_config, Path(val_path), config)


def _check_numbers(config: TrainConfig) -> None:
    problems = []
    if config.lora_rank <= 0:
        problems.append(f"lora_rank must be positive (got {config.lora_rank})")
    if config.lora_alpha <= 0:
        problems.append(f"lora_alpha must be positive (got {config.lora_alpha})")
    if not 0 <= config.lora_dropout < 1:
        problems.append(f"lora_dropout must be in [0, 1) (got {config.lora_dropout})")
    if not config.target_modules and not config.train_vision:
        problems.append("target_modules is empty and train_vision is off: nothing would be trained")
    if config.quantize_bits not in (None, 4, 8):
        problems.append(f"quantize_bits must be None, 4 or 8 (got {config.quantize_bits})")
    if config.quantize_bits and config.train_vision:
        problems.append("train_vision needs a floating-point base; leave quantize_bits unset")
    if config.quantize_group_size not in (32, 64, 128):
        problems.append("quantize_group_size must be 32, 64 or 128")
    if config.dtype not in ("auto", "float32", "bfloat16", "float16"):
        problems.append(f"dtype must be auto, float32, bfloat16 or float16 (got {config.dtype!r})")
    if not (config.learning_rate > 0 and math.isfinite(config.learning_rate)):
        problems.append(f"learning_rate must be a positive number (got {config.learning_rate})")
    if not 0 <= config.min_learning_rate <= config.learning_rate:
        problems.append("min_learning_rate must be between 0 and learning_rate")
    if config.weight_decay < 0:
        problems.append("weight_decay must not be negative")
    if config.warmup_steps < 0:
        problems.append("warmup_steps must not be negative")
    if config.lr_schedule not in ("cosine", "constant"):
        problems.append(f"lr_schedule must be 'cosine' or 'constant' (got {config.lr_schedule!r})")
    if config.iters is None and config.epochs < 1:
        problems.append(f"epochs must be at least 1 (got {config.epochs})")
    if config.iters is not None and config.iters < 1:
        problems.append(f"iters must be at least 1 (got {config.iters})")
    for name in ("batch_size", "grad_accumulation", "report_interval", "eval_interval", "save_interval"):
        if getattr(config, name) < 1:
            problems.append(f"{name} must be at least 1 (got {getattr(config, name)})")
    if config.max_grad_norm is not None and config.max_grad_norm <= 0:
        problems.append("max_grad_norm must be positive or None")
    if config.max_seq_length < 8:
        problems.append(f"max_seq_length is too small (got {config.max_seq_length})")
    if config.early_stopping_patience is not None and config.early_stopping_patience < 1:
        problems.append("early_stopping_patience must be at least 1 or None")
    if problems:
        raise TrainingConfigError("; ".join(problems))


def resolve_base_model(base_model: str) -> Path:
    """The local folder of the base model; a hub id is fetched (or found in the cache) through mlx-vlm."""
    if not base_model:
        raise TrainingConfigError("base_model is not set")
    path = Path(base_model).expanduser()
    if not path.exists():
        looks_like_hub_id = base_model.count("/") == 1 and not base_model.startswith((".", "/", "~"))
        if not looks_like_hub_id:
            raise TrainingConfigError(f"base model folder {base_model} does not exist")
        try:
            from mlx_vlm.utils import get_model_path

            path = Path(get_model_path(base_model))
        except Exception as exc:  # offline, unknown repo, no access: all mean "cannot use this base"
            message = f"base model {base_model!r} is neither a folder nor a reachable hub id: {exc}"
            raise TrainingConfigError(message) from exc
    if not path.is_dir():
        raise TrainingConfigError(f"base model path {path} is not a folder")
    return path


def _read_model_config(model_path: Path) -> dict:
    config_file = model_path / "config.json"
    if not config_file.is_file():
        raise TrainingConfigError(f"{model_path} is not a model folder: no config.json")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise TrainingConfigError(f"{config_file} is not valid JSON: {exc}") from exc
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise TrainingConfigError(
            f"{model_path} holds a {model_type!r} model; this trainer supports {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if not any(model_path.glob("*.safetensors")):
        raise TrainingConfigError(f"{model_path} has no *.safetensors weights")
    if not (model_path / "tokenizer.json").is_file() and not (model_path / "tokenizer_config.json").is_file():
        raise TrainingConfigError(f"{model_path} has no tokenizer")
    return config


def load_processor(model_path: Path) -> Any:
    import importlib

    from mlx_vlm.utils import load_processor as mlx_vlm_load_processor

    importlib.import_module("mlx_vlm.models.qwen3_vl")  # registers the Qwen3-VL processor with transformers
    try:
        return mlx_vlm_load_processor(model_path, add_detokenizer=False)
    except Exception as exc:
        raise TrainingConfigError(f"cannot load the processor of {model_path}: {exc}") from exc


# --- data ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One tokenized conversation: `loss_mask[i]` is 1 where token i is a training target."""

    input_ids: np.ndarray  # (L,) int32
    loss_mask: np.ndarray  # (L,) int32
    pixel_values: np.ndarray | None  # (patches, C * t * p * p) float32
    image_grid_thw: np.ndarray | None  # (images, 3) int64
    source: str = ""

    @property
    def num_answer_tokens(self) -> int:
        return int(self.loss_mask.sum())


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with Path(path).open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise TrainingConfigError(f"{path}:{number} is not valid JSON: {exc}") from exc
    return rows


def prepare_examples(processor: Any, model_config: dict, path: Path, config: TrainConfig) -> list[Example]:
    if not path.is_file():
        raise TrainingConfigError(f"data file {path} does not exist")
    return [
        encode_example(processor, model_config, _resolve_images(row, path.parent), config, where=f"{path}:{i}")
        for i, row in enumerate(read_jsonl(path), 1)
    ]


def _resolve_images(row: object, folder: Path) -> object:
    """Relative image paths are relative to the JSONL file's folder (as mlx_vlm.train reads them)."""
    if isinstance(row, dict) and isinstance(row.get("images"), list):
        images = [str(folder / i) if isinstance(i, str) and not Path(i).is_absolute() else i for i in row["images"]]
        return {**row, "images": images}
    return row


def encode_example(
    processor: Any, model_config: dict, row: object, config: TrainConfig, *, where: str = "example"
) -> Example:
    """Tokenize one row exactly as generation will see it, and mark the answer tokens.

    The prompt (everything up to the assistant's turn, with the generation prompt) is encoded on its own; it must
    be a token prefix of the full conversation, and the tokens after it are the answer.
    """
    from mlx_vlm.prompt_utils import apply_chat_template

    messages, images = _check_row(row, where)
    full_text = apply_chat_template(
        processor, model_config, messages, add_generation_prompt=False, num_images=len(images)
    )
    prompt_text = apply_chat_template(
        processor, model_config, messages[:-1], add_generation_prompt=True, num_images=len(images)
    )
    full = _model_inputs(processor, model_config, full_text, images, where)
    prompt = _model_inputs(processor, model_config, prompt_text, images, where)
    ids = np.asarray(full["input_ids"]).reshape(-1).astype(np.int32)
    prompt_ids = np.asarray(prompt["input_ids"]).reshape(-1)
    if len(prompt_ids) >= len(ids) or not np.array_equal(ids[: len(prompt_ids)], prompt_ids):
        raise TrainingConfigError(
            f"{where}: the prompt does not tokenize as a prefix of the conversation, so the answer cannot be "
            "located (chat template or tokenizer not prefix-stable)"
        )

    grid = None if full.get("image_grid_thw") is None else np.asarray(full["image_grid_thw"]).reshape(-1, 3)
    image_token = model_config.get("image_token_id")
    n_image_tokens = int((ids == image_token).sum())
    if images:
        merge = model_config.get("vision_config", {}).get("spatial_merge_size", 2)
        expected = 0 if grid is None else int(sum(int(np.prod(g)) // merge**2 for g in grid))
        if n_image_tokens != expected:
            raise TrainingConfigError(
                f"{where}: {n_image_tokens} image tokens in the text but {expected} image features "
                "(tokenizer does not keep <|image_pad|> as one token?)"
            )
    if len(ids) > config.max_seq_length:
        last_image = int(np.flatnonzero(ids == image_token).max()) if n_image_tokens else -1
        cut = "it would cut image tokens" if last_image >= config.max_seq_length else "it would cut the answer"
        raise TrainingConfigError(
            f"{where}: {len(ids)} tokens exceed max_seq_length={config.max_seq_length} ({cut}); "
            "raise max_seq_length or shorten the example"
        )

    # Targets: the answer through its end-of-turn token (what generation must produce before it stops), not the
    # template's trailing newline; with answer_only_loss off, the prompt's text tokens too.
    end = len(ids)
    stops = np.flatnonzero(np.isin(ids[len(prompt_ids) :], _stop_ids(processor, model_config)))
    if stops.size:
        end = len(prompt_ids) + int(stops[0]) + 1
    mask = np.zeros(len(ids), np.int32)
    mask[len(prompt_ids) if config.answer_only_loss else 1 : end] = 1
    mask[ids == image_token] = 0  # image placeholders are inputs, never targets
    pixels = full.get("pixel_values")
    return Example(
        input_ids=ids,
        loss_mask=mask,
        pixel_values=None if pixels is None else np.asarray(pixels, dtype=np.float32),
        image_grid_thw=grid,
        source=where,
    )


def _stop_ids(processor: Any, model_config: dict) -> list[int]:
    eos = model_config.get("eos_token_id")
    ids = list(eos) if isinstance(eos, list) else ([eos] if eos is not None else [])
    tokenizer_eos = getattr(getattr(processor, "tokenizer", processor), "eos_token_id", None)
    return [int(i) for i in ids + ([tokenizer_eos] if tokenizer_eos is not None else [])]


def _check_row(row: object, where: str) -> tuple[list[dict], list[str]]:
    if not isinstance(row, dict):
        raise TrainingConfigError(f"{where}: a row must be a JSON object")
    messages = row.get("messages")
    images = row.get("images", [])
    if not isinstance(messages, list) or len(messages) < 2:
        raise TrainingConfigError(f"{where}: 'messages' must hold a user turn and an assistant turn")
    if not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant":
        raise TrainingConfigError(f"{where}: the last message must be the assistant's answer")
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise TrainingConfigError(f"{where}: 'images' must be a list of file paths")
    image_parts = sum(
        1
        for m in messages
        if isinstance(m.get("content"), list)
        for part in m["content"]
        if isinstance(part, dict) and part.get("type") in ("image", "image_url", "input_image")
    )
    if image_parts != len(images):
        raise TrainingConfigError(
            f"{where}: {len(images)} image file(s) but {image_parts} image part(s) in the messages"
        )
    for image in images:
        if not Path(image).is_file():
            raise TrainingConfigError(f"{where}: image {image} does not exist")
    return messages, images


def _model_inputs(processor: Any, model_config: dict, text: str, images: list[str], where: str) -> dict:
    from mlx_vlm.utils import prepare_inputs, should_add_special_tokens

    try:
        return prepare_inputs(
            processor,
            images=images or None,
            prompts=text,
            image_token_index=model_config.get("image_token_id"),
            add_special_tokens=should_add_special_tokens(model_config["model_type"], processor),
        )
    except Exception as exc:
        raise TrainingConfigError(f"{where}: the processor rejected the example: {exc}") from exc


def collate(examples: list[Example], pad_id: int) -> dict:
    """Right-pad a batch; padding is neither attended to by real tokens (causal) nor a target."""
    import mlx.core as mx

    length = max(len(e.input_ids) for e in examples)
    ids = np.full((len(examples), length), pad_id, np.int32)
    mask = np.zeros((len(examples), length), np.int32)
    for row, e in enumerate(examples):
        ids[row, : len(e.input_ids)] = e.input_ids
        mask[row, : len(e.loss_mask)] = e.loss_mask
    batch = {"input_ids": mx.array(ids), "loss_mask": mx.array(mask), "pixel_values": None, "image_grid_thw": None}
    with_images = [e for e in examples if e.pixel_values is not None]
    if with_images:
        batch["pixel_values"] = mx.array(np.concatenate([e.pixel_values for e in with_images]))
        batch["image_grid_thw"] = mx.array(np.concatenate([e.image_grid_thw for e in with_images]))
    return batch


def micro_batch(n_examples: int, batch_size: int, seed: int, index: int) -> list[int]:
    """The example indices of micro-batch `index` in the endless, seeded stream of epochs.

    Each epoch is a fresh permutation drawn from (seed, epoch), so any position in the stream can be recomputed
    after a restart without replaying the ones before it.
    """
    per_epoch = math.ceil(n_examples / batch_size)
    epoch, slot = divmod(index, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n_examples)
    return [int(i) for i in order[slot * batch_size : (slot + 1) * batch_size]]


# --- model ---------------------------------------------------------------------------------------------------


def load_base(config: TrainConfig) -> tuple[Any, Any]:
    """The base model and processor through mlx_vlm.load, cast to the training dtype."""
    from mlx_vlm import load

    model, processor = load(str(resolve_base_model(config.base_model)))
    dtype = _training_dtype(config.dtype)
    if dtype is not None:
        model.set_dtype(dtype)
    return model, processor


def _training_dtype(name: str) -> Any:
    import mlx.core as mx

    if name == "auto":
        # bf16 matmuls on the CPU are far slower than float32; on a GPU keep the checkpoint's dtype
        return mx.float32 if mx.default_device().type == mx.DeviceType.cpu else None
    return {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}[name]


def apply_lora(model: Any, config: TrainConfig) -> dict:
    """Freeze the base, optionally quantize it, attach LoRA; return the adapter_config mlx_vlm.load reads back."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_vlm.trainer.peft import LoRALinear, get_peft_model

    quantized: dict[str, dict] = {}
    if config.quantize_bits:
        group = config.quantize_group_size

        def quantizable(path: str, module: nn.Module) -> bool:
            return (
                path.startswith("language_model.")
                and isinstance(module, (nn.Linear, nn.Embedding))
                and module.weight.shape[-1] % group == 0
            )

        nn.quantize(model, group_size=group, bits=config.quantize_bits, class_predicate=quantizable)
        quantized = {
            name: {"group_size": m.group_size, "bits": m.bits, "mode": getattr(m, "mode", "affine")}
            for name, m in model.named_modules()
            if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
        }

    mx.random.seed(config.seed)  # LoRA A matrices are drawn from MLX's global generator
    model.freeze()
    keys: list[str] = []
    if config.target_modules:
        try:
            get_peft_model(
                model,
                list(config.target_modules),
                rank=config.lora_rank,
                alpha=config.lora_alpha,
                dropout=config.lora_dropout,
                freeze=True,
                verbose=False,
            )
        except ValueError as exc:
            raise TrainingConfigError(f"target_modules {list(config.target_modules)}: {exc}") from exc
        keys = [name for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    if config.train_vision:
        model.vision_tower.unfreeze()
    model.train()

    adapter_config: dict = {
        "fine_tune_type": "lora",
        "num_layers": -1,
        "lora_parameters": {
            "rank": config.lora_rank,
            "dropout": config.lora_dropout,
            "scale": config.lora_alpha / config.lora_rank,
            "keys": sorted(keys),
        },
        "lora_alpha": config.lora_alpha,
        "train_vision": config.train_vision,
    }
    if quantized:
        adapter_config["base_quantization"] = quantized
    return adapter_config


def count_trainable(model: Any) -> int:
    from mlx.utils import tree_flatten

    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


# --- loss ----------------------------------------------------------------------------------------------------


def loss_fn(model: Any, batch: dict) -> tuple[Any, Any]:
    """Mean next-token cross-entropy over the target tokens; also returns their count."""
    import mlx.core as mx
    import mlx.nn as nn

    inputs, targets = batch["input_ids"][:, :-1], batch["input_ids"][:, 1:]
    mask = batch["loss_mask"][:, 1:].astype(mx.float32)
    output = model(inputs, batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])
    logits = output.logits.astype(mx.float32)
    losses = nn.losses.cross_entropy(logits, targets) * mask
    ntoks = mask.sum()
    return losses.sum() / mx.maximum(ntoks, 1.0), ntoks


def evaluate(model: Any, examples: list[Example], batch_size: int, pad_id: int) -> float:
    """Token-weighted mean loss over `examples` (dropout off)."""
    import mlx.core as mx

    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    for start in range(0, len(examples), batch_size):
        loss, ntoks = loss_fn(model, collate(examples[start : start + batch_size], pad_id))
        mx.eval(loss, ntoks)
        total += loss.item() * ntoks.item()
        count += ntoks.item()
    if was_training:
        model.train()
    return total / max(count, 1.0)


def learning_rate_schedule(config: TrainConfig, total_steps: int) -> Callable[[Any], Any]:
    import mlx.core as mx
    import mlx.optimizers as optim

    warmup = min(config.warmup_steps, max(total_steps - 1, 0))
    if config.lr_schedule == "cosine":
        main = optim.cosine_decay(config.learning_rate, max(total_steps - warmup, 1), config.min_learning_rate)
    else:
        main = lambda step: mx.array(config.learning_rate)  # noqa: E731  (optimizers want an array)
    if warmup <= 1:
        return main
    # step k < warmup runs at (k + 1) / warmup of the peak rate
    ramp = optim.linear_schedule(config.learning_rate / warmup, config.learning_rate, warmup - 1)
    return optim.join_schedules([ramp, main], [warmup])


# --- checkpoints ---------------------------------------------------------------------------------------------


def run_fingerprint(config: TrainConfig, train_jsonl: Path, val_jsonl: Path | None, data_version: str) -> str:
    """What a checkpoint must match to be resumed: the config, the data version and the data files' bytes."""
    digest = hashlib.sha256()
    payload = {"format": CHECKPOINT_FORMAT, "config": config.to_dict(), "data_version": data_version}
    digest.update(json.dumps(payload, sort_keys=True).encode())
    for path in (train_jsonl, val_jsonl):
        digest.update(Path(path).read_bytes() if path is not None and Path(path).exists() else b"-")
    return digest.hexdigest()[:16]


def checkpoint_root(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.checkpoints"


@dataclass
class LoopState:
    """Everything besides weights that a resumed run needs to continue exactly."""

    step: int = 0
    first_val_loss: float | None = None
    best_val_loss: float | None = None
    best_step: int = 0
    last_val_loss: float | None = None
    evals_without_improvement: int = 0
    stopped_early: bool = False
    trained_tokens: int = 0
    train_seconds: float = 0.0
    log: list[Report] = field(default_factory=list)


def save_checkpoint(run_dir: Path, model: Any, optimizer: Any, best_weights: dict, state: LoopState) -> None:
    """Write `run_dir/step_<N>` atomically, then drop older checkpoints."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    final = run_dir / f"step_{state.step:07d}"
    with atomic.staged_dir(final) as stage:
        mx.save_safetensors(str(stage / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
        mx.save_safetensors(str(stage / "best_adapters.safetensors"), best_weights)
        mx.save_safetensors(str(stage / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
        (stage / "state.json").write_text(json.dumps(dataclasses.asdict(state)))
    for old in run_dir.glob("step_*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    candidates = sorted(p for p in run_dir.glob("step_*") if (p / "state.json").is_file())
    return candidates[-1] if candidates else None


def load_checkpoint(path: Path, model: Any, optimizer: Any) -> tuple[dict, LoopState]:
    import mlx.core as mx
    from mlx.utils import tree_unflatten

    model.load_weights(str(path / "adapters.safetensors"), strict=False)
    optimizer.state = tree_unflatten(list(mx.load(str(path / "optimizer.safetensors")).items()))
    best = dict(mx.load(str(path / "best_adapters.safetensors")))
    state = LoopState(**json.loads((path / "state.json").read_text()))
    return best, state


# --- the loop ------------------------------------------------------------------------------------------------


def train_lora(
    config: TrainConfig,
    train_jsonl: Path,
    val_jsonl: Path | None,
    out_dir: Path,
    *,
    data_version: str,
    on_report: ReportFn | None = None,
) -> TrainResult:
    """Fine-tune a LoRA adapter and write it to `out_dir` (atomically). Resumes from a matching checkpoint."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten

    started = time.perf_counter()
    out_dir, train_jsonl = Path(out_dir), Path(train_jsonl)
    val_jsonl = Path(val_jsonl) if val_jsonl is not None else None
    _check_numbers(config)
    fingerprint = run_fingerprint(config, train_jsonl, val_jsonl, data_version)
    run_dir = checkpoint_root(out_dir) / fingerprint

    # Load the base and its processor, tokenize the data, freeze the base, attach LoRA.
    model, processor = load_base(config)
    model_config = _read_model_config(resolve_base_model(config.base_model))
    train_set = prepare_examples(processor, model_config, train_jsonl, config)
    val_set = prepare_examples(processor, model_config, val_jsonl, config) if val_jsonl and val_jsonl.exists() else []
    if not train_set:
        raise TrainingConfigError(f"the training set {train_jsonl} is empty")
    tokenizer = processor.tokenizer
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    adapter_config = apply_lora(model, config)
    if config.grad_checkpointing:
        from mlx_vlm.trainer import grad_checkpoint

        grad_checkpoint(model.language_model.model.layers[0])
    trainable = count_trainable(model)

    # AdamW with warm-up and schedule; continue from this run's latest checkpoint if there is one.
    micro_per_epoch = math.ceil(len(train_set) / config.batch_size)
    total_steps = config.iters or math.ceil(config.epochs * micro_per_epoch / config.grad_accumulation)
    schedule = learning_rate_schedule(config, total_steps)
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=config.weight_decay)
    optimizer.init(model.trainable_parameters())
    state, best = LoopState(), dict(tree_flatten(model.trainable_parameters()))
    if (checkpoint := latest_checkpoint(run_dir)) is not None:
        best, state = load_checkpoint(checkpoint, model, optimizer)
    resumed_from = state.step
    log = TrainingLog(run_dir / "training_log.jsonl", state.log, on_report)

    if state.step == 0 and val_set:
        state.first_val_loss = track_validation(model, val_set, state, best, config, pad_id)
        log.write({"step": 0, "epoch": 0.0, "val_loss": state.first_val_loss, "trainable_params": trainable})

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    window = Window(time.perf_counter())
    while state.step < total_steps and not state.stopped_early:
        tick = time.perf_counter()
        grads, loss_sum, targets, tokens = accumulate_gradients(
            model, loss_and_grad, train_set, config, state.step, pad_id
        )
        if config.max_grad_norm is not None:
            grads, _ = optim.clip_grad_norm(grads, config.max_grad_norm)
        optimizer.update(model, grads)
        mx.eval(model.trainable_parameters(), optimizer.state)
        state.step += 1
        seconds = time.perf_counter() - tick
        state.trained_tokens, state.train_seconds = state.trained_tokens + tokens, state.train_seconds + seconds
        window.add(loss_sum, targets, tokens, seconds)

        val_loss = None
        if state.step % config.eval_interval == 0 or state.step == total_steps:
            val_loss = track_validation(model, val_set, state, best, config, pad_id)
        if state.step % config.report_interval == 0 or val_loss is not None or state.stopped_early:
            entry = window.flush(state.step, total_steps - state.step, state.step - resumed_from)
            entry |= {
                "epoch": round(state.step * config.grad_accumulation / micro_per_epoch, 3),
                "learning_rate": float(schedule(mx.array(state.step - 1)).item()),
            }
            log.write(entry | ({"val_loss": val_loss} if val_loss is not None else {}))
        if state.step % config.save_interval == 0 and state.step < total_steps and not state.stopped_early:
            save_checkpoint(run_dir, model, optimizer, best, state)

    # The adapter keeps the best-val-loss weights (the last ones when there is no validation set).
    result = TrainResult(
        adapter_dir=str(out_dir),
        first_val_loss=state.first_val_loss,
        best_val_loss=state.best_val_loss,
        final_val_loss=state.last_val_loss,
        best_step=state.best_step if val_set else state.step,
        steps=state.step,
        trainable_params=trainable,
        tokens_per_sec=state.trained_tokens / max(state.train_seconds, 1e-9),
        peak_memory_gb=mx.get_peak_memory() / 1e9,
        duration_sec=time.perf_counter() - started,
        stopped_early=state.stopped_early,
        resumed_from_step=resumed_from,
        train_examples=len(train_set),
        val_examples=len(val_set),
        fingerprint=fingerprint,
    )
    weights = best if val_set else dict(tree_flatten(model.trainable_parameters()))
    adapter_config |= {
        "base_model": config.base_model,
        "data_version": data_version,
        "mondrian_assets_version": package_version(),
        "fingerprint": fingerprint,
        "best_step": result.best_step,
    }
    training_args = {
        "config": config.to_dict(),
        "data_version": data_version,
        "train_jsonl": str(train_jsonl),
        "val_jsonl": str(val_jsonl) if val_jsonl else None,
        "result": result.to_dict(),
    }
    write_adapter(out_dir, weights, adapter_config, training_args, state.log)
    shutil.rmtree(run_dir, ignore_errors=True)
    with contextlib.suppress(OSError):
        checkpoint_root(out_dir).rmdir()  # only when no other run keeps checkpoints there
    return result


def accumulate_gradients(
    model: Any, loss_and_grad: Callable, train_set: list[Example], config: TrainConfig, step: int, pad_id: int
) -> tuple[dict, float, float, int]:
    """Gradients of one optimizer step, averaged over the target tokens of its `grad_accumulation` micro-batches.

    Returns (gradients, summed loss, target tokens, input tokens). Batch contents and dropout draws depend only on
    the seed and the position in the stream, so a resumed run sees exactly what an uninterrupted one saw.
    """
    import mlx.core as mx
    from mlx.utils import tree_map

    grads: dict | None = None
    loss_sum, targets, tokens = 0.0, 0.0, 0
    for k in range(config.grad_accumulation):
        index = step * config.grad_accumulation + k
        mx.random.seed(config.seed * 1_000_003 + index)
        examples = [train_set[i] for i in micro_batch(len(train_set), config.batch_size, config.seed, index)]
        (loss, ntoks), g = loss_and_grad(model, collate(examples, pad_id))
        g = tree_map(lambda x: x * ntoks, g)
        grads = g if grads is None else tree_map(lambda a, b: a + b, grads, g)
        mx.eval(loss, ntoks, grads)
        loss_sum += loss.item() * ntoks.item()
        targets += ntoks.item()
        tokens += sum(len(e.input_ids) for e in examples)
    assert grads is not None
    return tree_map(lambda x: x / max(targets, 1.0), grads), loss_sum, targets, tokens


def track_validation(
    model: Any, val_set: list[Example], state: LoopState, best: dict, config: TrainConfig, pad_id: int
) -> float | None:
    """Evaluate; keep the best weights in `best` and count evaluations without improvement for early stopping."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    if not val_set:
        return None
    value = evaluate(model, val_set, config.batch_size, pad_id)
    state.last_val_loss = value
    if state.best_val_loss is None or value < state.best_val_loss:
        state.best_val_loss, state.best_step, state.evals_without_improvement = value, state.step, 0
        best.clear()
        best.update(tree_flatten(model.trainable_parameters()))
        mx.eval(best)
    else:
        state.evals_without_improvement += 1
        patience = config.early_stopping_patience
        state.stopped_early = patience is not None and state.evals_without_improvement >= patience
    return value


@dataclass
class Window:
    """Training statistics since the last report."""

    loop_started: float
    loss_sum: float = 0.0
    targets: float = 0.0
    tokens: int = 0
    seconds: float = 0.0

    def add(self, loss_sum: float, targets: float, tokens: int, seconds: float) -> None:
        self.loss_sum += loss_sum
        self.targets += targets
        self.tokens += tokens
        self.seconds += seconds

    def flush(self, step: int, steps_left: int, steps_done_here: int) -> Report:
        import mlx.core as mx

        entry: Report = {
            "step": step,
            "train_loss": self.loss_sum / max(self.targets, 1.0),
            "tokens_per_sec": self.tokens / max(self.seconds, 1e-9),
            "peak_memory_gb": mx.get_peak_memory() / 1e9,
            "eta_sec": steps_left * (time.perf_counter() - self.loop_started) / max(steps_done_here, 1),
        }
        self.loss_sum, self.targets, self.tokens, self.seconds = 0.0, 0.0, 0, 0.0
        return entry


class TrainingLog:
    """Report lines: kept in the loop state (checkpointed), appended to a file as they come, passed to on_report."""

    def __init__(self, path: Path, entries: list[Report], on_report: ReportFn | None) -> None:
        self.path, self.entries, self.on_report = path, entries, on_report
        # a resumed run drops the lines written after the checkpoint it resumes from
        atomic.write_jsonl(path, entries)

    def write(self, entry: Report) -> None:
        self.entries.append(entry)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
        if self.on_report is not None:
            self.on_report(entry)


def write_adapter(out_dir: Path, weights: dict, adapter_config: dict, training_args: dict, log: list[Report]) -> None:
    """The adapter folder `mlx_vlm.load(base, adapter_path=out_dir)` reads, written in one atomic rename."""
    import mlx.core as mx

    with atomic.staged_dir(out_dir) as stage:
        mx.save_safetensors(str(stage / "adapters.safetensors"), weights)
        _write_json(stage / "adapter_config.json", adapter_config)
        _write_json(stage / "training_args.json", training_args)
        (stage / "training_log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in log))


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mondrian-assets")
    except PackageNotFoundError:
        return "0+unknown"


def _write_json(path: Path, value: object) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


# --- isolation -----------------------------------------------------------------------------------------------

PROTOCOL_PREFIX = "@@mondrian-train@@ "
_STDERR_TAIL_LINES = 60


def run_training_subprocess(
    config: TrainConfig,
    train_jsonl: Path,
    val_jsonl: Path | None,
    out_dir: Path,
    *,
    data_version: str,
    on_report: ReportFn | None = None,
    on_start: Callable[[int], None] | None = None,
    env: dict[str, str] | None = None,
) -> TrainResult:
    """`train_lora` in a child Python process; its reports stream back to `on_report`.

    A crash of the child (a segfault in MLX, the OOM killer, an exception) raises TrainingFailed with its exit
    code or signal and the tail of its stderr; the caller's process is untouched. `on_start` receives the child's
    pid. If the caller is interrupted, the child is terminated.
    """
    request = {
        "config": config.to_dict(),
        "train_jsonl": str(train_jsonl),
        "val_jsonl": str(val_jsonl) if val_jsonl is not None else None,
        "out_dir": str(out_dir),
        "data_version": data_version,
    }
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="mondrian-train-", delete=False) as f:
        json.dump(request, f)
        request_path = f.name
    child = subprocess.Popen(
        [sys.executable, "-m", "mondrian_assets.core.train_worker", request_path],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
        env={**os.environ, **(env or {})},
    )
    stderr_tail: deque[str] = deque(maxlen=_STDERR_TAIL_LINES)
    drain = threading.Thread(target=lambda: stderr_tail.extend(child.stderr or ()), daemon=True)
    drain.start()
    result: dict | None = None
    error: dict | None = None
    try:
        if on_start is not None:
            on_start(child.pid)
        for message in _protocol_messages(child.stdout):
            if message["type"] == "report" and on_report is not None:
                on_report(message["report"])
            elif message["type"] == "result":
                result = message["result"]
            elif message["type"] == "error":
                error = message
        returncode = child.wait()
    except BaseException:
        _stop(child)
        raise
    finally:
        drain.join(timeout=5)
        os.unlink(request_path)
    tail = "".join(stderr_tail)
    if error is not None:
        exc_type = TrainingConfigError if error.get("kind") == "config" else TrainingFailed
        if exc_type is TrainingConfigError:
            raise TrainingConfigError(error["message"])
        raise TrainingFailed(f"training failed: {error['message']}", returncode=returncode, stderr_tail=tail)
    if returncode != 0 or result is None:
        if returncode < 0:
            how = f"was killed by signal {signal.Signals(-returncode).name}"
        else:
            how = f"exited with code {returncode}"
        raise TrainingFailed(
            f"the training process {how}; last stderr lines:\n{tail}", returncode=returncode, stderr_tail=tail
        )
    return TrainResult(**result)


def _protocol_messages(stream: Any) -> Iterator[dict]:
    for line in stream:
        if line.startswith(PROTOCOL_PREFIX):
            yield json.loads(line[len(PROTOCOL_PREFIX) :])


def _stop(child: subprocess.Popen) -> None:
    if child.poll() is None:
        child.terminate()
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
