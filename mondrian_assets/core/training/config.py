"""What a training run is given: `TrainConfig` and its checks, the base model folder, the processor."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Report = dict[str, Any]
ReportFn = Callable[[Report], None]

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
    from mondrian_assets.core.training.examples import prepare_examples  # examples import this module

    check_numbers(config)
    model_path = resolve_base_model(config.base_model)
    model_config = read_model_config(model_path)
    processor = load_processor(model_path)
    train = prepare_examples(processor, model_config, Path(train_path), config)
    if not train:
        raise TrainingConfigError(f"the training set {train_path} is empty")
    if val_path is not None and Path(val_path).exists():
        prepare_examples(processor, model_config, Path(val_path), config)


def check_numbers(config: TrainConfig) -> None:
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


def read_model_config(model_path: Path) -> dict:
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
