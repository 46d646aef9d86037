"""The base model in its training dtype, frozen, optionally quantized, with LoRA attached."""

from __future__ import annotations

from typing import Any

from mondrian_assets.core.training.config import TrainConfig, TrainingConfigError, resolve_base_model


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
