"""Our LoRA training step on Qwen3-VL-4B shapes (random bf16 weights), side by side with transformers + PEFT.

Each variant runs in its own child process (its peak memory is its own; gradient checkpointing patches a class)
through the functions `lora_adapter` runs: `speed_options` (this device's defaults), `load_trainable_model` (load,
cast, freeze, quantize, LoRA, checkpointing), `make_optimizer` and `TrainStep` (micro-batches, loss, gradients,
clipping, AdamW update, one evaluation). One
448 x 448 image per 2048-token sequence as in the peer; the last 35% of each sequence is the answer (the loss
targets; the peer takes the loss on every position). A variant changes one lever against the defaults.

    python bench/bench_gpu_training.py --peers ../shared/gpu/peers [--only NAME ...] [--skip-peer]

Prints one JSON line per variant (tokens/s = batch x 2048 / median step time; peak memory in GiB) and a table of
ratios against the peer's best and against its gradient-checkpointing figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import gpu_runs  # noqa: E402 (found through the path above)

ANSWER_FRACTION = 0.35


@dataclass(frozen=True)
class Variant:
    name: str
    batch: int
    config: dict = field(default_factory=dict)  # TrainConfig overrides
    options: dict = field(default_factory=dict)  # SpeedOptions overrides (the levers)
    seq: int | None = None  # default: the peers' 2048
    lengths: str = "fixed"  # or "varied": lengths drawn from [seq/2, seq] (the app's data is not uniform)
    steps: int = 6
    warmup: int = 2


VARIANTS = [
    Variant("b2", 2),
    Variant("b4", 4),
    # the padded ids (not the model's input) a multiple of 64, as before the input was aligned for cuDNN
    Variant("b2-unaligned", 2, options={"align_input": False, "length_multiple": 64}),
    Variant("b4-unaligned", 4, options={"align_input": False, "length_multiple": 64}),
    # the app's example length with Qwen's tokenizer: prompt ~220, an 800 px photo ~475 image tokens, answer ~600
    Variant("app-b4", 4, seq=1300),
    Variant("app-b8", 8, seq=1300),
    Variant("b4-lora-fp32", 4, options={"lora_in_activation_dtype": False}),
    Variant("b4-full-vocab", 4, options={"answer_only_projection": False}),
    Variant("b4-upcast-logits", 4, options={"upcast_logits": True}),
    Variant("b4-baseline", 4, options={"baseline": True}),
    Variant("b8", 8),
    Variant("b4-ckpt", 4, config={"grad_checkpointing": True}),
    Variant("b8-ckpt", 8, config={"grad_checkpointing": True}),
    Variant("b2-ckpt", 2, config={"grad_checkpointing": True}),
    Variant("b1-ckpt", 1, config={"grad_checkpointing": True}),
    Variant("b1-4bit-ckpt", 1, config={"grad_checkpointing": True, "quantize_bits": 4}),
    Variant("b2-4bit-ckpt", 2, config={"grad_checkpointing": True, "quantize_bits": 4}),
    Variant("b4-4bit-ckpt", 4, config={"grad_checkpointing": True, "quantize_bits": 4}),
    Variant("short-b1", 1, seq=320, steps=20, warmup=3),
    Variant("short-b1-baseline", 1, seq=320, steps=20, warmup=3, options={"baseline": True}),
    Variant("varied-b1", 1, lengths="varied", seq=640, steps=30, warmup=3),
    Variant("varied-b1-m1", 1, lengths="varied", seq=640, steps=30, warmup=3, options={"length_multiple": 1}),
    Variant("varied-b1-m128", 1, lengths="varied", seq=640, steps=30, warmup=3, options={"length_multiple": 128}),
]


def run_variant(variant: Variant, model_dir: Path, peers: Path) -> dict:
    """In the child: build the model and data, take warm-up steps, then time `steps` steps."""
    import mlx.core as mx
    import numpy as np

    from gpu_shapes import peer_shapes, training_examples
    from mondrian_assets.core.training import loop
    from mondrian_assets.core.training.config import TrainConfig
    from mondrian_assets.core.training.lora import load_trainable_model
    from mondrian_assets.core.training.speed import speed_options

    shapes = peer_shapes(peers)
    seq = variant.seq or shapes.SEQ
    config = TrainConfig(
        base_model=str(model_dir), batch_size=variant.batch, learning_rate=1e-4, warmup_steps=0,
        lr_schedule="constant", max_seq_length=max(seq, 8), **variant.config,
    )  # fmt: skip
    baseline = variant.options.get("baseline", False)
    options = speed_options(**{k: v for k, v in variant.options.items() if k != "baseline"})
    if baseline:  # the previous step ran mlx-vlm's own LoRA layer and the full-vocabulary float32 loss
        options = speed_options(lora_in_activation_dtype=False, answer_only_projection=False, upcast_logits=True)
    model, _, _ = load_trainable_model(config, options)
    model_config = json.loads((model_dir / "config.json").read_text())
    n = variant.batch * (variant.steps + variant.warmup)
    examples = training_examples(shapes, model_config, n, seq, ANSWER_FRACTION, seed=0)
    if variant.lengths == "varied":  # cut each to a random length; the image block and an answer stay
        rng = np.random.default_rng(1)
        examples = [truncated(e, int(rng.integers(seq // 2, seq + 1))) for e in examples]
    optimizer, _ = loop.make_optimizer(config, variant.steps + variant.warmup, model)
    pad_id = int(model_config["pad_token_id"])
    if baseline:
        step = BaselineStep(model, optimizer, examples, config, pad_id)
    else:
        step = loop.TrainStep(model, optimizer, examples, config, pad_id, options)
    times, tokens = [], []
    mx.reset_peak_memory()
    for i in range(variant.warmup + variant.steps):
        tic = time.perf_counter()
        stats = step(i)  # returns after its one evaluation: the step's work is done
        elapsed = time.perf_counter() - tic
        if i >= variant.warmup:
            times.append(elapsed)
            tokens.append(stats.tokens)
    loss = float(stats.loss)
    median = statistics.median(times)
    vision_s = time_vision_tower(model, examples[: variant.batch]) if variant.lengths == "fixed" else None
    return {
        "impl": "ours", "variant": variant.name, "batch": variant.batch, "seq": seq, "lengths": variant.lengths,
        "config": variant.config, "options": options.to_dict() | ({"baseline": True} if baseline else {}),
        "step_s": round(median, 4), "step_s_spread": [round(min(times), 4), round(max(times), 4)],
        "tokens_per_s": round(statistics.mean(tokens) / median, 1), "vision_forward_s": vision_s,
        "peak_gib": round(mx.get_peak_memory() / 2**30, 2), "loss": round(loss, 3),
        "device": str(mx.default_device()),
    }  # fmt: skip


def truncated(example, length: int):
    from dataclasses import replace

    import numpy as np

    mask = np.zeros(length, np.int32)
    mask[int(length * (1 - ANSWER_FRACTION)) :] = 1
    return replace(example, input_ids=example.input_ids[:length], loss_mask=mask)


def time_vision_tower(model, examples) -> float:
    """Median seconds of the frozen vision tower's forward pass over these examples' images: the most that
    caching its outputs per image could save a step."""
    import mlx.core as mx
    import numpy as np

    pixels = mx.array(np.concatenate([e.pixel_values for e in examples])).astype(mx.bfloat16)
    grid = mx.array(np.concatenate([e.image_grid_thw for e in examples]))
    times = []
    for _ in range(4):
        tic = time.perf_counter()
        mx.eval(model.vision_tower(pixels.astype(model.vision_tower.patch_embed.proj.weight.dtype), grid))
        times.append(time.perf_counter() - tic)
    return round(statistics.median(times[1:]), 4)


class BaselineStep:
    """The step before this benchmark's changes: `accumulate_gradients` and `loss_fn` imported from the previous
    training module (the file named by BASELINE_TRAINING, e.g. `git show deec98f:mondrian_assets/core/training.py`),
    then clip, update and evaluate as its loop did."""

    def __init__(self, model, optimizer, examples, config, pad_id):
        import importlib.util

        import mlx.nn as nn

        spec = importlib.util.spec_from_file_location("baseline_training", os.environ["BASELINE_TRAINING"])
        self.old = importlib.util.module_from_spec(spec)
        sys.modules["baseline_training"] = self.old
        spec.loader.exec_module(self.old)
        self.model, self.optimizer, self.examples, self.config, self.pad_id = model, optimizer, examples, config, pad_id
        self.loss_and_grad = nn.value_and_grad(model, self.old.loss_fn)

    def __call__(self, step):
        import mlx.core as mx
        import mlx.optimizers as optim

        grads, loss_sum, targets, tokens = self.old.accumulate_gradients(
            self.model, self.loss_and_grad, self.examples, self.config, step, self.pad_id
        )
        if self.config.max_grad_norm is not None:
            grads, _ = optim.clip_grad_norm(grads, self.config.max_grad_norm)
        self.optimizer.update(self.model, grads)
        mx.eval(self.model.trainable_parameters(), self.optimizer.state)
        return type("Stats", (), {"loss": loss_sum / max(targets, 1.0), "targets": targets, "tokens": tokens})()


def child_main(args: argparse.Namespace) -> None:
    variant = next(v for v in VARIANTS if v.name == args.child)
    if args.steps:
        variant = replace(variant, steps=args.steps, warmup=1)
    print(gpu_runs.RESULT_PREFIX + json.dumps(run_variant(variant, args.model_dir, args.peers)), flush=True)


def run_child(name: str, args: argparse.Namespace, timeout: float) -> dict:
    options = ["--model-dir", str(args.model_dir), "--peers", str(args.peers)]
    return gpu_runs.run_child(__file__, name, options + (["--steps", str(args.steps)] if args.steps else []), timeout)


def summarize(ours: list[dict], peer: list[dict]) -> None:
    ok = [r for r in peer if "tokens_per_s" in r]
    best = max((r for r in ok if not r["grad_ckpt"]), key=lambda r: r["tokens_per_s"], default=None)
    ckpt = max((r for r in ok if r["grad_ckpt"]), key=lambda r: r["tokens_per_s"], default=None)
    print()
    print(f"{'variant':<22} {'tokens/s':>9} {'peak GiB':>9} {'/peer best':>11} {'/peer ckpt':>11}")
    for r in peer:
        name = f"hf-peft b{r.get('batch')}{' ckpt' if r.get('grad_ckpt') else ''}"
        print(f"{name:<22} {r.get('tokens_per_s', float('nan')):>9.0f} {r.get('peak_gib', float('nan')):>9.1f}" + (f"  {r['error'][:80]}" if "error" in r else ""))
    for r in ours:
        if "error" in r:
            print(f"{r['variant']:<22} error: {r['error'][-200:]}")
            continue
        rel_best = r["tokens_per_s"] / best["tokens_per_s"] if best else float("nan")
        rel_ckpt = r["tokens_per_s"] / ckpt["tokens_per_s"] if ckpt else float("nan")
        print(f"{r['variant']:<22} {r['tokens_per_s']:>9.0f} {r['peak_gib']:>9.1f} {rel_best:>11.3f} {rel_ckpt:>11.3f}")


def main() -> None:
    parser = gpu_runs.parser_for(__doc__, "hf_peft.py")
    parser.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    parser.add_argument("--timeout", type=float, default=120, help="seconds per variant")
    parser.add_argument("--steps", type=int, help="timed steps per variant, after one warm-up (a quick check)")
    args = parser.parse_args()
    args.peers = args.peers.resolve()
    if args.child:
        return child_main(args)

    args.model_dir = (args.model_dir or Path(tempfile.mkdtemp(prefix="qwen3vl4b-")) / "model").resolve()
    gpu_runs.prepare_checkpoint(args)
    ours = []
    for name in args.only or [v.name for v in VARIANTS]:  # in the order asked
        ours.append(run_child(name, args, args.timeout))
        print(json.dumps(ours[-1]), flush=True)
    peer = [] if args.skip_peer else gpu_runs.run_peer(args.peers / "hf_peft.py", "hf-peft", 600)
    for row in peer:
        print(json.dumps(row), flush=True)
    summarize(ours, peer)


if __name__ == "__main__":
    main()
