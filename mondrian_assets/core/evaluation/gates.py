"""The deployment gates over a comparison, and the verdict: what the numbers mean, in sentences."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Annotated

from pydantic import Field

from mondrian_assets.core.evaluation.metrics import Comparison
from mondrian_assets.core.evaluation.paired import PAIRED_RULE, WORST_SCORE_ERROR

OVERHEAD_RULE = (
    "The inference overhead is timed on the same prompts, base and fine-tuned interleaved and repeated, each run "
    "decoding the same number of tokens; it is the median of the paired time ratios, and the gate fails only "
    "when it exceeds the threshold by more than the noise (the median change of one model against itself "
    "between repeats)."
)
RULES = {"score_comparison": PAIRED_RULE, "inference_overhead": OVERHEAD_RULE}

# --- gates ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GateThresholds:
    """The plan's bars. Scores are compared paired (`paired.PAIRED_RULE`): the fine-tuned overall-score MAE may
    exceed the base's by at most `mae_tolerance`. When the base has no valid output, with
    `fallback_to_mean_baseline` the fine-tuned MAE must instead be strictly below always answering the training
    mean, on the same examples (a tie means the model ignores the image); without it the gate passes, there being
    nothing to regress from. The overhead gate fails only when the measured overhead exceeds
    `max_inference_overhead` by more than the timing noise measured in the same run."""

    min_format_compliance: Annotated[float, Field(ge=0.0, le=1.0, description=(
        "Gate: the share of fine-tuned outputs that parse and validate must be at least this."))] = 0.95
    mae_tolerance: Annotated[float, Field(ge=-WORST_SCORE_ERROR, le=WORST_SCORE_ERROR, description=(
        "Gate: how far the fine-tuned paired overall-score MAE may exceed the base's (negative: must beat it)."))] = 0.0
    fallback_to_mean_baseline: Annotated[bool, Field(description=(
        "With no valid base output, require strictly beating always answering the training mean."))] = True
    max_inference_overhead: Annotated[float, Field(ge=0.0, description=(
        "Gate: fine-tuned vs base time on the same prompts, beyond the measured noise (0.10: 10% slower)."))] = 0.10


@dataclass(frozen=True)
class GateResult:
    name: str
    passed: bool
    value: float | None
    threshold: float | None
    message: str

    def as_dict(self) -> dict:
        return asdict(self)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "undefined" if value is None else f"{value:.{digits}f}"


def format_gate(metrics: Comparison, t: GateThresholds) -> GateResult:
    value = metrics.fine_tuned.format_compliance
    passed = value is not None and value >= t.min_format_compliance
    message = (
        f"fine-tuned format compliance {_fmt(value)} "
        f"({metrics.fine_tuned.valid_outputs}/{metrics.fine_tuned.examples} valid) "
        f"{'>=' if passed else 'is below'} {t.min_format_compliance:.3f}"
    )
    return GateResult("format_compliance", passed, value, t.min_format_compliance, message)


def score_gate(metrics: Comparison, t: GateThresholds) -> GateResult:
    """Paired on the same examples, an invalid output counting as the worst error (`paired.PAIRED_RULE`)."""
    name = "score_mae_vs_base"
    vs_base, vs_mean = metrics.vs_base, metrics.vs_mean_baseline
    ft_mae = vs_base.mae_b
    if ft_mae is None:
        return GateResult(name, False, None, None, "no validation example has a valid reference analysis")
    on = f"on the same {vs_base.examples} examples"
    if vs_base.valid_a > 0:
        bar = vs_base.mae_a + t.mae_tolerance
        passed = vs_base.b_no_worse(t.mae_tolerance)
        verb = "is no worse than" if passed else "is worse than"
        message = f"fine-tuned overall-score MAE {ft_mae:.3f} {verb} the base's {vs_base.mae_a:.3f} {on}"
    elif not t.fallback_to_mean_baseline:
        return GateResult(name, True, ft_mae, None, "the base produced no valid output: nothing to regress from")
    elif metrics.mean_baseline.predicted_overall is None:
        return GateResult(name, False, ft_mae, None, "the base has no valid output and there is no training mean")
    else:
        # a tie with always-the-training-mean is no evidence of reading the image, so this bar is strict
        bar = vs_mean.mae_a + t.mae_tolerance
        passed = vs_mean.b_strictly_better(t.mae_tolerance)
        verb = "beats" if passed else "does not beat"
        message = (
            f"the base has no valid output; fine-tuned overall-score MAE {ft_mae:.3f} {verb} "
            f"the mean-score baseline's {vs_mean.mae_a:.3f} {on}"
        )
    if vs_base.valid_b < vs_base.examples:
        message += f" ({vs_base.examples - vs_base.valid_b} invalid fine-tuned outputs counted as {vs_base.invalid_error:g})"
    return GateResult(name, passed, ft_mae, bar, message)


def overhead_gate(metrics: Comparison, t: GateThresholds) -> GateResult:
    """Fails only when the interleaved, paired overhead is above the threshold by more than the measured noise."""
    name, measured = "inference_overhead", metrics.overhead
    if measured is None:
        return GateResult(name, False, None, t.max_inference_overhead, "the inference overhead was not measured")
    bar = t.max_inference_overhead + measured.noise
    passed = measured.overhead <= bar
    message = (
        f"fine-tuned vs base time on the same prompts {measured.overhead:+.1%} (median of {measured.pairs} "
        f"interleaved pairs, {measured.tokens} tokens each); same-model noise {measured.noise:.1%}; "
        f"{'within' if passed else 'beyond'} {t.max_inference_overhead:.0%} + noise"
    )
    return GateResult(name, passed, measured.overhead, bar, message)


def evaluate_gates(metrics: Comparison, thresholds: GateThresholds | None = None) -> list[GateResult]:
    t = thresholds or GateThresholds()
    return [format_gate(metrics, t), score_gate(metrics, t), overhead_gate(metrics, t)]


# --- verdict -------------------------------------------------------------------------------------------------

NOT_LOOKING = "learned the format but not to look at the image"


def _compliance_sentence(m: Comparison) -> str:
    ft, base = m.fine_tuned, m.base
    return (
        f"Format: fine-tuned {ft.valid_outputs}/{ft.examples} valid ({_fmt(ft.format_compliance, 2)}), "
        f"base {base.valid_outputs}/{base.examples} ({_fmt(base.format_compliance, 2)})."
    )


def _score_sentence(m: Comparison, format_learned: bool) -> str:
    ft_mae, mean_mae = m.fine_tuned.overall_score_mae, m.mean_baseline.overall_score_mae
    paired = m.vs_base
    text = (
        f"Overall-score MAE on the same {paired.examples} examples (an invalid output counts as "
        f"{paired.invalid_error:g}): fine-tuned {_fmt(paired.mae_b, 2)}, base {_fmt(paired.mae_a, 2)}, "
        f"always-the-training-mean {_fmt(m.vs_mean_baseline.mae_a, 2)}."
    )
    if ft_mae is None:
        return text + " The fine-tuned model produced no valid analysis: it learned neither the format nor the scores."
    if mean_mae is not None and ft_mae >= mean_mae:
        if format_learned:
            return text + (
                f" The fine-tuned model {NOT_LOOKING}: its scores are no better than always answering the training "
                "mean."
            )
        return text + (
            " The fine-tuned model learned neither the format nor to look at the image: even its valid answers score "
            "no better than always answering the training mean."
        )
    return text


def _delta_sentence(m: Comparison) -> str:
    compliance = m.improvements.get("format_compliance")
    mae = m.vs_base.b_minus_a
    parts = [
        "format compliance " + ("undefined" if compliance is None else f"{compliance:+.2f}"),
        "paired overall-score MAE " + ("not comparable" if mae is None else f"{mae:+.2f} (negative is better)"),
    ]
    return "Fine-tuned minus base: " + ", ".join(parts) + "."


def verdict(metrics: Comparison, gates: Sequence[GateResult]) -> str:
    """Plain sentences: compliance, scores against base and baseline, gates, and the one-line answer."""
    failed = [g.name for g in gates if not g.passed]
    format_learned = any(g.name == "format_compliance" and g.passed for g in gates)
    gate_text = "All gates passed." if not failed else f"Failed gates: {', '.join(failed)}."
    answer = "Deploy: yes." if not failed else "Deploy: no."
    sentences = [
        _compliance_sentence(metrics),
        _score_sentence(metrics, format_learned),
        _delta_sentence(metrics),
        gate_text,
        answer,
    ]
    return " ".join(sentences)
