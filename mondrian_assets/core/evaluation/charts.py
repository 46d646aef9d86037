"""PNG charts for the Dagster UI (matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from mondrian_assets.core.evaluation.metrics import Comparison

if TYPE_CHECKING:
    from matplotlib.axes import Axes


def loss_curve_png(log_rows: list[dict]) -> bytes:
    """Train and validation loss against the optimizer step, from training_log.jsonl rows."""
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    train = [(r["step"], r["train_loss"]) for r in log_rows if r.get("train_loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in log_rows if r.get("val_loss") is not None]
    if train:
        ax.plot(*zip(*train), label="train loss", color="#4c72b0")
    if val:
        ax.plot(*zip(*val), "o-", label="val loss", color="#dd8452")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


# --- chart ---------------------------------------------------------------------------------------------------


def comparison_chart_png(metrics: Comparison) -> bytes:
    """Bars for base / fine-tuned / training-mean baseline: format compliance and score MAEs."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.2), dpi=100)
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    labels = ["base", "fine-tuned", "mean baseline"]
    colors = ["#999999", "#2a7ab0", "#d9a441"]
    compliance = [metrics.base.format_compliance, metrics.fine_tuned.format_compliance]
    _bars(left, labels[:2], compliance, colors[:2], "format compliance", (0, 1.05))
    mae = [metrics.vs_base.mae_a, metrics.vs_base.mae_b, metrics.vs_mean_baseline.mae_a]
    _bars(right, labels, mae, colors, "overall-score MAE, paired (lower is better)", None)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _bars(
    ax: Axes,
    labels: list[str],
    values: list[float | None],
    colors: list[str],
    title: str,
    ylim: tuple[float, float] | None,
) -> None:
    heights = [v if v is not None else 0.0 for v in values]
    ax.bar(labels, heights, color=colors)
    for i, v in enumerate(values):
        ax.annotate("n/a" if v is None else f"{v:.2f}", (i, heights[i]), ha="center", va="bottom")
    ax.set_title(title)
    if ylim is not None:
        ax.set_ylim(*ylim)
