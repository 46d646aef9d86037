"""Batched vs one-by-one greedy generation, measured side by side in one run on the same examples.

Prints, for each mode, wall time, seconds per example and generated tokens/s, then the ratio
one-by-one / batched (above 1: batching is faster) and whether both modes produced identical outputs
(they must, for greedy decoding, or batching is not a valid optimisation for this model).

Without --model it builds the tiny random Qwen3-VL (mondrian_assets.demo.tiny_model) in a temporary folder;
without --val-json it makes synthetic images (mixed sizes unless --same-size) and references.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from mondrian_assets.core import schema
from mondrian_assets.core.inference import generate, loading
from mondrian_assets.core.inference.records import TOKEN_LOOP_RULE, EvalExample, Generation, LoopRule

NO_LOOP_GUARD = LoopRule(max_period=1, min_repeats=1, min_span=10**9)


def synthetic_reference(score: int) -> str:
    dims = [
        {"name": n, "score": score, "comment": f"{n} is fair.", "recommendation": "Wait for softer light."}
        for n in schema.DIMENSION_NAMES[:7]
    ]
    data = {
        "image_description": "A road through fields.",
        "dimensions": dims,
        "overall_score": score,
        "key_strengths": ["depth"],
        "priority_improvements": ["sky"],
        "technical_notes": "f/8",
    }
    return json.dumps(data, separators=(",", ":"))


def synthetic_examples(folder: Path, n: int, same_size: bool) -> list[EvalExample]:
    sizes = [(128, 96)] if same_size else [(128, 96), (96, 128), (128, 128), (160, 96)]
    prompt = schema.build_prompt(None, "You are Ansel Adams.")
    out = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        path = folder / f"bench{i}.jpg"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        out.append(EvalExample(f"b{i}", path, prompt, synthetic_reference(3 + i % 8)))
    return out


def tiny_model(folder: Path) -> str:
    from mondrian_assets.demo.tiny_model import build_tiny_base_model

    corpus = [schema.build_prompt(None, "You are Ansel Adams."), *(synthetic_reference(s) for s in range(1, 11))]
    return str(build_tiny_base_model(folder / "tiny_base", corpus, seed=0))


def timed(loaded: loading.LoadedModel, examples: list[EvalExample], batch_size: int, args, rule: LoopRule):
    started = time.perf_counter()
    out = generate.generate_analyses(
        loaded, examples, max_tokens=args.max_tokens, seed=args.seed, batch_size=batch_size, loop_rule=rule
    )
    return time.perf_counter() - started, out


def row(name: str, seconds: float, out: list[Generation]) -> str:
    tokens = sum(g.generation_tokens for g in out)
    per_example = seconds / len(out)
    return f"{name:<12} {seconds:9.2f} s {per_example:9.3f} s/example {tokens / seconds:10.1f} tok/s {tokens:7d} tokens"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="base model folder (default: build the tiny random Qwen3-VL)")
    parser.add_argument("--adapter", type=Path, help="LoRA adapter folder to load and fuse")
    parser.add_argument("--val-json", type=Path, help="a training_data_<adv>_val.json to take examples from")
    parser.add_argument("--examples", type=int, default=8, help="number of examples (default 8)")
    parser.add_argument("--batch-size", type=int, default=8, help="batch size for the batched mode (default 8)")
    parser.add_argument("--max-tokens", type=int, default=128, help="generation budget per example (default 128)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--same-size", action="store_true", help="synthetic images all of one size (one shape group)")
    parser.add_argument("--no-loop-guard", action="store_true", help="decode to max_tokens even when looping")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = args.model or tiny_model(folder)
        if args.val_json:
            examples = generate.load_eval_examples(args.val_json, limit=args.examples)
        else:
            examples = synthetic_examples(folder, args.examples, args.same_size)
        loaded = loading.load_for_inference(model, args.adapter)
        rule = NO_LOOP_GUARD if args.no_loop_guard else TOKEN_LOOP_RULE
        timed(loaded, examples[:1], 1, args, rule)  # warm-up: first-call compilation and caches
        single_s, single = timed(loaded, examples, 1, args, rule)
        batch_s, batched = timed(loaded, examples, args.batch_size, args, rule)

    same = sum(a.text == b.text for a, b in zip(single, batched, strict=True))
    print(f"model {model}  adapter {args.adapter}  fused layers {loaded.fused_layers}")
    print(f"{len(examples)} examples, max_tokens {args.max_tokens}, batch size {args.batch_size}")
    print(row("one-by-one", single_s, single))
    print(row("batched", batch_s, batched))
    print(f"ratio one-by-one / batched: {single_s / batch_s:.2f}x")
    print(f"identical outputs: {same}/{len(examples)}")
    if same != len(examples):
        raise SystemExit("batched greedy outputs differ from one-by-one: do not batch this model")


if __name__ == "__main__":
    main()
