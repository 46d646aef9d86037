"""The base model in its training dtype, frozen, optionally quantized, with LoRA attached."""

from __future__ import annotations

import functools
from typing import Any

from mondrian_assets.core.training.config import TrainConfig, TrainingConfigError, resolve_base_model
from mondrian_assets.core.training.speed import SpeedOptions


def load_trainable_model(config: TrainConfig, options: SpeedOptions) -> tuple[Any, Any, dict]:
    """Everything before the first step: the base in its training dtype with LoRA attached (`apply_lora`) and
    gradient checkpointing if asked. Returns (model, processor, adapter_config)."""
    model, processor = load_base(config)
    adapter_config = apply_lora(model, config, options)
    if config.grad_checkpointing:
        from mlx_vlm.trainer import grad_checkpoint

        grad_checkpoint(model.language_model.model.layers[0])  # patches the layer class: every layer
    return model, processor, adapter_config


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


def apply_lora(model: Any, config: TrainConfig, options: SpeedOptions) -> dict:
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
        if options.lora_in_activation_dtype:
            for _, module in model.named_modules():
                if type(module) is LoRALinear:
                    module.__class__ = _activation_dtype_lora()  # same parameters, same saved adapter
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


@functools.cache
def _activation_dtype_lora() -> type:
    """mlx-vlm's LoRALinear, computing its two small matmuls in the activations' dtype.

    Its own forward multiplies the (bf16) input by the float32 A, which casts every adapted layer's input to a
    float32 copy that the backward pass keeps: seven per decoder layer. Casting A and B down instead keeps them
    float32 for the optimizer (mixed precision) and changes nothing where activations are float32 (the CPU).
    """
    from mlx_vlm.trainer.peft import LoRALinear

    class ActivationDtypeLoRALinear(LoRALinear):
        def __call__(self, x: Any) -> Any:
            update = (self.dropout(x) @ self.lora_a.astype(x.dtype)) @ self.lora_b.astype(x.dtype)
            return self.linear(x) + (self.scale * update).astype(x.dtype)

    return ActivationDtypeLoRALinear
