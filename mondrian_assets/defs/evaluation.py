"""`eval_report`: base vs fine-tuned on the advisor's validation split; the plan's gates as checks.

The gate checks do not block: `deployed_version` reads the gate results from the report and records a failed
one as a rejection (see defs/deployment.py), so every candidate gets a decision in the same run."""

import base64
from collections.abc import Iterator
from pathlib import Path

import dagster as dg

from mondrian_assets.core.evaluation.gates import GateThresholds
from mondrian_assets.core.evaluation.report import meaningful
from mondrian_assets.core.evaluation.run import EvalSettings, evaluate_adapter
from mondrian_assets.core.registry.versions import adapter_content_hash
from mondrian_assets.defs.config_fields import config_class, values_for
from mondrian_assets.defs.partitions import advisor_partitions
from mondrian_assets.defs.resources import MondrianDatabase
from mondrian_assets.defs.run_workers import MLX_POOL

CODE_VERSION = "3"  # bump when metrics, gates or how outputs are generated change; 2: paired gates, timed overhead;
# 3: compliance under the grammar mask
_EvalFields = config_class("_EvalFields", dg.Config, EvalSettings, GateThresholds)


class EvalRunConfig(_EvalFields):
    """Every evaluation setting and gate threshold, with core's defaults, descriptions and bounds."""

    def settings(self) -> EvalSettings:
        thresholds = GateThresholds(**values_for(GateThresholds, self))
        return EvalSettings(**values_for(EvalSettings, self, thresholds=thresholds))


GATE_CHECKS = [
    dg.AssetCheckSpec("format_compliance", asset="eval_report",
                      description="Fine-tuned outputs that parse and validate: at least the configured share (95%)."),
    dg.AssetCheckSpec("score_mae_vs_base", asset="eval_report",
                      description="Fine-tuned overall-score MAE no worse than the base's on the same examples, an "
                                  "invalid output counting as the worst error (with no valid base output: strictly "
                                  "better than always answering the training mean)."),
    dg.AssetCheckSpec("inference_overhead", asset="eval_report",
                      description="Timed interleaved on the same prompts, the fine-tuned model is not slower than "
                                  "the base by more than the threshold (10%) plus the measured noise."),
]  # fmt: skip


def _headline(m: dict) -> dg.MetadataValue:
    rows = [
        ("format compliance", "format_compliance"),
        ("overall-score MAE (valid outputs only)", "overall_score_mae"),
        ("dimension-score MAE", "dimension_score_mae_mean"),
        ("score correlation", "score_correlation"),
        ("repetition rate", "repetition_rate"),
        ("mean latency (s)", "latency_mean_s"),
        ("decode tokens/s", "decode_tokens_per_s"),
    ]
    cols = ("base_model", "fine_tuned_model", "mean_baseline")

    def cell(col: str, key: str) -> str:
        value = m[col].get(key)
        return "–" if value is None else f"{value:.3f}"

    paired = (m["paired"]["fine_tuned_vs_base"]["mae_a"], m["paired"]["fine_tuned_vs_base"]["mae_b"],
              m["paired"]["fine_tuned_vs_mean_baseline"]["mae_a"])
    lines = ["| metric | base | fine-tuned | mean baseline |", "| --- | --- | --- | --- |",
             "| overall-score MAE, paired | " + " | ".join("–" if v is None else f"{v:.3f}" for v in paired) + " |"]
    lines += [f"| {label} | " + " | ".join(cell(c, key) for c in cols) + " |" for label, key in rows]
    return dg.MetadataValue.md("\n".join(lines))


# MLX runs in a child process: a crash or kill fails the step with its signal, and the retry evaluates again.
@dg.asset(partitions_def=advisor_partitions, group_name="model", kinds={"mlx"}, pool=MLX_POOL, check_specs=GATE_CHECKS,
          code_version=CODE_VERSION, retry_policy=dg.RetryPolicy(max_retries=2, delay=2))
def eval_report(
    context: dg.AssetExecutionContext, config: EvalRunConfig, mondrian_db: MondrianDatabase,
    lora_adapter: dict, train_split: dict, val_split: dict,
) -> Iterator[dg.Output | dg.AssetCheckResult]:  # fmt: skip
    """Is the fine-tuned model better than the base, and by how much? Writes
    evaluation/<advisor>/comparison_report.json and review.html; `deployed_version` decides on its gates."""
    advisor = context.partition_key
    out_dir = mondrian_db.locations().evaluation / advisor
    adapter_sha256 = adapter_content_hash(Path(lora_adapter["adapter_dir"]))  # what is evaluated, for the registry
    try:
        outcome = evaluate_adapter(
            lora_adapter["base_model"], Path(lora_adapter["adapter_dir"]), Path(val_split["json"]),
            Path(train_split["json"]), out_dir, config.settings(), log=context.log.info,
        )  # fmt: skip
    except ValueError as exc:  # a setting or an input that cannot be evaluated: retrying would not help
        raise dg.Failure(f"{advisor}: {exc}", allow_retries=False) from exc
    context.log.info(outcome.verdict)
    metrics = outcome.comparison.as_dict()
    base, tuned = metrics["base_model"], metrics["fine_tuned_model"]
    paired, overhead = outcome.comparison.vs_base, metrics["inference_overhead"]
    constrained = metrics["constrained_decoding"] or {}
    yield dg.Output(
        {"advisor": advisor, "report": str(outcome.paths.report_json), "review": str(outcome.paths.review_html),
         "adapter_dir": lora_adapter["adapter_dir"], "adapter_sha256": adapter_sha256, "data_version": val_split["data_version"],
         "gates_passed": all(g.passed for g in outcome.gates)},
        metadata={
            "verdict": outcome.verdict,
            "headline": _headline(metrics),
            "examples": outcome.examples,
            "meaningful": meaningful(outcome.comparison),  # False below 5 examples: the numbers say nothing
            "base_format_compliance": base["format_compliance"],
            "fine_tuned_format_compliance": tuned["format_compliance"],
            "fine_tuned_format_compliance_constrained": constrained.get("format_compliance_constrained"),
            "constrained_decode_speed_ratio": constrained.get("decode_speed_ratio"),
            "base_overall_score_mae": paired.mae_a,
            "fine_tuned_overall_score_mae": paired.mae_b,
            "mean_baseline_overall_score_mae": outcome.comparison.vs_mean_baseline.mae_a,
            "inference_overhead": overhead["overhead"] if overhead else None,
            "inference_overhead_noise": overhead["noise"] if overhead else None,
            "chart": dg.MetadataValue.md(f"![comparison](data:image/png;base64,{base64.b64encode(outcome.chart_png).decode()})"),
            "report": dg.MetadataValue.path(str(outcome.paths.report_json)),
            "review_page": dg.MetadataValue.path(str(outcome.paths.review_html)),
        },
    )  # fmt: skip
    for gate in outcome.gates:
        yield dg.AssetCheckResult(
            check_name=gate.name, passed=gate.passed,
            metadata={"value": gate.value, "threshold": gate.threshold, "message": gate.message},
        )  # fmt: skip
