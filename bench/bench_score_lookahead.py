"""What the expected-value score rule costs per answer, against greedy score values, on both tokenizers.

    .venv/bin/python bench/bench_score_lookahead.py [--answers 4] [--tokens 260] [--scores 8]

An answer holds `--scores` score values (seven dimensions and the overall score). Each base generates `--answers`
answers of `--tokens` tokens on demo photos twice, interleaved: greedily, and with the rule applied at `--scores`
evenly spread positions (the rule's own work: on the embedded tokenizer a look at the score tokens' logits, on
Qwen's a batched look-ahead over every allowed value's tokens from copies of the KV cache). The bases are the
random tiny stand-ins, so what is measured is the rule's cost, not its answers; the ratio is per answer.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from mondrian_assets.core import schema
from mondrian_assets.core.inference.generate import generate_one
from mondrian_assets.core.inference.loading import load_for_inference
from mondrian_assets.core.inference.records import LoopRule
from mondrian_assets.core.inference.score_decoding import ExpectedScore, score_rule
from mondrian_assets.demo import base_model, qwen_vocab_base
from mondrian_assets.demo.app import generate_demo_app


NEVER = LoopRule(max_period=1, min_repeats=10**6, min_span=10**6)  # a random model loops: let it run on


class EverySoOften(ExpectedScore):
    """The rule, at fixed positions instead of after a score key (a random model writes no keys)."""

    every = 32

    def at_score_value(self) -> bool:
        return len(self.tokens) % self.every == 0


def per_answer(loaded, images: list[Path], tokens: int, scores: int, with_rule: bool) -> tuple[float, int]:
    """Seconds per answer and score values the rule wrote, over `images`."""
    EverySoOften.every = max(-(-tokens // (scores + 1)), 1)  # `scores` positions inside the answer
    prompt = schema.build_prompt("You critique photographs.", "You are Ansel Adams.", "Answer in JSON.")
    seconds, written = [], 0
    for image in images:
        tic = time.perf_counter()
        g = generate_one(loaded, image, prompt, max_tokens=tokens, expected_scores=with_rule,
                         score_decoder=EverySoOften, loop_rule=NEVER)  # fmt: skip
        seconds.append((time.perf_counter() - tic) / max(g.generation_tokens, 1) * tokens)
        written += g.score_values_by_rule
    return statistics.median(seconds), written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--answers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=260, help="tokens per answer (Qwen's median demo answer: 262)")
    parser.add_argument("--scores", type=int, default=8, help="score values per answer")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-scores-") as tmp:
        app = generate_demo_app(Path(tmp) / "app", seed=7, n_jobs=60, large_images=False)
        images = sorted((app.app_dir / "source").glob("*.jpg"))[: args.answers]
        bases = {"embedded": base_model.ensure_embedded_base_model(Path(tmp) / "models"),
                 "qwen vocabulary": qwen_vocab_base.ensure_qwen_vocab_base(Path(tmp) / "models", "tiny")}  # fmt: skip
        print(f"{args.answers} answers of {args.tokens} tokens, {args.scores} score values each; seconds per answer")
        print(f"{'base':16s} {'rule':22s} {'greedy':>8s} {'rule':>8s} {'ratio':>6s} {'values':>7s}")
        for name, path in bases.items():
            loaded = load_for_inference(str(path), None)
            per_answer(loaded, images[:1], 16, 1, True)  # warm-up: compile, caches
            greedy, _ = per_answer(loaded, images, args.tokens, args.scores, with_rule=False)
            ruled, written = per_answer(loaded, images, args.tokens, args.scores, with_rule=True)
            print(f"{name:16s} {score_rule(loaded.tokenizer) or 'greedy':22s} {greedy:8.3f} {ruled:8.3f} "
                  f"{ruled / greedy:6.2f} {written:7d}")  # fmt: skip


if __name__ == "__main__":
    main()
