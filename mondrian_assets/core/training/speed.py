"""How a training step computes on this device: choices that change speed and memory, not what is learnt.

Each was measured on its own on an H200 (bench/bench_gpu_training.py, numbers in bench/RESULTS.md). On the CPU
they reduce to the plain computation, so CPU results are those of the straightforward loop.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class SpeedOptions:
    # Sequence lengths and target-row counts are rounded up to a multiple of this. A GPU builds kernels and
    # matmul plans per shape, so a few shapes beat many; on the CPU padding only costs.
    length_multiple: int = 1
    # Round the model's input (the ids less the last, which the loop feeds) instead of the padded ids. MLX's CUDA
    # attention backward is cuDNN's fused kernel only for query lengths that are multiples of 128; at 2047 it
    # differentiates the unfused graph, 6x slower for that op (an H100, 2026-12-07: batch 4, 5,124 -> 9,740 tok/s).
    align_input: bool = False
    # Project only the positions whose next token is a target onto the 151k-wide vocabulary (the answer is about a
    # third of a sequence), instead of projecting every position and discarding most of the logits.
    answer_only_projection: bool = True
    # Feed the logits to cross-entropy in their own dtype: on a GPU the fused kernel accumulates in float32, so a
    # float32 copy of the logits is pure memory traffic. The CPU reduces in the logits' dtype: upcast there.
    upcast_logits: bool = True
    # LoRA matmuls in the activations' dtype (bf16 on a GPU) with float32 A and B, as mixed-precision training
    # does, instead of casting every adapted layer's input to float32 (and keeping that copy for the backward).
    lora_in_activation_dtype: bool = True

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def speed_options(**overrides: object) -> SpeedOptions:
    """The measured winners for the default device; `overrides` switch single levers (for the benchmarks)."""
    import mlx.core as mx

    on_gpu = mx.default_device().type == mx.DeviceType.gpu
    on_cuda = on_gpu and mx.cuda.is_available()
    # Metal keeps the 64 it was measured with; CUDA aligns the input to cuDNN's 128
    defaults = SpeedOptions(length_multiple=128 if on_cuda else 64 if on_gpu else 1, align_input=on_cuda,
                            upcast_logits=not on_gpu)  # fmt: skip
    return dataclasses.replace(defaults, **overrides)
