"""Metrics, gates and verdict on hand-made outputs with known answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mondrian_assets.core import schema
from mondrian_assets.core.evaluation import gates as gt
from mondrian_assets.core.evaluation import metrics as m
from mondrian_assets.core.evaluation.overhead import OverheadMeasurement
from mondrian_assets.core.evaluation.paired import PAIRED_RULE, WORST_SCORE_ERROR, paired_score_errors
from mondrian_assets.core.inference import records
from mondrian_assets.core.inference.records import EvalExample, Generation
from helpers import analysis_json

PROMPT = schema.build_prompt(None, 'Answer like {"overall_score": 7.4}.')


def gen(text: str, *, latency: float = 1.0, tokens: int = 10, tps: float = 10.0, reason: str = "stop") -> Generation:
    return Generation(text, latency, 100, 200.0, generation_tokens=tokens, generation_tps=tps, finish_reason=reason)


def examples(*overalls: float, dims: list[dict[str, float]] | None = None) -> list[EvalExample]:
    return [
        EvalExample(f"e{i}", Path(f"/img/{i}.jpg"), PROMPT, analysis_json(o, dims[i] if dims else None))
        for i, o in enumerate(overalls)
    ]


# hand-made outputs --------------------------------------------------------------------------------------------

VALID_8 = analysis_json(8)
FENCED_6 = "Here you go:\n```json\n" + analysis_json(6) + "\n```"
TRUNCATED = analysis_json(5)[:120]
WRONG_SCHEMA = json.dumps({"description": "a barn", "score": 7})
LOOPING = '{"image_description": "' + "the light the light " * 40
COPIED = analysis_json(7.4)


def test_format_compliance_counts_only_whole_valid_analyses():
    parsed = [schema.parse_analysis(t) for t in (VALID_8, FENCED_6, TRUNCATED, WRONG_SCHEMA, LOOPING, COPIED)]
    assert m.format_compliance(parsed) == pytest.approx(3 / 6)
    assert [p.ok for p in parsed] == [True, True, False, False, False, True]
    assert m.format_compliance([]) is None


def test_field_compliance_per_top_level_field():
    partial = json.loads(VALID_8)
    partial["overall_score"] = 12  # out of range
    del partial["technical_notes"]
    parsed = [schema.parse_analysis(t) for t in (VALID_8, json.dumps(partial), TRUNCATED, WRONG_SCHEMA)]
    fields = m.field_compliance(parsed)
    assert fields["image_description"] == pytest.approx(2 / 4)
    assert fields["overall_score"] == pytest.approx(1 / 4)
    assert fields["technical_notes"] == pytest.approx(1 / 4)
    assert set(schema.REQUIRED_FIELDS) <= set(fields)
    assert m.field_compliance([schema.parse_analysis("")]) == {f: 0.0 for f in schema.REQUIRED_FIELDS}


def test_score_errors_on_known_values():
    dims = [{"Composition": 6, "Lighting": 8}, {"Composition": 5, "Lighting": 5}, {"Composition": 9}]
    refs = examples(7, 5, 9, dims=dims)
    outs = [
        gen(analysis_json(8, {"Composition": 7, "Lighting": 8})),  # |8-7| = 1; dims 1, 0
        gen(analysis_json(5, {"Composition": 3, "Color Harmony": 5})),  # 0; Composition 2, Lighting unmatched
        gen(TRUNCATED),  # not scored
    ]
    result = m.model_metrics(refs, outs)
    assert result.valid_outputs == 2 and result.scored_examples == 2
    assert result.overall_score_mae == pytest.approx(0.5)
    assert result.dimension_score_mae == {"Composition": pytest.approx(1.5), "Lighting": pytest.approx(0.0)}
    assert result.dimension_score_mae_mean == pytest.approx(1.0)  # (1 + 0 + 2) / 3
    assert result.dimension_match_rate == pytest.approx(3 / 4)
    assert result.avg_score == pytest.approx(6.5)
    assert result.score_correlation == pytest.approx(1.0)  # two points: (8, 7) and (5, 5)


def test_no_valid_output_means_undefined_scores_not_zero():
    result = m.model_metrics(examples(7, 5), [gen(TRUNCATED), gen(WRONG_SCHEMA)])
    assert result.format_compliance == 0.0
    assert result.overall_score_mae is None
    assert result.score_correlation is None
    assert result.avg_score is None
    assert result.error_codes == {"truncated_json": 1, "missing_fields": 1}


def test_pearson_undefined_cases():
    assert m.pearson([1.0], [2.0]) is None
    assert m.pearson([3.0, 3.0, 3.0], [1.0, 2.0, 3.0]) is None
    assert m.pearson([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) == pytest.approx(-1.0)


def test_copy_rate_counts_the_prompts_example_score():
    assert schema.example_scores_in_prompt(PROMPT) == {7.4}
    result = m.model_metrics(examples(7, 6, 8), [gen(COPIED), gen(COPIED), gen(VALID_8)])
    assert result.example_score_copy_rate == pytest.approx(2 / 3)


def test_repetition_detection():
    assert records.find_loop(LOOPING) is not None
    period, span = records.find_loop(LOOPING)
    assert period == len("the light ") and span >= 4 * period
    assert records.find_loop(VALID_8) is None
    assert records.find_loop(FENCED_6) is None
    assert records.find_loop("aaaa") is None  # too short to call a loop
    result = m.model_metrics(examples(7, 7, 7), [gen(LOOPING), gen(VALID_8), gen("cut", reason="repetition")])
    assert result.repetition_rate == pytest.approx(2 / 3)


def test_token_tail_loop_guard_rule():
    rule = records.LoopRule(max_period=8, min_repeats=4, min_span=8)
    assert records.ends_in_loop([1, 2, 3] + [5, 6] * 4, rule)
    assert not records.ends_in_loop([1, 2, 3] + [5, 6] * 3, rule)  # 6 items < min_span
    assert not records.ends_in_loop([5, 6] * 4 + [7], rule)  # the loop is not at the tail
    assert records.ends_in_loop([9] * 8, rule)
    assert not records.ends_in_loop(list(range(100)), rule)
    assert not records.ends_in_loop([], rule)


def test_latency_throughput_and_length():
    outs = [
        gen("a" * 10, latency=1.0, tokens=10, tps=10.0),
        gen("b" * 30, latency=3.0, tokens=30, tps=30.0),
        gen("", latency=2.0, tokens=0, tps=0.0),
    ]
    result = m.model_metrics(examples(7, 7, 7), outs)
    assert result.latency_mean_s == pytest.approx(2.0)
    assert result.latency_p50_s == pytest.approx(2.0)
    assert result.latency_p95_s == pytest.approx(2.9)
    assert result.decode_tokens_per_s == pytest.approx(40 / 2.0)  # 40 tokens in 1 s + 1 s
    assert result.prefill_tokens_per_s == pytest.approx(200.0)
    assert result.output_chars_mean == pytest.approx(40 / 3, abs=0.05)
    assert result.output_tokens_mean == pytest.approx(40 / 3, abs=0.05)
    assert m.percentile([], 50) is None


def test_mean_baseline_and_model_metrics_need_equal_lengths():
    train = [schema.parse_analysis(analysis_json(o, {"Composition": o - 1})).analysis for o in (6, 8)]
    refs = [schema.parse_analysis(analysis_json(o, {"Composition": c})).analysis for o, c in ((9, 5), (5, 6))]
    baseline = m.mean_baseline(train, refs)
    assert baseline.predicted_overall == 7.0
    assert baseline.predicted_dimensions == {"Composition": 6.0}
    assert baseline.overall_score_mae == pytest.approx(2.0)
    assert baseline.dimension_score_mae_mean == pytest.approx(0.5)
    with pytest.raises(ValueError):
        m.model_metrics(examples(7), [])


# comparison, gates, verdict ---------------------------------------------------------------------------------

TRAIN = [schema.parse_analysis(analysis_json(o)).analysis for o in (6, 7, 8)]  # mean 7


def timings(base: float, tuned: float, *, jitter: float = 0.0, repeats: int = 5) -> OverheadMeasurement:
    """Two prompts per repeat; `jitter` makes every other repeat that much slower for both models (machine drift)."""
    rows = [(1.0 + jitter * (r % 2),) * 2 for r in range(repeats)]
    return OverheadMeasurement(tuple(tuple(base * t for t in row) for row in rows),
                               tuple(tuple(tuned * t for t in row) for row in rows), tokens=16)  # fmt: skip


NO_OVERHEAD = timings(1.0, 1.0)


def comparison(base_texts, ft_texts, refs=(8, 6), overhead=NO_OVERHEAD):
    return m.compare(examples(*refs), [gen(t) for t in base_texts], [gen(t) for t in ft_texts], TRAIN, overhead)


def gate(results, name):
    return next(g for g in results if g.name == name)


def test_improvements_are_fine_tuned_minus_base():
    c = comparison([analysis_json(5), TRUNCATED], [analysis_json(8), analysis_json(6)])
    assert c.improvements["format_compliance"] == pytest.approx(0.5)
    assert c.improvements["overall_score_mae"] == pytest.approx(0.0 - 3.0)  # each over its own valid outputs
    assert c.improvements["field_compliance"]["overall_score"] == pytest.approx(0.5)
    assert c.improvements["score_correlation"] is None  # base has a single scored pair
    # paired: base errors (3, 9 for the invalid output), fine-tuned (0, 0); the mean 7 misses by (1, 1)
    assert c.improvements["overall_score_mae_paired"] == pytest.approx(0.0 - 6.0)
    assert c.improvements["overall_score_mae_paired_vs_mean_baseline"] == pytest.approx(0.0 - 1.0)


def test_paired_score_errors_compare_on_the_same_examples():
    refs = [8.0, 6.0, None, 5.0]  # the third reference is invalid: left out for both models
    paired = paired_score_errors(refs, [8.0, None, 1.0, 5.0], [7.0, 6.5, None, None])
    assert paired.examples == 3 and (paired.valid_a, paired.valid_b) == (2, 2)
    assert paired.errors_a == (0.0, WORST_SCORE_ERROR, 0.0) and paired.errors_b == (1.0, 0.5, WORST_SCORE_ERROR)
    assert paired.mae_a == pytest.approx(3.0) and paired.mae_b == pytest.approx(10.5 / 3)
    assert not paired.b_no_worse() and paired.b_no_worse(tolerance=0.5)
    assert paired.as_dict()["b_closer"] == 1 and paired.as_dict()["a_closer"] == 2
    assert WORST_SCORE_ERROR == 9.0 and "9" in PAIRED_RULE
    same = paired_score_errors([7.0, 7.0], [6.0, 8.0], [8.0, 6.0])
    assert same.b_no_worse() and not same.b_strictly_better()
    assert paired_score_errors([None], [1.0], [2.0]).mae_b is None and not same.b_strictly_better(0.0)
    with pytest.raises(ValueError):
        paired_score_errors([7.0], [7.0], [])


def test_fine_tuned_valid_everywhere_and_closer_beats_a_base_that_answered_half():
    """The issue's hand-made case: scored each over its own valid outputs the base looks better (0.50 vs 0.70)."""
    c = comparison([analysis_json(7.5), TRUNCATED], [analysis_json(7.6), analysis_json(7.0)])
    assert c.base.overall_score_mae == pytest.approx(0.5) and c.fine_tuned.overall_score_mae == pytest.approx(0.7)
    assert c.vs_base.errors_a[0] > c.vs_base.errors_b[0]  # closer on the shared example
    g = gate(gt.evaluate_gates(c), "score_mae_vs_base")
    assert g.passed, g.message
    assert g.value == pytest.approx(0.7) and g.threshold == pytest.approx((0.5 + 9.0) / 2)
    assert "same 2 examples" in g.message


