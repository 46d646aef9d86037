"""Two models' overall scores compared on the same examples: the one rule every "is B at least as good as A?"
answer uses (fine-tuned vs base and vs the training-mean baseline in the gates; a candidate vs the active version
in deployment).

The rule: only examples whose reference is valid count, and both models are scored on all of them; an output
that does not parse and validate counts as the worst possible error on that example (`WORST_SCORE_ERROR`, 9 on the
1-10 scale). So a model cannot look better by answering fewer examples, and "better" means better on the same
photos.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mondrian_assets.core.schema import SCORE_MAX, SCORE_MIN, Analysis

WORST_SCORE_ERROR = SCORE_MAX - SCORE_MIN

PAIRED_RULE = (
    "Score comparisons are paired: every model is scored on the same examples (those whose reference is valid), "
    f"and an output that does not parse and validate counts as an overall-score error of {WORST_SCORE_ERROR:g}, "
    f"the largest possible on the {SCORE_MIN:g}-{SCORE_MAX:g} scale."
)


def overall_scores(analyses: Sequence[Analysis | None]) -> list[float | None]:
    """Each output's overall score, None where the output is not a valid analysis."""
    return [a.overall_score if a is not None else None for a in analyses]


@dataclass(frozen=True)
class PairedComparison:
    """Absolute overall-score errors of models A and B, example by example, on the same examples."""

    errors_a: tuple[float, ...]
    errors_b: tuple[float, ...]
    valid_a: int  # scored examples where A's output was valid
    valid_b: int
    invalid_error: float

    @property
    def examples(self) -> int:
        return len(self.errors_a)

    @property
    def mae_a(self) -> float | None:
        return sum(self.errors_a) / len(self.errors_a) if self.errors_a else None

    @property
    def mae_b(self) -> float | None:
        return sum(self.errors_b) / len(self.errors_b) if self.errors_b else None

    @property
    def b_minus_a(self) -> float | None:
        """B's MAE minus A's: negative means B is closer on these examples."""
        return None if self.mae_a is None or self.mae_b is None else self.mae_b - self.mae_a

    def b_no_worse(self, tolerance: float = 0.0) -> bool:
        """B's MAE is at most A's plus `tolerance` (False when no example could be scored)."""
        return self.b_minus_a is not None and self.b_minus_a <= tolerance

    def b_strictly_better(self, tolerance: float = 0.0) -> bool:
        """B's MAE is below A's plus `tolerance` (a tie is not better)."""
        return self.b_minus_a is not None and self.b_minus_a < tolerance

    def as_dict(self) -> dict:
        wins_b = sum(b < a for a, b in zip(self.errors_a, self.errors_b))
        wins_a = sum(a < b for a, b in zip(self.errors_a, self.errors_b))
        return {
            "examples": self.examples,
            "valid_a": self.valid_a,
            "valid_b": self.valid_b,
            "mae_a": self.mae_a,
            "mae_b": self.mae_b,
            "b_minus_a": self.b_minus_a,
            "b_closer": wins_b,
            "a_closer": wins_a,
            "ties": self.examples - wins_a - wins_b,
            "invalid_error": self.invalid_error,
        }


def paired_score_errors(
    references: Sequence[float | None],
    scores_a: Sequence[float | None],
    scores_b: Sequence[float | None],
    *,
    invalid_error: float = WORST_SCORE_ERROR,
) -> PairedComparison:
    """Compare A and B on the same examples. Each sequence holds one overall score per example, None where the
    reference (then the example is left out for both) or the output is not valid (then it costs `invalid_error`).
    """
    if not len(references) == len(scores_a) == len(scores_b):
        raise ValueError(f"{len(references)} references but {len(scores_a)} and {len(scores_b)} outputs")
    errors_a: list[float] = []
    errors_b: list[float] = []
    valid_a = valid_b = 0
    for ref, a, b in zip(references, scores_a, scores_b):
        if ref is None:
            continue
        errors_a.append(invalid_error if a is None else abs(a - ref))
        errors_b.append(invalid_error if b is None else abs(b - ref))
        valid_a += a is not None
        valid_b += b is not None
    return PairedComparison(tuple(errors_a), tuple(errors_b), valid_a, valid_b, invalid_error)
