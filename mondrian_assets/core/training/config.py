"""What a training run is given: `TrainConfig` and its checks, the base model folder, the processor."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from mondrian_assets.core.base_model import BaseModelError, resolve_base
from mondrian_assets.core.isolation import ChildProcessFailed
from mondrian_assets.core.settings import bound_violations

Report = dict[str, Any]
ReportFn = Callable[[Report], None]

SUPPORTED_MODEL_TYPES = ("qwen3_vl",)
LANGUAGE_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class TrainingConfigError(ValueError):
    """The config or the data cannot produce a meaningful training run; the message says which and why."""


class TrainingFailed(ChildProcessFailed):
    """The training child process died (crash, signal, or an error it reported)."""


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a run, with its description and bounds (the `mlx_trainer` resource is generated from these).
    The defaults are calibrated for the embedded tiny model on the demo's largest advisor (4 epochs of ~125
    examples: ~3 CPU-minutes, every val output parses); for a real 4B base lower learning_rate (~1e-4) and
    expect far slower steps."""

    base_model: str = ""  # the base model's local folder (the resource resolves a hub id to it)
    dtype: Annotated[str, Field(description=(
        "auto (float32 on the CPU, the checkpoint's own dtype on a GPU), float32, bfloat16 or float16."))] = "auto"
    lora_rank: Annotated[int, Field(ge=1, description="LoRA rank r.")] = 16
    lora_alpha: Annotated[float, Field(gt=0, description="LoRA alpha (the update is scaled by alpha / r).")] = 32.0
    lora_dropout: Annotated[float, Field(ge=0, lt=1, description="Dropout on the LoRA input.")] = 0.0
    target_modules: Annotated[tuple[str, ...], Field(description=(
        "Language-model projections that get LoRA."))] = LANGUAGE_PROJECTIONS
    train_vision: Annotated[bool, Field(description="Also fully train the vision tower.")] = False
    quantize_bits: Annotated[int | None, Field(description=(
        "4 or 8: quantize the frozen base (QLoRA); empty: keep it as loaded."))] = None
    quantize_group_size: Annotated[int, Field(description="Quantization group size: 32, 64 or 128.")] = 64
    learning_rate: Annotated[float, Field(gt=0, allow_inf_nan=False, description=(
        "Peak learning rate (the default suits the embedded tiny model; ~1e-4 for a 4B base)."))] = 1e-3
    min_learning_rate: Annotated[float, Field(ge=0, description="Where the cosine schedule ends.")] = 1e-4
    weight_decay: Annotated[float, Field(ge=0, description="AdamW weight decay.")] = 0.0
    warmup_steps: Annotated[int, Field(ge=0, description="Linear warm-up steps.")] = 10
    lr_schedule: Annotated[str, Field(description="cosine or constant (after warm-up).")] = "cosine"
    epochs: Annotated[int, Field(ge=1, description="Passes over the training set (unless iters is set).")] = 4
    iters: Annotated[int | None, Field(ge=1, description="Optimizer steps; overrides epochs.")] = None
    batch_size: Annotated[int, Field(ge=1, description="Examples per micro-batch.")] = 1
    grad_accumulation: Annotated[int, Field(ge=1, description="Micro-batches per optimizer step.")] = 1
    max_grad_norm: Annotated[float | None, Field(gt=0, description=(
        "Clip the gradient norm to this; empty: no clipping."))] = 1.0
    grad_checkpointing: Annotated[bool, Field(description="Recompute activations in backward (less memory).")] = False
    max_seq_length: Annotated[int, Field(ge=8, description=(
        "Longest example in tokens (image tokens included); a longer one is refused, never cut."))] = 2048
    answer_only_loss: Annotated[bool, Field(description="Loss on the answer tokens only.")] = True
    seed: Annotated[int, Field(ge=0, description="Seed of the data order, LoRA init and dropout.")] = 0
    report_interval: Annotated[int, Field(ge=1, description="Steps between progress reports.")] = 10
    eval_interval: Annotated[int, Field(ge=1, description="Steps between validation-loss evaluations.")] = 60
    save_interval: Annotated[int, Field(ge=1, description="Steps between resumable checkpoints.")] = 60
    early_stopping_patience: Annotated[int | None, Field(ge=1, description=(
        "Evaluations without a new best validation loss before stopping; empty: never stop early."))] = 3

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
    from mondrian_assets.core.training.examples import prepare_examples  # examples import this module

    check_numbers(config)
    model_path = resolve_base_model(config.base_model)
    model_config = read_model_config(model_path)
    if model_config.get("quantization") and config.quantize_bits:
        raise TrainingConfigError(
            f"the base is already quantized ({model_config['quantization'].get('bits')}-bit); leave quantize_bits unset"
        )
    processor = load_processor(model_path)
    train = prepare_examples(processor, model_config, Path(train_path), config)
    if not train:
        raise TrainingConfigError(f"the training set {train_path} is empty")
    if val_path is not None and Path(val_path).exists():
        prepare_examples(processor, model_config, Path(val_path), config)


def check_numbers(config: TrainConfig) -> None:
    """The declared bounds of each field, then the rules that tie fields together."""
    problems = bound_violations(config)
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
    if not config.min_learning_rate <= config.learning_rate:
        problems.append("min_learning_rate must not exceed learning_rate")
    if config.lr_schedule not in ("cosine", "constant"):
        problems.append(f"lr_schedule must be 'cosine' or 'constant' (got {config.lr_schedule!r})")
    if problems:
        raise TrainingConfigError("; ".join(problems))


def resolve_base_model(base_model: str) -> Path:
    """The base model's local folder (see `core.base_model`); a problem is a config error of this run."""
    try:
        return resolve_base(base_model).path
    except BaseModelError as exc:
        raise TrainingConfigError(str(exc)) from exc


def read_model_config(model_path: Path) -> dict:
    config = json.loads((resolve_base_model(str(model_path)) / "config.json").read_text())
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
