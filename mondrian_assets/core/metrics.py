"""Base-vs-fine-tuned evaluation metrics, the mean-score baseline, the deployment gates and the verdict.

Pure functions over plain records: no MLX, no Dagster, no I/O. Inference produces `Generation`s for
`EvalExample`s; everything here turns them into numbers a person can trust.

Conventions
- An output counts as *valid* only when `schema.parse_analysis` accepts it whole; score errors (MAE,
  correlation, copy rate) are computed over valid outputs whose reference is also valid, and `scored_examples`
  says how many that was. A model with no valid output has undefined (None) score metrics, never 0.
- Improvements are fine-tuned minus base: positive is better for compliance and tokens/s, negative is
  better for MAE, latency and repetition.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from mondrian_assets.core import schema
from mondrian_assets.core.schema import Analysis, ParseResult

# --- records -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalExample:
    """One validation example: the image, the exact user text, and the reference analysis text."""

    example_id: str
    image_path: Path
    prompt: str
    reference: str


@dataclass(frozen=True)
class Generation:
    """One model output with its cost. `finish_reason`: stop (EOS), length (max_tokens) or repetition (the
    loop guard cut it). In batched runs latency is the batch's wall time and the rates are the batch's."""

    text: str
    latency_s: float
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    finish_reason: str = "stop"
    batched: bool = False


# --- repetition ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoopRule:
    """A loop is one unit of at most `max_period` items repeated back to back at least `min_repeats` times,
    covering at least `min_span` items."""

    max_period: int
    min_repeats: int
    min_span: int

    def span_needed(self, period: int) -> int:
        return max(period * self.min_repeats, self.min_span)


TOKEN_LOOP_RULE = LoopRule(max_period=64, min_repeats=4, min_span=32)  # the generation-time guard, in tokens
TEXT_LOOP_RULE = LoopRule(max_period=400, min_repeats=4, min_span=64)  # the metric, in characters


def ends_in_loop(seq: Sequence[Hashable], rule: LoopRule = TOKEN_LOOP_RULE) -> bool:
    """Whether the tail of `seq` is a loop. Cheap enough to call after every generated token: most periods are
    rejected by their first comparison."""
    n = len(seq)
    if n < rule.min_span:
        return False
    last = seq[-1]
    for period in range(1, min(rule.max_period, n // rule.min_repeats) + 1):
        if seq[n - 1 - period] != last:
            continue
        span = rule.span_needed(period)
        if span <= n and all(seq[i] == seq[i - period] for i in range(n - 2, n - span + period - 1, -1)):
            return True
    return False


def _longest_true_run(mask: np.ndarray) -> int:
    if not mask.any():
        return 0
    padded = np.concatenate(([False], mask, [False])).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return int((edges[1::2] - edges[0::2]).max())


def find_loop(text: str, rule: LoopRule = TEXT_LOOP_RULE) -> tuple[int, int] | None:
    """(period, span) of the longest looping stretch anywhere in `text`, or None."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    best: tuple[int, int] | None = None
    for period in range(1, min(rule.max_period, len(codes) // rule.min_repeats) + 1):
        span = _longest_true_run(codes[period:] == codes[:-period]) + period
        if span >= rule.span_needed(period) and (best is None or span > best[1]):
            best = (period, span)
    return best


def is_repetitive(generation: Generation, rule: LoopRule = TEXT_LOOP_RULE) -> bool:
    return generation.finish_reason == "repetition" or find_loop(generation.text, rule) is not None


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


def _ratio_minus_one(new: float | None, old: float | None) -> float | None:
    return new / old - 1.0 if new is not None and old else None


_NOT_DELTAS = {"examples", "finish_reasons", "error_codes"}


def improvements(base: ModelMetrics, fine_tuned: ModelMetrics) -> dict:
    """Fine-tuned minus base for each numeric metric (None where either is undefined), plus overhead ratios:
    `inference_overhead` = mean latency ratio - 1 (the plan's number); `decode_overhead` = per-token decode
    time ratio - 1 (the adapter's own cost, independent of how long each model's answers are)."""
    new, old = fine_tuned.as_dict(), base.as_dict()
    out = {k: _delta(new[k], old[k]) for k in new if k not in _NOT_DELTAS}
    out["inference_overhead"] = _ratio_minus_one(fine_tuned.latency_mean_s, base.latency_mean_s)
    out["decode_overhead"] = _ratio_minus_one(fine_tuned.decode_s_per_token, base.decode_s_per_token)
    return out


@dataclass(frozen=True)
class Comparison:
    base: ModelMetrics
    fine_tuned: ModelMetrics
    mean_baseline: BaselineMetrics
    improvements: dict

    def as_dict(self) -> dict:
        return {
            "base_model": self.base.as_dict(),
            "fine_tuned_model": self.fine_tuned.as_dict(),
            "mean_baseline": self.mean_baseline.as_dict(),
            "improvements": self.improvements,
        }


def compare(
    examples: Sequence[EvalExample],
    base: Sequence[Generation],
    fine_tuned: Sequence[Generation],
    train_references: Sequence[Analysis],
) -> Comparison:
    base_metrics, ft_metrics = model_metrics(examples, base), model_metrics(examples, fine_tuned)
    baseline = mean_baseline(train_references, parse_references(examples))
    deltas = improvements(base_metrics, ft_metrics)
    deltas["overall_score_mae_vs_mean_baseline"] = _delta(ft_metrics.overall_score_mae, baseline.overall_score_mae)
    return Comparison(base_metrics, ft_metrics, baseline, deltas)


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
