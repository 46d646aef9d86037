"""Base-vs-fine-tuned evaluation metrics, the mean-score baseline and the comparison.

Pure functions over plain records: no MLX, no Dagster, no I/O. Inference produces `Generation`s for
`EvalExample`s; everything here turns them into numbers a person can trust.

Conventions
- An output counts as *valid* only when `schema.parse_analysis` accepts it whole; each model's own score
  errors (MAE, correlation, copy rate) are computed over its valid outputs whose reference is also valid, and
  `scored_examples` says how many that was. A model with no valid output has undefined (None) score metrics,
  never 0. Comparisons between models (and the gates) use the paired rule of `paired.py` instead: the same
  examples for both, an invalid output counted as the worst possible error.
- Improvements are fine-tuned minus base: positive is better for compliance and tokens/s, negative is
  better for MAE, latency and repetition.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from mondrian_assets.core import schema
from mondrian_assets.core.evaluation.constrained_compliance import ConstrainedCompliance
from mondrian_assets.core.evaluation.overhead import OverheadMeasurement
from mondrian_assets.core.evaluation.paired import PairedComparison, overall_scores, paired_score_errors
from mondrian_assets.core.inference.records import EvalExample, Generation, is_repetitive
from mondrian_assets.core.schema import Analysis, ParseResult

# --- small statistics ----------------------------------------------------------------------------------------


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Pearson correlation; None with fewer than two pairs or when either side is constant."""
    if len(xs) != len(ys) or len(xs) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def _rate(hits: int, total: int) -> float | None:
    return hits / total if total else None


# --- per-model metrics ---------------------------------------------------------------------------------------


def invalid_fields(parsed: ParseResult) -> dict[str, str]:
    """Top-level field -> problem (an output with no JSON at all fails every field)."""
    return dict(parsed.field_errors)


def format_compliance(parsed: Sequence[ParseResult]) -> float | None:
    """Fraction of outputs that parse and validate against the canonical schema."""
    return _rate(sum(p.ok for p in parsed), len(parsed))


def field_compliance(parsed: Sequence[ParseResult]) -> dict[str, float]:
    """Per top-level field: fraction of outputs where that field is present and valid. Outputs that are not
    JSON at all count as invalid for every field. `case_studies` is optional and appears only if it failed."""
    errors = [invalid_fields(p) for p in parsed]
    fields = list(schema.REQUIRED_FIELDS)
    fields += sorted({f for e in errors for f in e if f not in fields})
    if not parsed:
        return {f: 0.0 for f in fields}
    return {f: sum(f not in e for e in errors) / len(errors) for f in fields}


def scored_pairs(
    parsed: Sequence[ParseResult], references: Sequence[Analysis | None]
) -> list[tuple[Analysis, Analysis]]:
    """(prediction, reference) for each example where both are valid analyses."""
    return [
        (p.analysis, ref)
        for p, ref in zip(parsed, references, strict=True)
        if p.analysis is not None and ref is not None
    ]


def overall_score_mae(pairs: Sequence[tuple[Analysis, Analysis]]) -> float | None:
    return _mean([abs(pred.overall_score - ref.overall_score) for pred, ref in pairs])


def dimension_errors(pairs: Sequence[tuple[Analysis, Analysis]]) -> dict[str, list[float]]:
    """Absolute score errors per reference dimension name, for dimensions the prediction also scored."""
    errors: dict[str, list[float]] = {}
    for pred, ref in pairs:
        predicted = pred.dimension_scores()
        for name, score in ref.dimension_scores().items():
            if name in predicted:
                errors.setdefault(name, []).append(abs(predicted[name] - score))
    return errors


def dimension_match_rate(pairs: Sequence[tuple[Analysis, Analysis]]) -> float | None:
    """Fraction of the references' dimensions that the predictions scored (matched by name)."""
    wanted = sum(len(ref.dimensions) for _, ref in pairs)
    found = sum(len(set(ref.dimension_scores()) & set(pred.dimension_scores())) for pred, ref in pairs)
    return _rate(found, wanted)


def score_correlation(pairs: Sequence[tuple[Analysis, Analysis]]) -> float | None:
    return pearson([p.overall_score for p, _ in pairs], [r.overall_score for _, r in pairs])


def example_score_copy_rate(parsed: Sequence[ParseResult], prompts: Sequence[str]) -> float | None:
    """Among valid outputs, the fraction whose overall score is a score the prompt shows as an example."""
    valid = [(p.analysis, prompt) for p, prompt in zip(parsed, prompts, strict=True) if p.analysis is not None]
    copies = sum(a.overall_score in schema.example_scores_in_prompt(prompt) for a, prompt in valid)
    return _rate(copies, len(valid))


