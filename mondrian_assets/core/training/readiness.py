"""Whether an advisor has enough data to be worth training: a decision with its reason, never a failure.

Too few examples is an expected state of a young advisor, not an error: it is reported as "needs N more
examples" and nothing downstream runs for it, until the app has produced enough jobs.
"""

from __future__ import annotations

from dataclasses import dataclass

# Where training starts to be worth it on the embedded model. Measured with the default 4 epochs
# (`bench/bench_learning.py --seeds 7 --train-sizes 20,30,40,60`, ansel's first N training examples, its 29
# validation images): 20 -> 0% valid JSON, 30 -> 48%, 40 -> 83%, 60 -> 97% but an overall-score MAE 0.95 against
# the mean baseline's 0.82; all gates pass at 90 (weston) and 133 (ansel). So 40 trains advisors the gates will
# still reject; kept until a run between 60 and 90 sets the value. Configurable per run (`min_train_examples` in
# the lora_adapter config).
MIN_TRAIN_EXAMPLES = 40


@dataclass(frozen=True)
class TrainingDecision:
    train: bool
    reason: str  # one plain sentence, shown in the CLI table, the run log and the asset's metadata
    examples_needed: int = 0  # more training examples before this advisor is trained

    def as_metadata(self) -> dict[str, object]:
        return {"decision": "train" if self.train else "not trained", "reason": self.reason,
                "examples_needed": self.examples_needed}  # fmt: skip


def decide_training(
    train_examples: int, val_examples: int, *, min_train_examples: int = MIN_TRAIN_EXAMPLES, val_note: str = ""
) -> TrainingDecision:
    """Train only with at least `min_train_examples` training examples and a validation set to judge them by."""
    if train_examples < min_train_examples:
        needed = min_train_examples - train_examples
        return TrainingDecision(
            False, f"needs {needed} more training examples (has {train_examples}, trains from {min_train_examples})", needed
        )
    if val_examples == 0:
        why = f" ({val_note})" if val_note else ""
        return TrainingDecision(False, f"no validation examples{why}: nothing to judge a fine-tune by", 1)
    return TrainingDecision(True, f"{train_examples} training and {val_examples} validation examples")
