"""Too little data is a decision with a reason, and the table marks metrics that rest on too few examples."""

from mondrian_assets.advisor_table import AdvisorRow, evaluated_cells, render
from mondrian_assets.core.training.readiness import MIN_TRAIN_EXAMPLES, decide_training


def test_below_the_minimum_says_how_many_more_examples_are_needed():
    decision = decide_training(MIN_TRAIN_EXAMPLES - 7, 3)
    assert not decision.train and decision.examples_needed == 7
    assert decision.reason.startswith("needs 7 more training examples")
    assert decision.as_metadata() == {"decision": "not trained", "reason": decision.reason, "examples_needed": 7}


def test_the_minimum_is_configurable_and_inclusive():
    assert decide_training(12, 3, min_train_examples=12).train
    assert not decide_training(11, 3, min_train_examples=12).train


def test_enough_examples_but_no_validation_set_is_not_trained():
    decision = decide_training(MIN_TRAIN_EXAMPLES + 5, 0, val_note="no image hashed into the 20% share")
    assert not decision.train and "no validation examples (no image hashed" in decision.reason


def _report(examples: int, meaningful: bool) -> dict:
    return {
        "meaningful": meaningful,
        "metrics": {
            "base_model": {"format_compliance": 0.0, "overall_score_mae": None, "examples": examples},
            "fine_tuned_model": {"format_compliance": 1.0, "overall_score_mae": 0.4, "examples": examples},
            "mean_baseline": {"overall_score_mae": 0.8},
        },
    }


def test_metrics_on_fewer_than_five_examples_are_marked_not_meaningful():
    few, enough = evaluated_cells(_report(2, False)), evaluated_cells(_report(11, True))
    assert few["mae"] == "0.40 vs 0.80 (0.50x) [n=2<5: not meaningful]"
    assert enough == {"compliance": "0% -> 100%", "mae": "0.40 vs 0.80 (0.50x)"}


def test_the_table_has_one_row_per_advisor_under_its_header():
    rows = [AdvisorRow("ansel", 73, 19, decision="deployable", reason="every gate passed"),
            AdvisorRow("okeefe", 3, 0, decision="not trained", reason="needs 37 more training examples")]  # fmt: skip
    lines = render(rows).splitlines()
    assert lines[0].split()[:2] == ["advisor", "train/val"] and len(lines) == 3
    assert lines[1].startswith("ansel ") and "73/19" in lines[1] and lines[1].endswith("every gate passed")
    assert lines[2].index("not trained") == lines[1].index("deployable")  # columns line up
