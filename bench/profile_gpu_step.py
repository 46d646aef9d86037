"""Where our training step's time goes on a GPU, by taking it apart (no profiler reaches MLX's CUDA kernels here).

On the Qwen3-VL-4B-shaped checkpoint of bench_gpu_training.py, for one batch, medians of repeated runs of:
the forward loss alone, the loss with its gradients, the whole `TrainStep` (clip + AdamW + one evaluation), the
frozen vision tower alone, the same gradients with attention decomposed into plain matmuls and a softmax (instead of
`mx.fast.scaled_dot_product_attention`, whose backward is not a fused kernel on CUDA), and a bare bf16 matmul of a
decoder MLP's shape as the device's reachable matmul rate.

    python bench/profile_gpu_step.py --peers ../shared/gpu/peers --model-dir /tmp/m4b [--batch 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return round(statistics.median(times[1:]), 4)


def decomposed_attention(queries, keys, values, cache, scale, mask, sinks=None):
    """Causal attention as matmuls and a softmax (grouped-query heads repeated), differentiated op by op."""
    import mlx.core as mx

    repeats = queries.shape[1] // keys.shape[1]
    if repeats > 1:
        keys, values = mx.repeat(keys, repeats, axis=1), mx.repeat(values, repeats, axis=1)
    scores = (queries * scale) @ keys.swapaxes(-1, -2)
    length = queries.shape[2]
    causal = mx.arange(length)[:, None] >= mx.arange(keys.shape[2])[None, :]
    scores = mx.where(causal, scores, mx.array(-mx.inf, scores.dtype))
    return mx.softmax(scores, axis=-1, precise=True) @ values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=Path, required=True)
    parser.add_argument("--model-dir", type=Path, required=True, help="built by bench_gpu_training.py")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, help="default: the peers' 2048")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import mlx.core as mx
    import mlx.nn as nn
    import mlx_vlm.models.qwen3_vl.language as qwen3_vl_language

    from gpu_shapes import peer_shapes, training_examples
    from mondrian_assets.core.training import loop
    from mondrian_assets.core.training.config import TrainConfig
    from mondrian_assets.core.training.examples import collate
    from mondrian_assets.core.training.lora import load_trainable_model
    from mondrian_assets.core.training.speed import speed_options

    shapes = peer_shapes(args.peers.resolve())
    seq = args.seq or shapes.SEQ
    config = TrainConfig(base_model=str(args.model_dir), batch_size=args.batch, max_seq_length=seq, warmup_steps=0)
    options = speed_options()
    model, _, _ = load_trainable_model(config, options)
    model_config = json.loads((args.model_dir / "config.json").read_text())
    examples = training_examples(shapes, model_config, args.batch, seq, 0.35, seed=0)
    batch = collate(examples, int(model_config["pad_token_id"]), options.length_multiple, options.align_input)
    scale = 1.0 / batch["targets"]
    loss_and_grad = nn.value_and_grad(model, loop.loss_fn)
    optimizer, _ = loop.make_optimizer(config, 100, model)
    step = loop.TrainStep(model, optimizer, examples, config, int(model_config["pad_token_id"]), options)
    pixels = batch["pixel_values"].astype(mx.bfloat16)
    tokens = args.batch * seq

    a, b = mx.random.normal((tokens, 2560)).astype(mx.bfloat16), mx.random.normal((2560, 9728)).astype(mx.bfloat16)
    mx.eval(a, b)
    matmul_s = median_seconds(lambda: mx.eval(a @ b), 20)
    row = {
        "batch": args.batch, "seq": seq, "device": str(mx.default_device()),
        "matmul_tflops": round(2 * tokens * 2560 * 9728 / matmul_s / 1e12, 1),
        "forward_s": median_seconds(lambda: mx.eval(loop.loss_fn(model, batch, scale, options)), args.repeats),
        "forward_backward_s": median_seconds(lambda: mx.eval(loss_and_grad(model, batch, scale, options)), args.repeats),
        "train_step_s": median_seconds(lambda: step(0), args.repeats),
        "vision_tower_s": median_seconds(lambda: mx.eval(model.vision_tower(pixels, batch["image_grid_thw"])), args.repeats),
    }  # fmt: skip
    qwen3_vl_language.scaled_dot_product_attention = decomposed_attention
    row["forward_backward_decomposed_attention_s"] = median_seconds(
        lambda: mx.eval(loss_and_grad(model, batch, scale, options)), args.repeats
    )
    row["peak_gib"] = round(mx.get_peak_memory() / 2**30, 2)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
