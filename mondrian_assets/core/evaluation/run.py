"""One evaluation, start to finish: base and fine-tuned on the same validation examples, metrics, gates, report.

It takes paths, not assets, so any adapter version can be evaluated against any validation data version
(the `eval_report` asset, the nightly re-check and the CLI all call `evaluate_adapter`). MLX runs in a child
process (core/isolation.py), as training does: a crash there fails the evaluation, not the caller.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated

from pydantic import Field

from mondrian_assets.core.atomic import WriteFailed
from mondrian_assets.core.base_model import resolve_base
from mondrian_assets.core.evaluation.charts import comparison_chart_png
from mondrian_assets.core.evaluation.constrained_compliance import constrained_compliance
from mondrian_assets.core.evaluation.gates import GateResult, GateThresholds, evaluate_gates, verdict
from mondrian_assets.core.evaluation.metrics import Comparison, compare
from mondrian_assets.core.evaluation.overhead import measure_overhead
from mondrian_assets.core.evaluation.report import ReportPaths, write_comparison_report
from mondrian_assets.core.inference.generate import (
    decoding_label,
    generate_analyses,
    load_eval_examples,
    max_tokens_for,
)
from mondrian_assets.core.inference.loading import LoadedModel, load_for_inference
from mondrian_assets.core.inference.records import Generation
from mondrian_assets.core.isolation import ChildProcessFailed, run_in_child
from mondrian_assets.core.schema import Analysis, parse_analysis
from mondrian_assets.core.settings import bound_violations


@dataclass(frozen=True)
class EvalSettings:
    max_examples: Annotated[int | None, Field(ge=1, description=(
        "Evaluate at most this many validation examples; empty: all."))] = None
    max_tokens: Annotated[int | None, Field(ge=1, description=(
        "Generation cap; empty: the longest reference in tokens plus a margin."))] = None
    batch_size: Annotated[int, Field(ge=1, description="Validation examples decoded together (1: one by one).")] = 4
    seed: Annotated[int, Field(ge=0, description="Decoding seed (greedy decoding uses it only for ties).")] = 0
    overhead_prompts: Annotated[int, Field(ge=1, description=(
        "Validation prompts the inference overhead is timed on."))] = 2
    overhead_repeats: Annotated[int, Field(ge=2, description=(
        "Interleaved base / fine-tuned rounds over those prompts (two or more: the noise is measured between them)."
    ))] = 5
    overhead_tokens: Annotated[int, Field(ge=1, description="Tokens each timed run decodes.")] = 16
    expected_scores: Annotated[bool, Field(description=(
        "Score values at the expected value of the model's belief over them (off: greedy, like every other token)."
    ))] = True
    thresholds: GateThresholds = field(default_factory=GateThresholds)


def decoded_expected_scores(report_settings: dict) -> bool:
    """Whether the evaluation behind a report's `settings` decoded score values at their expectation; a report
    written before the setting existed decoded them greedily."""
    return bool(report_settings.get("expected_scores", False))


@dataclass(frozen=True)
class EvalOutcome:
    comparison: Comparison
    gates: list[GateResult]
    verdict: str
    paths: ReportPaths
    chart_png: bytes
    examples: int
    max_tokens: int


class EvaluationFailed(ChildProcessFailed):
    """The evaluation's child process died (a crash, a signal) or failed with an unexpected error."""


def _train_references(train_json: Path) -> list[Analysis]:
    parsed = (parse_analysis(row["response"]) for row in json.loads(train_json.read_text()))
    return [p.analysis for p in parsed if p.analysis is not None]


