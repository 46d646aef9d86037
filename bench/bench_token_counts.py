"""Tokens per training example under the embedded demo tokenizer and under Qwen's real one, side by side.

The demo app (seed 7) is linked and split as the pipeline does (`linker.link`, `build_prompt`, `split_advisor`:
canonical JSON answers, images prepared at <= 800 px), and every example of ansel and weston is encoded by
`encode_example`, the function training uses, once per base. Per example it counts the prompt's text tokens
(chat template included), its image tokens and its answer tokens (the loss targets: the answer and its end of
turn), and prints the median and p95 of each under both tokenizers with their ratio (Qwen / embedded).

    .venv/bin/python bench/bench_token_counts.py [--seed 7] [--advisors ansel weston]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from mondrian_assets.core.data import app_db, linker
from mondrian_assets.core.data.splits import SplitConfig, split_advisor
from mondrian_assets.core.locations import Locations
from mondrian_assets.core.schema import build_prompt
from mondrian_assets.core.training.config import TrainConfig, load_processor
from mondrian_assets.core.training.examples import encode_example
from mondrian_assets.demo.app import generate_demo_app
from mondrian_assets.demo.base_model import ensure_embedded_base_model
from mondrian_assets.demo.qwen_vocab_base import ensure_qwen_vocab_base

PARTS = ("prompt", "image", "answer", "total")


def demo_examples(work: Path, seed: int, advisors: list[str]) -> dict[str, list]:
    """Each advisor's train and val examples of a fresh demo app, as the split asset makes them."""
    summary = generate_demo_app(work / "app", seed=seed)
    loc = Locations.resolve(app_dir=str(summary.app_dir), home=str(work / "home"), environ={})
    with app_db.read_only_engine(loc.db_path).connect() as conn:
        records = linker.link(conn, loc).records
        system_prompt = app_db.read_system_prompt(conn)
        rows = app_db.read_advisors(conn)
    examples = {}
    for advisor in advisors:
        prompt = build_prompt(system_prompt, rows[advisor].prompt)
        split = split_advisor(advisor, records, prompt, SplitConfig(), work / "images")
        examples[advisor] = split.train + split.val
    return examples


def token_counts(base: Path, examples: list) -> dict[str, np.ndarray]:
    """Prompt text, image and answer tokens of each example, encoded as training encodes it."""
    processor = load_processor(base)
    config = json.loads((base / "config.json").read_text())
    train_config = TrainConfig(base_model=str(base), max_seq_length=65_536)
    counts: dict[str, list[int]] = {part: [] for part in PARTS}
    for e in examples:
        encoded = encode_example(processor, config, e.mlx_row(), train_config, where=e.job_id)
        image = int(np.sum(encoded.input_ids == config["image_token_id"]))
        answer = int(encoded.loss_mask.sum())
        total = len(encoded.input_ids)
        for part, n in zip(PARTS, (total - image - answer, image, answer, total)):
            counts[part].append(n)
    return {part: np.asarray(values) for part, values in counts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--advisors", nargs="+", default=["ansel", "weston"])
    args = parser.parse_args()
    from transformers.utils import logging

    logging.set_verbosity_error()  # mlx-vlm's processor call draws a kwargs warning per example
    with tempfile.TemporaryDirectory(prefix="bench-tokens-") as tmp:
        work = Path(tmp)
        examples = demo_examples(work, args.seed, args.advisors)
        bases = {}
        for name, ensure in (("embedded", ensure_embedded_base_model), ("qwen", ensure_qwen_vocab_base)):
            tic = time.perf_counter()
            bases[name] = ensure(work / "models")
            print(f"{name} base {bases[name].name} built in {time.perf_counter() - tic:.1f} s")
        print(f"\n{'advisor':<8} {'n':>4} {'part':<7} {'embedded med':>12} {'p95':>6} {'qwen med':>9} {'p95':>6}"
              f" {'ratio med':>9} {'p95':>6}")  # fmt: skip
        for advisor, items in examples.items():
            counts = {name: token_counts(base, items) for name, base in bases.items()}
            for part in PARTS:
                (e_med, e_p95), (q_med, q_p95) = (np.percentile(counts[n][part], [50, 95]) for n in bases)
                print(f"{advisor:<8} {len(items):>4} {part:<7} {e_med:>12.0f} {e_p95:>6.0f} {q_med:>9.0f} {q_p95:>6.0f}"
                      f" {q_med / e_med:>8.1f}x {q_p95 / e_p95:>5.1f}x")  # fmt: skip


if __name__ == "__main__":
    main()
