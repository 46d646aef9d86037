"""One evaluation, start to finish: base and fine-tuned on the same validation examples, metrics, gates, report.

It takes paths, not assets, so any adapter version can be evaluated against any validation data version
(the `eval_report` asset, the nightly re-check and the CLI all call `evaluate_adapter`).
"""

from __future__ import annotations

import gc
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mondrian_assets.core.evaluation.charts import comparison_chart_png
from mondrian_assets.core.evaluation.gates import GateResult, GateThresholds, evaluate_gates, verdict
from mondrian_assets.core.evaluation.metrics import Comparison, compare
from mondrian_assets.core.evaluation.report import ReportPaths, write_comparison_report
from mondrian_assets.core.inference.generate import generate_analyses, load_eval_examples, max_tokens_for
from mondrian_assets.core.inference.loading import load_for_inference
from mondrian_assets.core.schema import Analysis, parse_analysis


@dataclass(frozen=True)
class EvalSettings:
    max_examples: int | None = None  # None: the whole validation set
    max_tokens: int | None = None  # None: the longest reference in tokens plus a margin
    batch_size: int = 4
    seed: int = 0
    thresholds: GateThresholds = field(default_factory=GateThresholds)


@dataclass(frozen=True)
class EvalOutcome:
    comparison: Comparison
    gates: list[GateResult]
    verdict: str
    paths: ReportPaths
    chart_png: bytes
    examples: int
    max_tokens: int


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
) -> EvalOutcome:
    examples = load_eval_examples(val_json, limit=settings.max_examples)
    if not examples:
        raise ValueError(f"{val_json} holds no validation examples")
    generations = {}
    max_tokens = settings.max_tokens
    for label, adapter in (("base", None), ("fine-tuned", adapter_dir)):
        loaded = load_for_inference(base_model, adapter)  # fused: the adapter costs no extra decode work
        max_tokens = max_tokens or max_tokens_for(loaded, [e.reference for e in examples])
        log(f"{label}: generating {len(examples)} analyses (greedy, max {max_tokens} tokens, batch {settings.batch_size})")
        generations[label] = generate_analyses(
            loaded, examples, max_tokens=max_tokens, seed=settings.seed, batch_size=settings.batch_size
        )
        del loaded
        gc.collect()  # one model in memory at a time: two 4B models would not fit a small Mac

    comparison = compare(examples, generations["base"], generations["fine-tuned"], _train_references(train_json))
    gates = evaluate_gates(comparison, settings.thresholds)
    text = verdict(comparison, gates)
    chart = comparison_chart_png(comparison)
    paths = write_comparison_report(
        out_dir,
        comparison=comparison,
        gates=gates,
        verdict=text,
        examples=examples,
        base_generations=generations["base"],
        fine_tuned_generations=generations["fine-tuned"],
        base_model=base_model,
        lora_path=adapter_dir,
        validation_data=val_json,
        settings={"max_examples": settings.max_examples, "max_tokens": max_tokens, "batch_size": settings.batch_size,
                  "seed": settings.seed, "decoding": "greedy", "thresholds": settings.thresholds.__dict__},  # fmt: skip
        chart_png=chart,
    )
    return EvalOutcome(comparison, gates, text, paths, chart, len(examples), max_tokens or 0)
