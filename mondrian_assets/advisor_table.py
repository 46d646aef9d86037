"""The per-advisor table that ends the main job: one row type, columns declared once, so a later stage adds a
field and a column and nothing else."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AdvisorRow:
    advisor: str
    train: int = 0
    val: int = 0
    compliance: str = "-"  # base -> fine-tuned valid-JSON share
    mae: str = "-"  # fine-tuned overall-score MAE vs the training-mean baseline's
    decision: str = "-"  # deployable | not deployable | not trained | failed
    reason: str = ""
    deploy: str = "-"  # what deployed_version decided

    @property
    def split(self) -> str:
        return f"{self.train}/{self.val}"


# (header, attribute); the last column is left unpadded so a long reason reads as a sentence.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("advisor", "advisor"),
    ("train/val", "split"),
    ("valid JSON base -> tuned", "compliance"),
    ("score MAE tuned vs mean", "mae"),
    ("decision", "decision"),
    ("deploy", "deploy"),
    ("reason", "reason"),
)


def render(rows: list[AdvisorRow]) -> str:
    cells = [[header for header, _ in COLUMNS]] + [[str(getattr(r, attr)) for _, attr in COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=False)) + "  " + line[-1]
        for line in cells
    )


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def evaluated_cells(report: dict) -> dict[str, str]:
    """The compliance and MAE cells from a comparison report (`core.evaluation.report`): a MAE on fewer than the
    meaningful number of examples is shown, but marked as saying nothing."""
    metrics = report["metrics"]
    base, tuned, mean = metrics["base_model"], metrics["fine_tuned_model"], metrics["mean_baseline"]
    mae, mean_mae = tuned["overall_score_mae"], mean["overall_score_mae"]
    if mae is None or mean_mae is None:
        score = "n/a (no valid output)" if mae is None else f"{mae:.2f} vs n/a"
    else:
        score = f"{mae:.2f} vs {mean_mae:.2f}" + (f" ({mae / mean_mae:.2f}x)" if mean_mae else "")
    if not report.get("meaningful", True):
        score += f" [n={tuned['examples']}<5: not meaningful]"
    return {"compliance": f"{_percent(base['format_compliance'])} -> {_percent(tuned['format_compliance'])}",
            "mae": score}  # fmt: skip
