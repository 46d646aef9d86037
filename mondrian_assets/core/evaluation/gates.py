"""The deployment gates over a comparison, and the verdict: what the numbers mean, in sentences."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from mondrian_assets.core.evaluation.metrics import Comparison

# --- gates ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GateThresholds:
    """The plan's bars. `mae_tolerance` lets the fine-tuned MAE exceed the reference by that much.
    When the base has no valid output its MAE is undefined; with `fallback_to_mean_baseline` the fine-tuned
    MAE must then be strictly below the training-mean baseline's instead (a tie means the model ignores the
    image); without it the gate passes, there being nothing to regress from.
    `overhead_basis`: "decode" (per-token decode time ratio - 1, the default: the adapter's own cost) or
    "latency" (mean latency ratio - 1, the plan's wording, which also moves with how long each model's answers
    are: a fine-tuned model that writes complete analyses where the base stopped early would fail it)."""

    min_format_compliance: float = 0.95
    mae_tolerance: float = 0.0
    fallback_to_mean_baseline: bool = True
    max_inference_overhead: float = 0.10
    overhead_basis: str = "decode"


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
    name = "score_mae_vs_base"
    ft_mae, base_mae = metrics.fine_tuned.overall_score_mae, metrics.base.overall_score_mae
    if ft_mae is None:
        return GateResult(name, False, None, base_mae, "the fine-tuned model produced no valid scored output")
    if base_mae is not None:
        bar = base_mae + t.mae_tolerance
        passed = ft_mae <= bar
        verb = "is no worse than" if passed else "is worse than"
        message = f"fine-tuned overall-score MAE {ft_mae:.3f} {verb} the base's {base_mae:.3f}"
    elif not t.fallback_to_mean_baseline:
        return GateResult(name, True, ft_mae, None, "the base produced no valid output: nothing to regress from")
    elif metrics.mean_baseline.overall_score_mae is None:
        return GateResult(name, False, ft_mae, None, "base MAE and mean-baseline MAE are both undefined")
    else:
        # a tie with always-the-training-mean is no evidence of reading the image, so this bar is strict
        bar = metrics.mean_baseline.overall_score_mae + t.mae_tolerance
        passed = ft_mae < bar
        verb = "beats" if passed else "does not beat"
        message = (
            f"the base has no valid output; fine-tuned overall-score MAE {ft_mae:.3f} {verb} "
            f"the mean-score baseline's {bar:.3f}"
        )
    return GateResult(name, passed, ft_mae, bar, message)


def overhead_gate(metrics: Comparison, t: GateThresholds) -> GateResult:
    if t.overhead_basis not in ("decode", "latency"):
        raise ValueError(f"overhead_basis must be 'decode' or 'latency', not {t.overhead_basis!r}")
    key = "decode_overhead" if t.overhead_basis == "decode" else "inference_overhead"
    value = metrics.improvements.get(key)
    if value is None:
        return GateResult("inference_overhead", False, None, t.max_inference_overhead, f"{key} is undefined")
    passed = value < t.max_inference_overhead
    message = f"{key} {value:+.1%} {'<' if passed else '>='} {t.max_inference_overhead:.0%}"
    return GateResult("inference_overhead", passed, value, t.max_inference_overhead, message)


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
    ft_mae, base_mae = m.fine_tuned.overall_score_mae, m.base.overall_score_mae
    mean_mae = m.mean_baseline.overall_score_mae
    text = (
        f"Overall-score MAE: fine-tuned {_fmt(ft_mae, 2)} (on {m.fine_tuned.scored_examples}), "
        f"base {_fmt(base_mae, 2)} (on {m.base.scored_examples}), always-the-training-mean {_fmt(mean_mae, 2)}."
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
    mae = m.improvements.get("overall_score_mae")
    parts = [
        "format compliance " + ("undefined" if compliance is None else f"{compliance:+.2f}"),
        "overall-score MAE " + ("not comparable" if mae is None else f"{mae:+.2f} (negative is better)"),
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
