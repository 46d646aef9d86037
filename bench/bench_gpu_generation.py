"""Decode speed of evaluation and serving's generation path on Qwen3-VL-4B shapes, side by side with transformers.

Our path: `load_for_inference` (mlx_vlm.load, adapter verified, fused into the weights unless told not to) and
`generate_analyses` (the chat template, one image, greedy decoding through mlx-vlm's stream_generate with our stop
handling), exactly as eval_report and the server call them, on a ~1536-token prompt with one 448 x 448 image and
256 new tokens (the peers' `hf_decode.py` settings). The adapter is rank 16 on every language projection, with
random non-zero weights, written by the training loop's own `write_adapter`. Each variant runs in its own child.
The repetition guard is set never to fire (random weights loop at once); EOS is a token random weights never pick.

    python bench/bench_gpu_generation.py --peers ../shared/gpu/peers [--skip-peer]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import gpu_runs  # noqa: E402 (found through the path above)

PROMPT_TOKENS, NEW_TOKENS = 1536, 256
VARIANTS = ("base", "lora-fused", "lora-unfused")
WORDS = "light shadow tone contrast frame balance depth texture horizon subject line form mood grain edge sky".split()


def make_adapter(model_dir: Path, out_dir: Path) -> None:
    """A rank-16 adapter on every language projection with random non-zero B (a fresh one adds nothing)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map

    from mondrian_assets.core.training import loop
    from mondrian_assets.core.training.config import TrainConfig
    from mondrian_assets.core.training.lora import load_trainable_model
    from mondrian_assets.core.training.speed import speed_options

    config = TrainConfig(base_model=str(model_dir))
    model, _, adapter_config = load_trainable_model(config, speed_options())
    mx.random.seed(1)
    model.update(tree_map(lambda p: 0.01 * mx.random.normal(p.shape), model.trainable_parameters()))
    loop.write_adapter(out_dir, dict(tree_flatten(model.trainable_parameters())), adapter_config, {}, [])


def make_example(loaded, work: Path):
    """A noise image and a prompt whose full chat text plus image tokens is about PROMPT_TOKENS long."""
    import numpy as np
    from PIL import Image

    from mondrian_assets.core.inference.generate import formatted_prompt
    from mondrian_assets.core.inference.records import EvalExample

    image = work / "image.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (448, 448, 3), dtype=np.uint8)).save(image)
    words = [WORDS[i] for i in rng.integers(0, len(WORDS), 4 * PROMPT_TOKENS)]
    image_tokens = 196
    low, high = 1, len(words)
    while low < high:  # the most words whose prompt stays within the budget
        mid = (low + high + 1) // 2
        n = len(loaded.tokenizer.encode(formatted_prompt(loaded, " ".join(words[:mid])))) + image_tokens - 1
        low, high = (mid, high) if n <= PROMPT_TOKENS else (low, mid - 1)
    return EvalExample("bench", image, " ".join(words[:low]), "")


def run_variant(name: str, model_dir: Path, adapter_dir: Path, work: Path) -> dict:
    import mlx.core as mx

    from mondrian_assets.core.inference.generate import generate_analyses
    from mondrian_assets.core.inference.loading import load_for_inference
    from mondrian_assets.core.inference.records import LoopRule

    never = LoopRule(max_period=1, min_repeats=NEW_TOKENS + 1, min_span=NEW_TOKENS + 1)
    adapter = None if name == "base" else adapter_dir
    loaded = load_for_inference(model_dir, adapter, fuse=name != "lora-unfused")
    example = make_example(loaded, work)
    runs = generate_analyses(loaded, [example, example], max_tokens=NEW_TOKENS, loop_rule=never, warmup=True)
    last = runs[-1]
    return {
        "impl": "ours", "variant": name, "prompt_tokens": last.prompt_tokens, "tokens": last.generation_tokens,
        "prefill_tok_s": round(last.prompt_tps, 1), "decode_tok_s": round(last.generation_tps, 1),
        "decode_tok_s_first_run": round(runs[0].generation_tps, 1), "finish": last.finish_reason,
        "fused_layers": loaded.fused_layers, "peak_gib": round(mx.get_peak_memory() / 2**30, 2),
    }  # fmt: skip


def child(args: argparse.Namespace) -> None:
    if args.child == "make-adapter":
        make_adapter(args.model_dir, args.adapter_dir)
        result = {"adapter": str(args.adapter_dir)}
    else:
        result = run_variant(args.child, args.model_dir, args.adapter_dir, args.work)
    print(gpu_runs.RESULT_PREFIX + json.dumps(result), flush=True)


def run_child(name: str, args: argparse.Namespace, timeout: float = 240) -> dict:
    options = ["--peers", str(args.peers), "--model-dir", str(args.model_dir), "--adapter-dir", str(args.adapter_dir),
               "--work", str(args.work)]  # fmt: skip
    return gpu_runs.run_child(__file__, name, options, timeout)


def summarize(ours: dict[str, dict], peer: list[dict]) -> None:
    hf = {r["variant"]: r for r in peer if "decode_tok_s" in r}
    base = ours.get("base", {}).get("decode_tok_s")
    merged = hf.get("lora-merged", {}).get("decode_tok_s")
    print(f"\n{'variant':<24} {'decode tok/s':>12} {'prefill tok/s':>13} {'/our base':>10} {'/hf merged':>11}")
    for r in peer:
        print(f"{'hf ' + r.get('variant', '?'):<24} {r.get('decode_tok_s', float('nan')):>12.1f}" + (f"  {r['error'][-200:]}" if "error" in r else ""))
    for name, r in ours.items():
        if "error" in r:
            print(f"{'ours ' + name:<24} error: {r['error'][-300:]}")
            continue
        rel_base = r["decode_tok_s"] / base if base else float("nan")
        rel_hf = r["decode_tok_s"] / merged if merged else float("nan")
        print(f"{'ours ' + name:<24} {r['decode_tok_s']:>12.1f} {r['prefill_tok_s']:>13.1f} {rel_base:>10.3f} {rel_hf:>11.2f}")


def main() -> None:
    parser = gpu_runs.parser_for(__doc__, "hf_decode.py")
    parser.add_argument("--adapter-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.peers = args.peers.resolve()
    if args.child:
        return child(args)

    args.work = Path(tempfile.mkdtemp(prefix="bench-gen-"))
    args.model_dir = (args.model_dir or args.work / "model").resolve()
    args.adapter_dir = args.work / "adapter"
    gpu_runs.prepare_checkpoint(args)
    print(json.dumps(run_child("make-adapter", args)), flush=True)
    ours = {}
    for name in VARIANTS:
        ours[name] = run_child(name, args)
        print(json.dumps(ours[name]), flush=True)
    peer = [] if args.skip_peer else gpu_runs.run_peer(args.peers / "hf_decode.py", "hf", 400)
    for row in peer:
        print(json.dumps(row), flush=True)
    summarize(ours, peer)


if __name__ == "__main__":
    main()
