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

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mondrian_assets.core import atomic
from mondrian_assets.core.training.checkpoints import (
    LoopState,
    checkpoint_root,
    discard_checkpoints,
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
from mondrian_assets.core.training.lora import count_trainable, load_trainable_model
from mondrian_assets.core.training.metal import release_cached_buffers, wire_model_memory
from mondrian_assets.core.training.speed import SpeedOptions, speed_options

# --- loss ----------------------------------------------------------------------------------------------------


def loss_fn(model: Any, batch: dict, scale: float, options: SpeedOptions) -> Any:
    """`scale` times the summed next-token cross-entropy over the batch's target tokens.

    With `scale` = 1 / (target tokens of the whole optimizer step), the gradients of the micro-batches simply add
    up to those of the token-weighted mean: no per-gradient rescaling, no device value read back on the host.
    """
    import mlx.core as mx

    inputs, targets = batch["input_ids"][:, :-1], batch["input_ids"][:, 1:]
    positions = batch["target_positions"]
    if options.answer_only_projection:
        lm = model.language_model
        hidden = model.hidden_state_at_layer(
            inputs, len(lm.model.layers), batch["pixel_values"], image_grid_thw=batch["image_grid_thw"]
        )
        hidden = lm.model.norm(hidden)
        rows = hidden.reshape(-1, hidden.shape[-1])[positions]
        logits = lm.model.embed_tokens.as_linear(rows) if lm.args.tie_word_embeddings else lm.lm_head(rows)
    else:
        logits = model(inputs, batch["pixel_values"], image_grid_thw=batch["image_grid_thw"]).logits
        logits = logits.reshape(-1, logits.shape[-1])[positions]
    if options.upcast_logits:
        logits = logits.astype(mx.float32)
    losses = mx.fast.cross_entropy(logits, targets.reshape(-1)[positions])
    return (losses * batch["target_weights"]).sum() * scale


def evaluate(model: Any, examples: list[Example], batch_size: int, pad_id: int, options: SpeedOptions) -> float:
    """Token-weighted mean loss over `examples` (dropout off); one host read at the end."""
    import mlx.core as mx

    was_training = model.training
    model.eval()
    total, count = mx.array(0.0), 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], pad_id, options.length_multiple, options.align_input)
        total = total + loss_fn(model, batch, 1.0, options)
        count += batch["targets"]
        mx.eval(total)
    if was_training:
        model.train()
    return total.item() / max(count, 1)


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


def make_optimizer(config: TrainConfig, total_steps: int, model: Any) -> tuple[Any, Callable[[Any], Any]]:
    """AdamW over the trainable parameters with the configured warm-up and schedule."""
    import mlx.optimizers as optim

    schedule = learning_rate_schedule(config, total_steps)
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=config.weight_decay)
    optimizer.init(model.trainable_parameters())
    return optimizer, schedule


# --- the step ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepStats:
    loss: Any  # the step's mean loss over its target tokens, an evaluated mx.array (read it only when reporting)
    targets: int  # target tokens
    tokens: int  # input tokens, padding not counted


class TrainStep:
    """One optimizer step: `grad_accumulation` micro-batches, clipping, the AdamW update, one evaluation.

    Batch contents and dropout draws depend only on the seed and the position in the stream, so a resumed run sees
    exactly what an uninterrupted one saw. Nothing waits on the device but the final evaluation.
    """

    def __init__(
        self, model: Any, optimizer: Any, train_set: list[Example], config: TrainConfig, pad_id: int,
        options: SpeedOptions,
    ) -> None:  # fmt: skip
        import mlx.nn as nn

        self.model, self.optimizer, self.train_set = model, optimizer, train_set
        self.config, self.pad_id, self.options = config, pad_id, options
        self.loss_and_grad = nn.value_and_grad(model, loss_fn)

    def __call__(self, step: int) -> StepStats:
        import mlx.core as mx
        import mlx.optimizers as optim
        from mlx.utils import tree_map

        config = self.config
        first = step * config.grad_accumulation
        micro = [
            [self.train_set[i] for i in micro_batch(len(self.train_set), config.batch_size, config.seed, index)]
            for index in range(first, first + config.grad_accumulation)
        ]
        options = self.options
        batches = [collate(examples, self.pad_id, options.length_multiple, options.align_input) for examples in micro]
        targets = sum(b["targets"] for b in batches)
        grads, loss = None, mx.array(0.0)
        for index, batch in enumerate(batches, first):
            if config.lora_dropout > 0:  # the only random draws of a step
                mx.random.seed(config.seed * 1_000_003 + index)
            value, g = self.loss_and_grad(self.model, batch, 1.0 / max(targets, 1), self.options)
            grads = g if grads is None else tree_map(mx.add, grads, g)
            loss = loss + value
            if index < first + len(batches) - 1:
                mx.async_eval(grads)  # bounds the graph to one micro-batch without waiting for it
        if config.max_grad_norm is not None:
            grads, _ = optim.clip_grad_norm(grads, config.max_grad_norm)
        self.optimizer.update(self.model, grads)
        mx.eval(self.model.trainable_parameters(), self.optimizer.state, loss)
        return StepStats(loss, targets, sum(len(e.input_ids) for examples in micro for e in examples))