def evaluate_adapter(
    base_model: str,
    adapter_dir: Path,
    val_json: Path,
    train_json: Path,
    out_dir: Path,
    settings: EvalSettings = EvalSettings(),
    log: Callable[[str], None] = print,
    env: dict[str, str] | None = None,
) -> EvalOutcome:
    """`evaluate_in_process` in a child process; its log lines stream back to `log`. A bad setting or input
    raises its ValueError here; a crash of the child raises EvaluationFailed with its exit code or signal."""
    return run_in_child(
        evaluate_in_process,
        {"base_model": base_model, "adapter_dir": adapter_dir, "val_json": val_json, "train_json": train_json,
         "out_dir": out_dir, "settings": settings},
        what="evaluation", report_to="log", on_report=log, env=env, expected=(ValueError, WriteFailed),
        failure=EvaluationFailed,
    )  # fmt: skip


def evaluate_in_process(
    base_model: str,
    adapter_dir: Path,
    val_json: Path,
    train_json: Path,
    out_dir: Path,
    settings: EvalSettings = EvalSettings(),
    log: Callable[[str], None] = print,
) -> EvalOutcome:
    """Base and fine-tuned on the validation examples, in this process (MLX runs here): metrics, gates, report."""
    if problems := bound_violations(settings):
        raise ValueError("evaluation settings: " + "; ".join(problems))
    examples = load_eval_examples(val_json, limit=settings.max_examples)
    if not examples:
        raise ValueError(f"{val_json} holds no validation examples")
    base_model = str(resolve_base(base_model).path)  # a hub id from the local cache, like training
    # One model in memory at a time for the long generations (two 4B models would not fit a small Mac); both
    # only while the overhead is timed, interleaved on a few prompts.
    base = load_for_inference(base_model, None)
    decoding = decoding_label(settings.expected_scores, base.tokenizer)
    max_tokens = settings.max_tokens or max_tokens_for(base, [e.reference for e in examples])

    def generate(label: str, loaded: LoadedModel) -> list[Generation]:
        log(f"{label}: generating {len(examples)} analyses ({decoding}, "
            f"max {max_tokens} tokens, batch {settings.batch_size})")
        return generate_analyses(loaded, examples, max_tokens=max_tokens, seed=settings.seed,
                                 batch_size=settings.batch_size, expected_scores=settings.expected_scores)  # fmt: skip

    base_generations = generate("base", base)
    tuned = load_for_inference(base_model, adapter_dir)  # fused: the adapter costs no extra decode work
    log(f"timing the inference overhead: {settings.overhead_repeats} interleaved rounds on "
        f"{min(settings.overhead_prompts, len(examples))} prompts, {settings.overhead_tokens} tokens each")
    overhead = measure_overhead(base, tuned, examples[: settings.overhead_prompts],
                                repeats=settings.overhead_repeats, tokens=settings.overhead_tokens)  # fmt: skip
    del base
    gc.collect()
    tuned_generations = generate("fine-tuned", tuned)
    # what the service gives users (it decodes under the grammar mask by default), beside what the model learned
    constrained = constrained_compliance(
        tuned, examples, tuned_generations, max_tokens=max_tokens, seed=settings.seed,
        expected_scores=settings.expected_scores, timing_prompts=settings.overhead_prompts,
        repeats=settings.overhead_repeats, tokens=settings.overhead_tokens, log=log,
    )  # fmt: skip
    del tuned
    gc.collect()

    comparison = compare(examples, base_generations, tuned_generations, _train_references(train_json), overhead,
                         constrained)  # fmt: skip
    gates = evaluate_gates(comparison, settings.thresholds)
    text = verdict(comparison, gates)
    chart = comparison_chart_png(comparison)
    paths = write_comparison_report(
        out_dir,
        comparison=comparison,
        gates=gates,
        verdict=text,
        examples=examples,
        base_generations=base_generations,
        fine_tuned_generations=tuned_generations,
        base_model=base_model,
        lora_path=adapter_dir,
        validation_data=val_json,
        settings=asdict(settings) | {"max_tokens": max_tokens, "decoding": decoding},
        chart_png=chart,
    )
    return EvalOutcome(comparison, gates, text, paths, chart, len(examples), max_tokens or 0)
