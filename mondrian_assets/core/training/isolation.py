"""`train_lora` in a child process (`core/isolation.py`), so an MLX crash cannot take the caller down."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mondrian_assets.core.isolation import run_in_child
from mondrian_assets.core.training.config import ReportFn, TrainConfig, TrainingConfigError, TrainingFailed, TrainResult
from mondrian_assets.core.training.loop import train_lora


def run_training_subprocess(
    config: TrainConfig,
    train_jsonl: Path,
    val_jsonl: Path | None,
    out_dir: Path,
    *,
    data_version: str,
    on_report: ReportFn | None = None,
    on_start: Callable[[int], None] | None = None,
    env: dict[str, str] | None = None,
    keep_checkpoints: bool = False,
) -> TrainResult:
    """`train_lora` in a child Python process; its reports stream back to `on_report`.

    A crash of the child (a segfault in MLX, the OOM killer, an exception) raises TrainingFailed with its exit
    code or signal and the tail of its stderr; the caller's process is untouched. A TrainingConfigError is raised
    as itself. `on_start` receives the child's pid. If the caller is interrupted, the child is terminated.
    `keep_checkpoints`: see `loop.train_lora`.
    """
    return run_in_child(
        train_lora,
        {"config": config, "train_jsonl": train_jsonl, "val_jsonl": val_jsonl, "out_dir": out_dir,
         "data_version": data_version, "keep_checkpoints": keep_checkpoints},
        what="training", report_to="on_report", on_report=on_report, on_start=on_start, env=env,
        expected=(TrainingConfigError,), failure=TrainingFailed,
    )  # fmt: skip