# --- the loop ------------------------------------------------------------------------------------------------


def train_lora(
    config: TrainConfig,
    train_jsonl: Path,
    val_jsonl: Path | None,
    out_dir: Path,
    *,
    data_version: str,
    on_report: ReportFn | None = None,
    keep_checkpoints: bool = False,
) -> TrainResult:
    """Fine-tune a LoRA adapter and write it to `out_dir` (atomically). Resumes from a matching checkpoint.
    `keep_checkpoints` leaves a final one for the caller to discard once the adapter passed its checks, so a retry
    after a failed check resumes at the end instead of training again."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    started = time.perf_counter()
    wire_model_memory()
    out_dir, train_jsonl = Path(out_dir), Path(train_jsonl)
    val_jsonl = Path(val_jsonl) if val_jsonl is not None else None
    check_numbers(config)
    fingerprint = run_fingerprint(config, train_jsonl, val_jsonl, data_version)
    run_dir = checkpoint_root(out_dir) / fingerprint

    # Load the base and its processor, tokenize the data, freeze the base, attach LoRA.
    options = speed_options()
    model, processor, adapter_config = load_trainable_model(config, options)
    model_config = read_model_config(resolve_base_model(config.base_model))
    train_set = prepare_examples(processor, model_config, train_jsonl, config)
    val_set = prepare_examples(processor, model_config, val_jsonl, config) if val_jsonl and val_jsonl.exists() else []
    if not train_set:
        raise TrainingConfigError(f"the training set {train_jsonl} is empty")
    tokenizer = processor.tokenizer
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    trainable = count_trainable(model)

    # AdamW with warm-up and schedule; continue from this run's latest checkpoint if there is one.
    micro_per_epoch = math.ceil(len(train_set) / config.batch_size)
    total_steps = config.iters or math.ceil(config.epochs * micro_per_epoch / config.grad_accumulation)
    optimizer, schedule = make_optimizer(config, total_steps, model)
    state, best = LoopState(), dict(tree_flatten(model.trainable_parameters()))
    if (checkpoint := latest_checkpoint(run_dir)) is not None:
        best, state = load_checkpoint(checkpoint, model, optimizer)
    resumed_from = state.step
    log = TrainingLog(run_dir / "training_log.jsonl", state.log, on_report)

    if state.step == 0 and val_set:
        state.first_val_loss = track_validation(model, val_set, state, best, config, pad_id, options)
        log.write({"step": 0, "epoch": 0.0, "val_loss": state.first_val_loss, "trainable_params": trainable})

    train_step = TrainStep(model, optimizer, train_set, config, pad_id, options)
    window = Window(time.perf_counter())
    while state.step < total_steps and not state.stopped_early:
        tick = time.perf_counter()
        stats = train_step(state.step)
        release_cached_buffers()
        state.step += 1
        seconds = time.perf_counter() - tick
        state.trained_tokens, state.train_seconds = state.trained_tokens + stats.tokens, state.train_seconds + seconds
        window.add(stats, seconds)

        val_loss = None
        if state.step % config.eval_interval == 0 or state.step == total_steps:
            val_loss = track_validation(model, val_set, state, best, config, pad_id, options)
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
    if keep_checkpoints:
        save_checkpoint(run_dir, model, optimizer, best, state)
    else:
        discard_checkpoints(out_dir, fingerprint)
    return result


def track_validation(
    model: Any, val_set: list[Example], state: LoopState, best: dict, config: TrainConfig, pad_id: int,
    options: SpeedOptions,
) -> float | None:  # fmt: skip
    """Evaluate; keep the best weights in `best` and count evaluations without improvement for early stopping."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    if not val_set:
        return None
    value = evaluate(model, val_set, config.batch_size, pad_id, options)
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
    loss_sum: Any = 0.0  # an mx.array once a step was added: read back only at the report
    targets: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def add(self, stats: StepStats, seconds: float) -> None:
        self.loss_sum = self.loss_sum + stats.loss * stats.targets
        self.targets += stats.targets
        self.tokens += stats.tokens
        self.seconds += seconds

    def flush(self, step: int, steps_left: int, steps_done_here: int) -> Report:
        import mlx.core as mx

        entry: Report = {
            "step": step,
            "train_loss": float(self.loss_sum) / max(self.targets, 1),
            "tokens_per_sec": self.tokens / max(self.seconds, 1e-9),
            "peak_memory_gb": mx.get_peak_memory() / 1e9,
            "eta_sec": steps_left * (time.perf_counter() - self.loop_started) / max(steps_done_here, 1),
        }
        self.loss_sum, self.targets, self.tokens, self.seconds = 0.0, 0, 0, 0.0
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