def repetition_rate(generations: Sequence[Generation]) -> float | None:
    return _rate(sum(is_repetitive(g) for g in generations), len(generations))


def _throughput(tokens: Sequence[int], rates: Sequence[float]) -> float | None:
    """Total tokens over total time, time per output being tokens / rate."""
    pairs = [(n, r) for n, r in zip(tokens, rates, strict=True) if n > 0 and r > 0]
    seconds = sum(n / r for n, r in pairs)
    return sum(n for n, _ in pairs) / seconds if seconds > 0 else None


@dataclass(frozen=True)
class ModelMetrics:
    examples: int
    valid_outputs: int
    format_compliance: float | None
    field_compliance: dict[str, float]
    avg_score: float | None  # mean predicted overall score over valid outputs
    scored_examples: int
    overall_score_mae: float | None
    dimension_score_mae: dict[str, float]
    dimension_score_mae_mean: float | None  # over every matched (example, dimension) pair
    dimension_match_rate: float | None
    score_correlation: float | None
    example_score_copy_rate: float | None
    repetition_rate: float | None
    latency_mean_s: float | None
    latency_p50_s: float | None
    latency_p95_s: float | None
    prefill_tokens_per_s: float | None
    decode_tokens_per_s: float | None
    decode_s_per_token: float | None
    output_chars_mean: float | None
    output_tokens_mean: float | None
    score_values_by_rule: int = 0  # written by the expected-value rule, over every output
    finish_reasons: dict[str, int] = field(default_factory=dict)
    error_codes: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def parse_references(examples: Sequence[EvalExample]) -> list[Analysis | None]:
    return [schema.parse_analysis(e.reference).analysis for e in examples]


def model_metrics(examples: Sequence[EvalExample], generations: Sequence[Generation]) -> ModelMetrics:
    """Every per-model number, on the same examples in the same order as `generations`."""
    if len(examples) != len(generations):
        raise ValueError(f"{len(examples)} examples but {len(generations)} generations")
    parsed = [schema.parse_analysis(g.text) for g in generations]
    pairs = scored_pairs(parsed, parse_references(examples))
    dim_errors = dimension_errors(pairs)
    latencies = [g.latency_s for g in generations]
    decode_tps = _throughput([g.generation_tokens for g in generations], [g.generation_tps for g in generations])
    return ModelMetrics(
        examples=len(generations),
        valid_outputs=sum(p.ok for p in parsed),
        format_compliance=format_compliance(parsed),
        field_compliance=field_compliance(parsed),
        avg_score=_mean([p.analysis.overall_score for p in parsed if p.analysis is not None]),
        scored_examples=len(pairs),
        overall_score_mae=overall_score_mae(pairs),
        dimension_score_mae={k: sum(v) / len(v) for k, v in sorted(dim_errors.items())},
        dimension_score_mae_mean=_mean([e for errs in dim_errors.values() for e in errs]),
        dimension_match_rate=dimension_match_rate(pairs),
        score_correlation=score_correlation(pairs),
        example_score_copy_rate=example_score_copy_rate(parsed, [e.prompt for e in examples]),
        repetition_rate=repetition_rate(generations),
        latency_mean_s=_mean(latencies),
        latency_p50_s=percentile(latencies, 50),
        latency_p95_s=percentile(latencies, 95),
        prefill_tokens_per_s=_throughput([g.prompt_tokens for g in generations], [g.prompt_tps for g in generations]),
        decode_tokens_per_s=decode_tps,
        decode_s_per_token=1.0 / decode_tps if decode_tps else None,
        output_chars_mean=_mean([len(g.text) for g in generations]),
        output_tokens_mean=_mean([g.generation_tokens for g in generations]),
        score_values_by_rule=sum(g.score_values_by_rule for g in generations),
        finish_reasons=dict(Counter(g.finish_reason for g in generations)),
        error_codes=dict(Counter(p.error for p in parsed if p.error is not None)),
    )


# --- the mean-score baseline ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BaselineMetrics:
    """Always answer the training split's mean overall score and mean per-dimension scores (MAE only)."""

    train_examples: int
    predicted_overall: float | None
    predicted_dimensions: dict[str, float]
    scored_examples: int
    reference_avg_score: float | None
    overall_score_mae: float | None
    dimension_score_mae: dict[str, float]
    dimension_score_mae_mean: float | None

    def as_dict(self) -> dict:
        return asdict(self)


