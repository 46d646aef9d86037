"""Does the embedded model learn to see? The demo's largest advisor end to end, for several demo seeds.

Per seed: `mondrian-assets demo --advisor <largest> --seed S` on a fresh home (demo data, link, split, base
preparation, training, evaluation: what a user runs), then from its comparison report: base and fine-tuned format
compliance, fine-tuned overall-score MAE and mean per-dimension MAE, the training-mean baseline's, the ratio
fine-tuned / baseline, and whether every gate passed; `greedy` is the same ratio with score values decoded greedily
instead of as the expected value of the model's belief (the default, `core/inference/score_decoding.py`). Then the
image-shuffle check: the same fine-tuned model on the same validation prompts with the images permuted across
examples. A model that reads the photo gets worse; one that reads the scores off the prompt text would not.

`--train-sizes 20,30,40` measures how many training examples the model needs: one seed's largest advisor trained on
the first N training examples (the same validation set), gates per N. It sets `MIN_TRAIN_EXAMPLES`.

Wall and CPU time are printed too (the child's user + system time): the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mondrian_assets.core.data.splits import split_files
from mondrian_assets.core.evaluation.run import EvalSettings, evaluate_adapter
from mondrian_assets.core.inference.generate import generate_analyses, load_eval_examples, max_tokens_for
from mondrian_assets.core.inference.loading import LoadedModel, load_for_inference
from mondrian_assets.core.inference.records import EvalExample
from mondrian_assets.core.locations import Locations
from mondrian_assets.core.schema import parse_analysis
from mondrian_assets.core.training.config import TrainConfig
from mondrian_assets.core.training.isolation import run_training_subprocess
from mondrian_assets.demo.base_model import ensure_embedded_base_model


def _cli(home: Path, *args: str) -> tuple[subprocess.CompletedProcess, float, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MONDRIAN_", "DAGSTER_"))}
    before, started = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "mondrian_assets.cli", *args, "--home", str(home)],
                          capture_output=True, text=True, env=env)  # fmt: skip
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return done, time.perf_counter() - started, cpu


def largest_advisor(home: Path) -> str:
    manifest = json.loads((Locations.resolve(home=str(home), environ={}).manifest_path).read_text())
    return max(manifest["by_advisor"], key=lambda a: manifest["by_advisor"][a]["count"])


def shuffled(examples: list[EvalExample], seed: int) -> list[EvalExample]:
    """The same prompts and references with the images permuted across examples (none left in place)."""
    images = [e.image_path for e in examples]
    rng = random.Random(seed)
    while len(images) > 1 and images == [e.image_path for e in examples]:
        rng.shuffle(images)
    return [EvalExample(e.example_id, image, e.prompt, e.reference) for e, image in zip(examples, images, strict=True)]


def overall_mae(loaded: LoadedModel, examples: list[EvalExample], *, expected_scores: bool = True) -> float | None:
    """Overall-score MAE of the parsed outputs (invalid ones left out: this is a diagnostic, not the gate)."""
    outputs = generate_analyses(loaded, examples, max_tokens=max_tokens_for(loaded, [e.reference for e in examples]),
                                batch_size=4, expected_scores=expected_scores)  # fmt: skip
    errors = []
    for example, output in zip(examples, outputs, strict=True):
        got, want = parse_analysis(output.text).analysis, parse_analysis(example.reference).analysis
        if got is not None and want is not None:
            errors.append(abs(got.overall_score - want.overall_score))
    return sum(errors) / len(errors) if errors else None


def _num(value: float | None, fmt: str = "{:.2f}") -> str:
    return "n/a" if value is None else fmt.format(value)


def one_seed(root: Path, seed: int) -> dict:
    home = root / f"seed{seed}"
    done, wall, cpu = _cli(home, "demo", "--seed", str(seed), "--skip-training")
    if done.returncode:
        raise RuntimeError(done.stdout[-2000:] + done.stderr[-2000:])
    advisor = largest_advisor(home)
    done, train_wall, train_cpu = _cli(home, "demo", "--seed", str(seed), "--advisor", advisor)
    if done.returncode:
        raise RuntimeError(done.stdout[-2000:] + done.stderr[-2000:])
    loc = Locations.resolve(home=str(home), environ={})
    report = json.loads((loc.evaluation / advisor / "comparison_report.json").read_text())
    m = report["metrics"]
    base, tuned, mean = m["base_model"], m["fine_tuned_model"], m["mean_baseline"]
    loaded = load_for_inference(report["base_model"], loc.models / "adapters" / advisor)
    examples = load_eval_examples(split_files(loc.training_data, advisor).val_json)
    ratio = tuned["overall_score_mae"] / mean["overall_score_mae"] if tuned["overall_score_mae"] is not None else None
    greedy = overall_mae(loaded, examples, expected_scores=False)
    return {
        "seed": seed, "advisor": advisor, "val": tuned["examples"],
        "base_compliance": base["format_compliance"], "tuned_compliance": tuned["format_compliance"],
        "tuned_mae": tuned["overall_score_mae"], "tuned_dim_mae": tuned["dimension_score_mae_mean"],
        "mean_mae": mean["overall_score_mae"], "mean_dim_mae": mean["dimension_score_mae_mean"], "ratio": ratio,
        "greedy_ratio": greedy / mean["overall_score_mae"] if greedy is not None else None,
        "shuffled_mae": overall_mae(loaded, shuffled(examples, seed)), "gates": all(g["passed"] for g in report["gates"]),
        "wall_s": wall + train_wall, "cpu_s": cpu + train_cpu,
    }  # fmt: skip


def print_seeds(rows: list[dict]) -> None:
    print(f"{'seed':>4} {'advisor':<8} {'val':>3}  {'base ok':>7} {'tuned ok':>8}  {'MAE':>5} {'dimMAE':>6}  "
          f"{'mean':>5} {'dimMean':>7}  {'ratio':>5} {'greedy':>6}  {'shuffled':>8}  gates  {'wall':>5} {'cpu':>5}")  # fmt: skip
    for r in rows:
        print(f"{r['seed']:>4} {r['advisor']:<8} {r['val']:>3}  {_num(r['base_compliance'], '{:.0%}'):>7} "
              f"{_num(r['tuned_compliance'], '{:.0%}'):>8}  {_num(r['tuned_mae']):>5} {_num(r['tuned_dim_mae']):>6}  "
              f"{_num(r['mean_mae']):>5} {_num(r['mean_dim_mae']):>7}  {_num(r['ratio']):>5} {_num(r['greedy_ratio']):>6}  "
              f"{_num(r['shuffled_mae']):>8}  {'pass' if r['gates'] else 'FAIL':<5}  "
              f"{r['wall_s']:>4.0f}s {r['cpu_s']:>4.0f}s")  # fmt: skip
    held = [r for r in rows if r["tuned_compliance"] == 1.0 and r["ratio"] is not None and r["ratio"] <= 0.8 and r["gates"]]
    rising = [r for r in rows if r["shuffled_mae"] is not None and r["tuned_mae"] is not None
              and r["shuffled_mae"] > r["tuned_mae"]]  # fmt: skip
    print(f"compliance 100%, MAE <= 0.8 x mean baseline and gates passed: {len(held)} of {len(rows)} seeds; "
          f"shuffled images raise the MAE: {len(rising)} of {len(rows)}")


def train_sizes(root: Path, seed: int, sizes: list[int]) -> None:
    """Train the largest advisor on its first N training examples; the same validation set judges every N."""
    home = root / f"sizes{seed}"
    done, _, _ = _cli(home, "demo", "--seed", str(seed), "--skip-training")
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    advisor, loc = largest_advisor(home), Locations.resolve(home=str(home), environ={})
    files, base = split_files(loc.training_data, advisor), str(ensure_embedded_base_model(loc.models))
    rows, train = files.train_jsonl.read_text().splitlines(), json.loads(files.train_json.read_text())
    print(f"{advisor}: {len(rows)} training examples available, {len(json.loads(files.val_json.read_text()))} val")
    for n in sizes:
        subset = root / f"subset{n}"
        subset.mkdir(parents=True, exist_ok=True)
        (subset / "train.jsonl").write_text("\n".join(rows[:n]) + "\n")
        (subset / "train.json").write_text(json.dumps(train[:n]))
        adapter = subset / "adapter"
        run_training_subprocess(TrainConfig(base_model=base), subset / "train.jsonl", files.val_jsonl, adapter,
                                data_version=f"first-{n}")  # fmt: skip
        outcome = evaluate_adapter(base, adapter, files.val_json, subset / "train.json", subset / "eval",
                                   EvalSettings(), log=lambda _: None)  # fmt: skip
        t, mean = outcome.comparison.fine_tuned, outcome.comparison.mean_baseline
        print(f"  {n:>3} train: compliance {_num(t.format_compliance, '{:.0%}')}, MAE {_num(t.overall_score_mae)} vs "
              f"mean {_num(mean.overall_score_mae)}; gates {'pass' if all(g.passed for g in outcome.gates) else 'FAIL'}"
              f" ({', '.join(g.name for g in outcome.gates if not g.passed) or 'all passed'})", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="7,8,9", help="demo seeds (default 7,8,9; 7 is ./dev demo's)")
    parser.add_argument("--train-sizes", help="e.g. 20,30,40: measure the minimum training examples instead")
    parser.add_argument("--keep", help="work here and keep it (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-learning-") as tmp:
        root = Path(args.keep or tmp)
        seeds = [int(s) for s in args.seeds.split(",")]
        if args.train_sizes:
            train_sizes(root, seeds[0], [int(n) for n in args.train_sizes.split(",")])
            return
        rows = []
        for seed in seeds:
            rows.append(one_seed(root, seed))
            print(f"seed {seed} done", json.dumps(rows[-1]), flush=True)
        print_seeds(rows)


if __name__ == "__main__":
    main()