def test_all_gates_pass_when_fine_tuned_is_good():
    c = comparison([analysis_json(5), TRUNCATED], [analysis_json(8), analysis_json(6)])
    results = gt.evaluate_gates(c)
    assert [g.name for g in results] == ["format_compliance", "score_mae_vs_base", "inference_overhead"]
    assert all(g.passed for g in results), [g.message for g in results]
    text = gt.verdict(c, results)
    assert text.endswith("Deploy: yes.")
    assert "Fine-tuned minus base: format compliance +0.50, paired overall-score MAE -6.00" in text
    assert "an invalid output counts as 9" in text


def test_format_gate_fails_below_threshold():
    c = comparison([VALID_8, VALID_8], [analysis_json(8), TRUNCATED])
    g = gate(gt.evaluate_gates(c), "format_compliance")
    assert not g.passed and g.value == 0.5 and g.threshold == 0.95
    assert "1/2" in g.message


def test_score_gate_fails_when_fine_tuned_is_worse_than_base():
    c = comparison([analysis_json(8), analysis_json(6)], [analysis_json(3), analysis_json(3)])
    g = gate(gt.evaluate_gates(c), "score_mae_vs_base")
    assert not g.passed and g.value == pytest.approx(4.0) and g.threshold == pytest.approx(0.0)


