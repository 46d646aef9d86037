"""LoRA fine-tuning of a Qwen3-VL advisor with MLX (through mlx-vlm), as plain functions.

The loop reads top to bottom like mlx-examples' LoRA trainer: load the base, freeze it, attach LoRA, iterate
batches, `value_and_grad`, update, report, save. Around it sit the guarantees the pipeline needs:

- training text is built with mlx-vlm's own chat-template and input utilities, the same calls generation makes, and
  the loss covers the assistant's answer only (prompt and image tokens carry none) when `answer_only_loss`;
- the data order and every random draw derive from the seed and the step, and checkpoints (adapter, optimizer,
  step, best-so-far) are keyed by a fingerprint of the config and data, so a resumed run ends where an
  uninterrupted one would;
- `isolation.run_training_subprocess` runs all of it in a child process, so an MLX crash cannot take the caller down.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mondrian_assets.core import atomic
from mondrian_assets.core.training.checkpoints import (
    LoopState,
    checkpoint_root,
    latest_checkpoint,
    load_checkpoint,
    run_fingerprint,
    save_checkpoint,
)
from mondrian_assets.core.training.config import (
    Report,
    ReportFn,
    TrainConfig,
    TrainingConfigError,
    TrainResult,
    check_numbers,
    read_model_config,
    resolve_base_model,
)
from mondrian_assets.core.training.examples import Example, collate, micro_batch, prepare_examples
from mondrian_assets.core.training.lora import apply_lora, count_trainable, load_base

# --- loss ----------------------------------------------------------------------------------------------------


def loss_fn(model: Any, batch: dict) -> tuple[Any, Any]:
    """Mean next-token cross-entropy over the target tokens; also returns their count."""
    import mlx.core as mx
    import mlx.nn as nn

    inputs, targets = batch["input_ids"][:, :-1], batch["input_ids"][:, 1:]
    mask = batch["loss_mask"][:, 1:].astype(mx.float32)
    output = model(inputs, batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])
    logits = output.logits.astype(mx.float32)
    losses = nn.losses.cross_entropy(logits, targets) * mask
    ntoks = mask.sum()
    return losses.sum() / mx.maximum(ntoks, 1.0), ntoks


def evaluate(model: Any, examples: list[Example], batch_size: int, pad_id: int) -> float:
    """Token-weighted mean loss over `examples` (dropout off)."""
    import mlx.core as mx

    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    for start in range(0, len(examples), batch_size):
        loss, ntoks = loss_fn(model, collate(examples[start : start + batch_size], pad_id))
        mx.eval(loss, ntoks)
        total += loss.item() * ntoks.item()
        count += ntoks.item()
    if was_training:
        model.train()
    return total / max(count, 1.0)


def learning_rate_schedule(config: TrainConfig, total_steps: int) -> Callable[[Any], Any]:
    import mlx.core as mx
    import mlx.optimizers as optim

    warmup = min(config.warmup_steps, max(total_steps - 1, 0))
    if config.lr_schedule == "cosine":
        main = optim.cosine_decay(config.learning_rate, max(total_steps - warmup, 1), config.min_learning_rate)
    else:
        main = lambda step: mx.array(config.learning_rate)  # noqa: E731  (optimizers want an array)
    if warmup <= 1:
        return main
    # step k < warmup runs at (k + 1) / warmup of the peak rate
    ramp = optim.linear_schedule(config.learning_rate / warmup, config.learning_rate, warmup - 1)
    return optim.join_schedules([ramp, main], [warmup])


# --- the loop ------------------------------------------------------------------------------------------------


def train_lora(
    config: TrainConfig,
    train_jsonl: Path,
    val_jsonl: Path | None,
    out_dir: Path,
    *,
    data_version: str,
    on_report: ReportFn | None = None,
) -> TrainResult:
    """Fine-tune a LoRA adapter and write it to `out_dir` (atomically). Resumes from a matching checkpoint."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten

    started = time.perf_counter()
    out_dir, train_jsonl = Path(out_dir), Path(train_jsonl)
    val_jsonl = Path(val_jsonl) if val_jsonl is not None else None
    check_numbers(config)
    fingerprint = run_fingerprint(config, train_jsonl, val_jsonl, data_version)
    run_dir = checkpoint_root(out_dir) / fingerprint

    # Load the base and its processor, tokenize the data, freeze the base, attach LoRA.
    model, processor = load_base(config)
    model_config = read_model_config(resolve_base_model(config.base_model))
    train_set = prepare_examples(processor, model_config, train_jsonl, config)
    val_set = prepare_examples(processor, model_config, val_jsonl, config) if val_jsonl and val_jsonl.exists() else []
    if not train_set:
        raise TrainingConfigError(f"the training set {train_jsonl} is empty")
    tokenizer = processor.tokenizer
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    adapter_config = apply_lora(model, config)
    if config.grad_checkpointing:
        from mlx_vlm.trainer import grad_checkpoint

        grad_checkpoint(model.language_model.model.layers[0])
    trainable = count_trainable(model)

    # AdamW with warm-up and schedule; continue from this run's latest checkpoint if there is one.
    micro_per_epoch = math.ceil(len(train_set) / config.batch_size)
    total_steps = config.iters or math.ceil(config.epochs * micro_per_epoch / config.grad_accumulation)
    schedule = learning_rate_schedule(config, total_steps)
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=config.weight_decay)
    optimizer.init(model.trainable_parameters())
    state, best = LoopState(), dict(tree_flatten(model.trainable_parameters()))
    if (checkpoint := latest_checkpoint(run_dir)) is not None:
        best, state = load_checkpoint(checkpoint, model, optimizer)
    resumed_from = state.step
    log = TrainingLog(run_dir / "training_log.jsonl", state.log, on_report)

    if state.step == 0 and val_set:
        state.first_val_loss = track_validation(model, val_set, state, best, config, pad_id)
        log.write({"step": 0, "epoch": 0.0, "val_loss": state.first_val_loss, "trainable_params": trainable})

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    window = Window(time.perf_counter())
    while state.step < total_steps and not state.stopped_early:
        tick = time.perf_counter()
        grads, loss_sum, targets, tokens = accumulate_gradients(
            model, loss_and_grad, train_set, config, state.step, pad_id
        )
        if config.max_grad_norm is not None:
            grads, _ = optim.clip_grad_norm(grads, config.max_grad_norm)
        optimizer.update(model, grads)
        mx.eval(model.trainable_parameters(), optimizer.state)
        state.step += 1
        seconds = time.perf_counter() - tick
        state.trained_tokens, state.train_seconds = state.trained_tokens + tokens, state.train_seconds + seconds
        window.add(loss_sum, targets, tokens, seconds)

        val_loss = None
        if state.step % config.eval_interval == 0 or state.step == total_steps:
            val_loss = track_validation(model, val_set, state, best, config, pad_id)
        if state.step % config.report_interval == 0 or val_loss is not None or state.stopped_early:
            entry = window.flush(state.step, total_steps - state.step, state.step - resumed_from)
            entry |= {
                "epoch": round(state.step * config.grad_accumulation / micro_per_epoch, 3),
                "learning_rate": float(schedule(mx.array(state.step - 1)).item()),
            }
            log.write(entry | ({"val_loss": val_loss} if val_loss is not None else {}))
        if state.step % config.save_interval == 0 and state.step < total_steps and not state.stopped_early:
            save_checkpoint(run_dir, model, optimizer, best, state)

    # The adapter keeps the best-val-loss weights (the last ones when there is no validation set).
    result = TrainResult(
        adapter_dir=str(out_dir),
        first_val_loss=state.first_val_loss,
        best_val_loss=state.best_val_loss,
        final_val_loss=state.last_val_loss,
        best_step=state.best_step if val_set else state.step,
        steps=state.step,
        trainable_params=trainable,
        tokens_per_sec=state.trained_tokens / max(state.train_seconds, 1e-9),
        peak_memory_gb=mx.get_peak_memory() / 1e9,
        duration_sec=time.perf_counter() - started,
        stopped_early=state.stopped_early,
        resumed_from_step=resumed_from,
        train_examples=len(train_set),
        val_examples=len(val_set),
        fingerprint=fingerprint,
    )
    weights = best if val_set else dict(tree_flatten(model.trainable_parameters()))
    adapter_config |= {
        "base_model": config.base_model,
        "data_version": data_version,
        "mondrian_assets_version": package_version(),
        "fingerprint": fingerprint,
        "best_step": result.best_step,
    }
    training_args = {
        "config": config.to_dict(),
        "data_version": data_version,
        "train_jsonl": str(train_jsonl),
        "val_jsonl": str(val_jsonl) if val_jsonl else None,
        "result": result.to_dict(),
    }
    write_adapter(out_dir, weights, adapter_config, training_args, state.log)
    shutil.rmtree(run_dir, ignore_errors=True)
    with contextlib.suppress(OSError):
        checkpoint_root(out_dir).rmdir()  # only when no other run keeps checkpoints there
    return result


