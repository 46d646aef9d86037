"""PNG charts for the Dagster UI (matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


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