def test_score_gate_with_undefined_base_falls_back_to_mean_baseline():
    # base never valid; mean baseline (always 7) has MAE 1.0 on refs (8, 6)
    beats = comparison([TRUNCATED, WRONG_SCHEMA], [analysis_json(8), analysis_json(6.5)])
    g = gate(gt.evaluate_gates(beats), "score_mae_vs_base")
    assert g.passed and g.threshold == pytest.approx(1.0) and "mean-score baseline" in g.message

    # always answering 7 ties the baseline (MAE 1.0): a tie is no evidence of looking at the image
    blind = comparison([TRUNCATED, WRONG_SCHEMA], [analysis_json(7), analysis_json(7)])
    g = gate(gt.evaluate_gates(blind), "score_mae_vs_base")
    assert not g.passed and g.value == pytest.approx(1.0) and "does not beat" in g.message

    # exact on the one example it answered, but the baseline answered both: paired, that is (0 + 9) / 2
    half = comparison([TRUNCATED, WRONG_SCHEMA], [analysis_json(8), TRUNCATED])
    g = gate(gt.evaluate_gates(half), "score_mae_vs_base")
    assert not g.passed and g.value == pytest.approx(4.5) and "1 invalid fine-tuned outputs counted as 9" in g.message


def test_score_gate_tie_with_base_passes():
    c = comparison([analysis_json(7), analysis_json(7)], [analysis_json(7), analysis_json(7)])
    assert gate(gt.evaluate_gates(c), "score_mae_vs_base").passed
    strict = gt.GateThresholds(mae_tolerance=-0.01)
    assert not gate(gt.evaluate_gates(c, strict), "score_mae_vs_base").passed


