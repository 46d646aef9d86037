"""Resumable checkpoints, keyed by a fingerprint of the config and the data."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mondrian_assets.core import atomic
from mondrian_assets.core.training.config import Report, TrainConfig

CHECKPOINT_FORMAT = 1
FINGERPRINT_FILE = "fingerprint"


def run_fingerprint(config: TrainConfig, train_jsonl: Path, val_jsonl: Path | None, data_version: str) -> str:
    """What a checkpoint must match to be resumed: the config, the data version and the data files' bytes."""
    digest = hashlib.sha256()
    payload = {"format": CHECKPOINT_FORMAT, "config": config.to_dict(), "data_version": data_version}
    digest.update(json.dumps(payload, sort_keys=True).encode())
    for path in (train_jsonl, val_jsonl):
        digest.update(Path(path).read_bytes() if path is not None and Path(path).exists() else b"-")
    return digest.hexdigest()[:16]


def checkpoint_root(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.checkpoints"


@dataclass
class LoopState:
    """Everything besides weights that a resumed run needs to continue exactly."""

    step: int = 0
    first_val_loss: float | None = None
    best_val_loss: float | None = None
    best_step: int = 0
    last_val_loss: float | None = None
    evals_without_improvement: int = 0
    stopped_early: bool = False
    trained_tokens: int = 0
    train_seconds: float = 0.0
    log: list[Report] = field(default_factory=list)


def save_checkpoint(run_dir: Path, model: Any, optimizer: Any, best_weights: dict, state: LoopState) -> None:
    """Write `run_dir/step_<N>` atomically, then drop older checkpoints. The run's fingerprint (the folder's name)
    is recorded inside, so a checkpoint that lands in another run's folder is never resumed there."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    final = run_dir / f"step_{state.step:07d}"
    with atomic.staged_dir(final) as stage:
        mx.save_safetensors(str(stage / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
        mx.save_safetensors(str(stage / "best_adapters.safetensors"), best_weights)
        mx.save_safetensors(str(stage / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
        (stage / "state.json").write_text(json.dumps(dataclasses.asdict(state)))
        (stage / FINGERPRINT_FILE).write_text(run_dir.name)
    for old in run_dir.glob("step_*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


def _written_by(checkpoint: Path) -> str | None:
    try:
        return (checkpoint / FINGERPRINT_FILE).read_text()
    except OSError:
        return None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint that this run (the fingerprint `run_dir` is named for) wrote."""
    candidates = sorted(
        p for p in run_dir.glob("step_*") if (p / "state.json").is_file() and _written_by(p) == run_dir.name
    )
    return candidates[-1] if candidates else None


def discard_checkpoints(out_dir: Path, fingerprint: str) -> None:
    """Drop one run's checkpoints (once its adapter is written and vouched for); other runs' stay."""
    shutil.rmtree(checkpoint_root(out_dir) / fingerprint, ignore_errors=True)
    with contextlib.suppress(OSError):
        checkpoint_root(out_dir).rmdir()  # only when no other run keeps checkpoints there


def load_checkpoint(path: Path, model: Any, optimizer: Any) -> tuple[dict, LoopState]:
    import mlx.core as mx
    from mlx.utils import tree_unflatten

    model.load_weights(str(path / "adapters.safetensors"), strict=False)
    optimizer.state = tree_unflatten(list(mx.load(str(path / "optimizer.safetensors")).items()))
    best = dict(mx.load(str(path / "best_adapters.safetensors")))
    state = LoopState(**json.loads((path / "state.json").read_text()))
    return best, state
