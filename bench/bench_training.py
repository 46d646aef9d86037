"""Our training resource vs `python -m mlx_vlm.train`, side by side in one run, on the same data and settings.

Both train a LoRA adapter on the same train.jsonl (one epoch, batch 1, the same rank / alpha / learning rate /
max sequence length, loss on the answer only, no validation, no intermediate checkpoints), each in its own child
process, alternating A B A B so machine noise hits both. Throughput = the tokens of one epoch (the same for
both) / the wall time of the whole child process, load and save included: what a user waits for.
Prints the median tokens/s of each and the ratio ours / mlx-vlm (target >= 0.95: orchestration costs nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mondrian_assets.core.locations import Locations
from mondrian_assets.core.training import config as training_config
from mondrian_assets.core.training import examples as training_examples
from mondrian_assets.core.training.isolation import run_training_subprocess
from mondrian_assets.demo.base_model import ensure_embedded_base_model


def prepare_data(root: Path) -> tuple[Path, Path]:
    """The demo's ansel split, built by the same CLI the README uses (no training)."""
    home = root / "home"
    cmd = [sys.executable, "-m", "mondrian_assets.cli", "demo", "--home", str(home), "--advisor", "ansel", "--skip-training"]
    subprocess.run(cmd, check=True, capture_output=True, env={k: v for k, v in os.environ.items() if not k.startswith("MONDRIAN_")})
    loc = Locations.resolve(home=str(home), environ={})
    return loc.training_data / "ansel", ensure_embedded_base_model(loc.models)


def epoch_tokens(config: training_config.TrainConfig, train_jsonl: Path) -> int:
    model_path = training_config.resolve_base_model(config.base_model)
    processor = training_config.load_processor(model_path)
    examples = training_examples.prepare_examples(processor, training_config.read_model_config(model_path), train_jsonl, config)
    return sum(len(e.input_ids) for e in examples)


def run_ours(config: training_config.TrainConfig, data: Path, out: Path) -> float:
    started = time.perf_counter()
    run_training_subprocess(config, data / "train.jsonl", None, out, data_version="bench")
    return time.perf_counter() - started


def run_mlx_vlm(config: training_config.TrainConfig, data: Path, out: Path, steps: int) -> float:
    """mlx_vlm.train insists on at least one validation batch: it gets one, after the last step."""
    cmd = [
        sys.executable, "-m", "mlx_vlm.train", "--model", config.base_model, "--data", str(data),
        "--iters", str(steps), "--batch-size", "1", "--learning-rate", str(config.learning_rate),
        "--lora-rank", str(config.lora_rank), "--lora-alpha", str(config.lora_alpha),
        "--lora-dropout", str(config.lora_dropout), "--max-seq-length", str(config.max_seq_length),
        "--train-on-completions", "--steps-per-report", "10", "--steps-per-eval", str(steps),
        "--steps-per-save", str(steps * 10), "--val-batches", "1", "--seed", str(config.seed),
        "--output-path", str(out / "adapters.safetensors"),
    ]  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"mlx_vlm.train failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each, alternating (default 2)")
    parser.add_argument("--workdir", type=Path, help="where to build data and adapters (default: a temp dir)")
    args = parser.parse_args()

    root = args.workdir or Path(tempfile.mkdtemp(prefix="bench-training-"))
    data, base = prepare_data(root)
    steps = len((data / "train.jsonl").read_text().splitlines())
    config = training_config.TrainConfig(
        base_model=str(base), iters=steps, warmup_steps=0, lr_schedule="constant", report_interval=10,
        eval_interval=steps * 10, save_interval=steps * 10, early_stopping_patience=None, max_grad_norm=None,
    )  # fmt: skip
    tokens = epoch_tokens(config, data / "train.jsonl")
    print(f"one epoch: {steps} examples, {tokens} tokens, base {base}")

    times: dict[str, list[float]] = {"ours": [], "mlx_vlm.train": []}
    for i in range(args.repeats):
        times["ours"].append(run_ours(config, data, root / f"ours-{i}"))
        times["mlx_vlm.train"].append(run_mlx_vlm(config, data, root / f"mlx-vlm-{i}", steps))
        print(f"round {i + 1}: ours {times['ours'][-1]:.1f} s, mlx_vlm.train {times['mlx_vlm.train'][-1]:.1f} s")

    rates = {name: tokens / statistics.median(t) for name, t in times.items()}
    for name, rate in rates.items():
        print(f"{name:<14} {rate:8.1f} tokens/s (median of {args.repeats})")
    ratio = rates["ours"] / rates["mlx_vlm.train"]
    print(f"ratio ours / mlx_vlm.train: {ratio:.3f}")
    print(json.dumps({"tokens": tokens, "tokens_per_sec": rates, "ratio": round(ratio, 3)}))


if __name__ == "__main__":
    main()