def mean_baseline(train: Sequence[Analysis], references: Sequence[Analysis | None]) -> BaselineMetrics:
    refs = [r for r in references if r is not None]
    overall = _mean([a.overall_score for a in train])
    by_name: dict[str, list[float]] = {}
    for analysis in train:
        for name, score in analysis.dimension_scores().items():
            by_name.setdefault(name, []).append(score)
    dims = {name: sum(v) / len(v) for name, v in by_name.items()}
    dim_errors: dict[str, list[float]] = {}
    for ref in refs:
        for name, score in ref.dimension_scores().items():
            if name in dims:
                dim_errors.setdefault(name, []).append(abs(dims[name] - score))
    return BaselineMetrics(
        train_examples=len(train),
        predicted_overall=overall,
        predicted_dimensions=dict(sorted(dims.items())),
        scored_examples=len(refs) if overall is not None else 0,
        reference_avg_score=_mean([r.overall_score for r in refs]),
        overall_score_mae=_mean([abs(overall - r.overall_score) for r in refs]) if overall is not None else None,
        dimension_score_mae={k: sum(v) / len(v) for k, v in sorted(dim_errors.items())},
        dimension_score_mae_mean=_mean([e for errs in dim_errors.values() for e in errs]),
    )


# --- comparison --------------------------------------------------------------------------------------------


def _delta(new: object, old: object) -> object:
    if isinstance(new, dict) and isinstance(old, dict):
        return {k: _delta(new.get(k), old.get(k)) for k in sorted(set(new) | set(old))}
    numeric = (int, float)
    if isinstance(new, numeric) and isinstance(old, numeric) and not isinstance(new, bool):
        return new - old
    return None


_NOT_DELTAS = {"examples", "finish_reasons", "error_codes"}


def improvements(base: ModelMetrics, fine_tuned: ModelMetrics) -> dict:
    """Fine-tuned minus base for each numeric metric (None where either is undefined). Latencies here come from
    each model's own generations; the inference overhead is measured apart (`overhead.py`)."""
    new, old = fine_tuned.as_dict(), base.as_dict()
    return {k: _delta(new[k], old[k]) for k in new if k not in _NOT_DELTAS}


@dataclass(frozen=True)
class Comparison:
    """Per-model metrics, plus the paired score comparisons the gates use: A is the base (or the training-mean
    baseline), B the fine-tuned model. `overhead` and `constrained` (the fine-tuned model under the grammar
    mask) are None when they were not measured."""

    base: ModelMetrics
    fine_tuned: ModelMetrics
    mean_baseline: BaselineMetrics
    improvements: dict
    vs_base: PairedComparison
    vs_mean_baseline: PairedComparison
    overhead: OverheadMeasurement | None = None
    constrained: ConstrainedCompliance | None = None

    def as_dict(self) -> dict:
        return {
            "base_model": self.base.as_dict(),
            "fine_tuned_model": self.fine_tuned.as_dict(),
            "mean_baseline": self.mean_baseline.as_dict(),
            "improvements": self.improvements,
            "paired": {"fine_tuned_vs_base": self.vs_base.as_dict(),
                       "fine_tuned_vs_mean_baseline": self.vs_mean_baseline.as_dict()},
            "inference_overhead": self.overhead.as_dict() if self.overhead is not None else None,
            "constrained_decoding": self.constrained.as_dict() if self.constrained is not None else None,
        }  # fmt: skip


def compare(
    examples: Sequence[EvalExample],
    base: Sequence[Generation],
    fine_tuned: Sequence[Generation],
    train_references: Sequence[Analysis],
    overhead: OverheadMeasurement | None = None,
    constrained: ConstrainedCompliance | None = None,
) -> Comparison:
    base_metrics, ft_metrics = model_metrics(examples, base), model_metrics(examples, fine_tuned)
    references = parse_references(examples)
    baseline = mean_baseline(train_references, references)
    reference_scores = overall_scores(references)
    base_scores, ft_scores = (overall_scores([schema.parse_analysis(g.text).analysis for g in gens])
                              for gens in (base, fine_tuned))  # fmt: skip
    vs_base = paired_score_errors(reference_scores, base_scores, ft_scores)
    vs_mean = paired_score_errors(reference_scores, [baseline.predicted_overall] * len(examples), ft_scores)
    deltas = improvements(base_metrics, ft_metrics)
    deltas["overall_score_mae_paired"] = vs_base.b_minus_a
    deltas["overall_score_mae_paired_vs_mean_baseline"] = vs_mean.b_minus_a
    return Comparison(base_metrics, ft_metrics, baseline, deltas, vs_base, vs_mean, overhead, constrained)