def accumulate_gradients(
    model: Any, loss_and_grad: Callable, train_set: list[Example], config: TrainConfig, step: int, pad_id: int
) -> tuple[dict, float, float, int]:
    """Gradients of one optimizer step, averaged over the target tokens of its `grad_accumulation` micro-batches.

    Returns (gradients, summed loss, target tokens, input tokens). Batch contents and dropout draws depend only on
    the seed and the position in the stream, so a resumed run sees exactly what an uninterrupted one saw.
    """
    import mlx.core as mx
    from mlx.utils import tree_map

    grads: dict | None = None
    loss_sum, targets, tokens = 0.0, 0.0, 0
    for k in range(config.grad_accumulation):
        index = step * config.grad_accumulation + k
        mx.random.seed(config.seed * 1_000_003 + index)
        examples = [train_set[i] for i in micro_batch(len(train_set), config.batch_size, config.seed, index)]
        (loss, ntoks), g = loss_and_grad(model, collate(examples, pad_id))
        g = tree_map(lambda x: x * ntoks, g)
        grads = g if grads is None else tree_map(lambda a, b: a + b, grads, g)
        mx.eval(loss, ntoks, grads)
        loss_sum += loss.item() * ntoks.item()
        targets += ntoks.item()
        tokens += sum(len(e.input_ids) for e in examples)
    assert grads is not None
    return tree_map(lambda x: x / max(targets, 1.0), grads), loss_sum, targets, tokens


