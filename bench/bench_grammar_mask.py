"""Per-token cost of the grammar mask, on the embedded tiny base and the Qwen-vocabulary tiny base, side by side.

For each base: the same prompt and image decoded for exactly N tokens (end of sequence masked; a run's time, one small
prefill included, over N) with and without
the mask, interleaved and repeated (`overhead.interleaved_timings`), then ms per decoded token and the median ratio of
interleaved pairs.
The tiny models decode fast, so the mask's CPU work (llguidance's bitmask over the vocabulary, 2k vs 151k
tokens) is most of the difference: an upper bound on its share for a real model.
Usage: uv run python bench/bench_grammar_mask.py [--tokens 48] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from mondrian_assets.core import schema
from mondrian_assets.core.evaluation.overhead import interleaved_timings, timed_run
from mondrian_assets.core.inference.constrained import AnalysisConstraint
from mondrian_assets.core.inference.loading import load_for_inference
from mondrian_assets.core.inference.records import EvalExample
from mondrian_assets.demo.base_model import ensure_embedded_base_model
from mondrian_assets.demo.qwen_vocab_base import ensure_qwen_vocab_base

BUDGET = 1536  # the service's default max_tokens


def _row(name: str, folder: Path, example: EvalExample, tokens: int, repeats: int) -> str:
    loaded = load_for_inference(str(folder), None)
    constraint = AnalysisConstraint.for_processor(loaded.processor)
    timed_run(loaded, example, 4, [constraint.processor(BUDGET)])  # warm-up: grammar compiled, caches filled
    timing = interleaved_timings(lambda e: timed_run(loaded, e, tokens),
                                 lambda e: timed_run(loaded, e, tokens, [constraint.processor(BUDGET)]),
                                 [example], repeats=repeats, tokens=tokens)  # fmt: skip
    plain, masked = (1000 * statistics.median(t for row in runs for t in row) / tokens
                     for runs in (timing.base_s, timing.tuned_s))  # fmt: skip
    vocab = len(loaded.tokenizer)
    return (f"{name:<22} {vocab:>7} {plain:>10.2f} {masked:>10.2f} {1 + timing.overhead:>7.2f}x"
            f"  (noise {timing.noise:.0%})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=48, help="decoded tokens per timed run (default 48)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", type=Path, default=None, help="models folder (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        models = args.models or Path(tmp)
        from PIL import Image

        image = Path(tmp) / "photo.jpg"
        Image.new("RGB", (96, 72), (120, 90, 60)).save(image)
        example = EvalExample("bench", image, schema.build_prompt(None, "You are Ansel Adams."), "")
        bases = [("embedded tiny base", ensure_embedded_base_model(models)),
                 ("Qwen-vocab tiny base", ensure_qwen_vocab_base(models, "tiny"))]  # fmt: skip
        print(f"{'base':<22} {'vocab':>7} {'ms/token':>10} {'masked':>10} {'ratio':>8}   ({args.tokens} tokens, "
              f"{args.repeats} repeats, mask for max_tokens={BUDGET})")
        for name, folder in bases:
            print(_row(name, folder, example, args.tokens, args.repeats), flush=True)


if __name__ == "__main__":
    main()