def test_score_gate_without_fallback_passes_when_nothing_to_regress_from():
    c = comparison([TRUNCATED, WRONG_SCHEMA], [analysis_json(3), analysis_json(3)])
    assert not gate(gt.evaluate_gates(c), "score_mae_vs_base").passed
    g = gate(gt.evaluate_gates(c, gt.GateThresholds(fallback_to_mean_baseline=False)), "score_mae_vs_base")
    assert g.passed and g.threshold is None


def test_score_gate_fails_without_any_fine_tuned_score():
    c = comparison([VALID_8, VALID_8], [TRUNCATED, TRUNCATED])
    g = gate(gt.evaluate_gates(c), "score_mae_vs_base")
    assert not g.passed and g.value == WORST_SCORE_ERROR


def test_overhead_gate_fires_only_beyond_the_measured_noise():
    steady_slower = timings(1.0, 1.3)  # 30% slower on every paired run, no drift
    g = gate(gt.evaluate_gates(comparison([VALID_8] * 2, [VALID_8] * 2, overhead=steady_slower)), "inference_overhead")
    assert not g.passed and g.value == pytest.approx(0.3) and g.threshold == pytest.approx(0.10)

    # the same 30% on a machine whose speed swings 50% between repeats is within the noise it measured
    drifting = timings(1.0, 1.3, jitter=0.5)
    assert drifting.overhead == pytest.approx(0.3) and drifting.noise == pytest.approx(0.5)
    g = gate(gt.evaluate_gates(comparison([VALID_8] * 2, [VALID_8] * 2, overhead=drifting)), "inference_overhead")
    assert g.passed and g.threshold == pytest.approx(0.6)

    # drift cancels out of interleaved pairs: equal models under heavy drift measure no overhead at all
    assert timings(1.0, 1.0, jitter=2.0).overhead == pytest.approx(0.0)


def test_overhead_gate_fails_when_not_measured():
    g = gate(gt.evaluate_gates(comparison([VALID_8] * 2, [VALID_8] * 2, overhead=None)), "inference_overhead")
    assert not g.passed and g.value is None


def test_verdict_says_plainly_when_the_image_is_ignored():
    # fine-tuned always answers 7 = the training mean: valid format, scores no better than the baseline
    c = comparison([TRUNCATED, WRONG_SCHEMA], [analysis_json(7), analysis_json(7)])
    text = gt.verdict(c, gt.evaluate_gates(c))
    assert "learned the format but not to look at the image" in text
    assert "Format: fine-tuned 2/2 valid" in text

    good = comparison([TRUNCATED, WRONG_SCHEMA], [analysis_json(8), analysis_json(6)])
    assert "look at the image" not in gt.verdict(good, gt.evaluate_gates(good))

    half = comparison([TRUNCATED, WRONG_SCHEMA], [analysis_json(7), TRUNCATED])  # 1/2 valid, and blind
    text = gt.verdict(half, gt.evaluate_gates(half))
    assert "learned neither the format nor to look at the image" in text and text.endswith("Deploy: no.")


def test_comparison_dict_has_the_plan_keys():
    c = comparison([VALID_8, TRUNCATED], [VALID_8, FENCED_6])
    d = c.as_dict()
    assert set(d) == {"base_model", "fine_tuned_model", "mean_baseline", "improvements", "paired", "inference_overhead",
                      "constrained_decoding"}
    assert {"format_compliance", "avg_score", "overall_score_mae", "latency_mean_s"} <= set(d["base_model"])
    json.dumps(d)  # JSON-ready