def track_validation(
    model: Any, val_set: list[Example], state: LoopState, best: dict, config: TrainConfig, pad_id: int
) -> float | None:
    """Evaluate; keep the best weights in `best` and count evaluations without improvement for early stopping."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    if not val_set:
        return None
    value = evaluate(model, val_set, config.batch_size, pad_id)
    state.last_val_loss = value
    if state.best_val_loss is None or value < state.best_val_loss:
        state.best_val_loss, state.best_step, state.evals_without_improvement = value, state.step, 0
        best.clear()
        best.update(tree_flatten(model.trainable_parameters()))
        mx.eval(best)
    else:
        state.evals_without_improvement += 1
        patience = config.early_stopping_patience
        state.stopped_early = patience is not None and state.evals_without_improvement >= patience
    return value


@dataclass
class Window:
    """Training statistics since the last report."""

    loop_started: float
    loss_sum: float = 0.0
    targets: float = 0.0
    tokens: int = 0
    seconds: float = 0.0

    def add(self, loss_sum: float, targets: float, tokens: int, seconds: float) -> None:
        self.loss_sum += loss_sum
        self.targets += targets
        self.tokens += tokens
        self.seconds += seconds

    def flush(self, step: int, steps_left: int, steps_done_here: int) -> Report:
        import mlx.core as mx

        entry: Report = {
            "step": step,
            "train_loss": self.loss_sum / max(self.targets, 1.0),
            "tokens_per_sec": self.tokens / max(self.seconds, 1e-9),
            "peak_memory_gb": mx.get_peak_memory() / 1e9,
            "eta_sec": steps_left * (time.perf_counter() - self.loop_started) / max(steps_done_here, 1),
        }
        self.loss_sum, self.targets, self.tokens, self.seconds = 0.0, 0.0, 0, 0.0
        return entry


class TrainingLog:
    """Report lines: kept in the loop state (checkpointed), appended to a file as they come, passed to on_report."""

    def __init__(self, path: Path, entries: list[Report], on_report: ReportFn | None) -> None:
        self.path, self.entries, self.on_report = path, entries, on_report
        # a resumed run drops the lines written after the checkpoint it resumes from
        atomic.write_jsonl(path, entries)

    def write(self, entry: Report) -> None:
        self.entries.append(entry)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
        if self.on_report is not None:
            self.on_report(entry)


def write_adapter(out_dir: Path, weights: dict, adapter_config: dict, training_args: dict, log: list[Report]) -> None:
    """The adapter folder `mlx_vlm.load(base, adapter_path=out_dir)` reads, written in one atomic rename."""
    import mlx.core as mx

    with atomic.staged_dir(out_dir) as stage:
        mx.save_safetensors(str(stage / "adapters.safetensors"), weights)
        _write_json(stage / "adapter_config.json", adapter_config)
        _write_json(stage / "training_args.json", training_args)
        (stage / "training_log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in log))


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mondrian-assets")
    except PackageNotFoundError:
        return "0+unknown"


def _write_json(path: Path, value: object) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
