"""Load a base model, optionally with a LoRA adapter that is verified and fused, for inference."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten


class AdapterNotApplied(RuntimeError):
    """The adapter's weights did not end up in the model: refusing to evaluate the base under its name."""


@dataclass
class LoadedModel:
    model: nn.Module
    processor: Any
    base_model: str
    adapter_path: Path | None
    fused_layers: int = 0
    load_s: float = 0.0
    adapter_tensors: int = 0  # adapter tensors verified to hold their saved values before fusing

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def label(self) -> str:
        return "base" if self.adapter_path is None else f"base+{self.adapter_path.name}"


def _adapter_weights_file(adapter_path: Path) -> Path:
    if adapter_path.is_file():
        return adapter_path
    for name in ("adapters.safetensors", "weights.safetensors"):
        if (adapter_path / name).is_file():
            return adapter_path / name
    raise FileNotFoundError(f"no adapters.safetensors in {adapter_path}")


def verify_adapter_applied(model: nn.Module, adapter_path: Path) -> int:
    """Every tensor in the adapter file must be a model parameter holding exactly that value. Returns the count.
    (mlx-vlm loads adapter weights with strict=False, so a key mismatch would otherwise go unnoticed.)"""
    saved = mx.load(str(_adapter_weights_file(adapter_path)))
    params = dict(tree_flatten(model.parameters()))
    if not saved:
        raise AdapterNotApplied(f"{adapter_path} holds no tensors")
    missing = sorted(k for k in saved if k not in params)
    if missing:
        raise AdapterNotApplied(f"{len(missing)} adapter tensors match no model parameter, e.g. {missing[:3]}")
    differing = [k for k, v in saved.items() if params[k].shape != v.shape or not mx.array_equal(params[k], v).item()]
    if differing:
        raise AdapterNotApplied(f"{len(differing)} adapter tensors were not loaded, e.g. {differing[:3]}")
    return len(saved)


def _is_lora_module(module: nn.Module) -> bool:
    return callable(getattr(module, "fuse", None)) and ("lora_a" in module or "lora_b" in module)


def fuse_lora(model: nn.Module) -> int:
    """Replace every LoRA/DoRA layer by its fused equivalent (W + scale * B^T A^T), in place.

    Uses each layer's own `fuse()` from mlx_vlm.trainer.peft (quantized bases stay quantized). mlx-vlm's
    `replace_lora_with_linear` only handles the legacy layer at the top level, so it is not used here.
    """
    fused = [(name, module.fuse()) for name, module in model.named_modules() if _is_lora_module(module)]
    if fused:
        model.update_modules(tree_unflatten(fused))
    leftover = [name for name, module in model.named_modules() if _is_lora_module(module)]
    if leftover:
        raise RuntimeError(f"LoRA layers left after fusing: {leftover[:3]}")
    return len(fused)


def _inference_dtype(name: str) -> mx.Dtype | None:
    """With "auto", as in training: float32 on the CPU (bf16 matmuls there are ~100x slower), else the checkpoint's."""
    if name == "auto":
        return mx.float32 if mx.default_device().type == mx.DeviceType.cpu else None
    return {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}[name]


def load_for_inference(
    base_model: str | Path, adapter_path: Path | None, *, fuse: bool = True, dtype: str = "auto"
) -> LoadedModel:
    """Load the base model (a local folder, or a hub id already in the cache), apply and verify the adapter,
    cast to the inference dtype, fuse the adapter into the weights, and switch to eval mode."""
    import mlx_vlm

    tic = time.perf_counter()
    adapter = Path(adapter_path) if adapter_path is not None else None
    model, processor = mlx_vlm.load(str(base_model), adapter_path=str(adapter) if adapter is not None else None)
    verified = verify_adapter_applied(model, adapter) if adapter is not None else 0
    target = _inference_dtype(dtype)
    if target is not None:
        model.set_dtype(target)
    fused = fuse_lora(model) if adapter is not None and fuse else 0
    model.eval()
    mx.eval(model.parameters())
    return LoadedModel(model, processor, str(base_model), adapter, fused, time.perf_counter() - tic, verified)
