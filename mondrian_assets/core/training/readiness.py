"""Whether an advisor has enough data to be worth training: a decision with its reason, never a failure.

Too few examples is an expected state of a young advisor, not an error: it is reported as "needs N more
examples" and nothing downstream runs for it, until the app has produced enough jobs.
"""

from __future__ import annotations

from dataclasses import dataclass

# Where training starts to be worth it on the embedded model: the fewest examples that passed every gate. Measured
# with the default 4 epochs and expected score values (`bench/bench_learning.py --seeds 7 --train-sizes 40,60,90`,
# ansel's first N training examples, its 29 validation images): 40 -> 86% valid JSON (the format gate fails);
# 60 -> 100% valid, overall-score MAE 0.81 against the mean baseline's 0.82 (every gate passes, barely); 90 -> 100%,
# 0.76 vs 0.80. Configurable per run (`min_train_examples` in the lora_adapter config).
MIN_TRAIN_EXAMPLES = 60


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
