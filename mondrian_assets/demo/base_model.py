"""The embedded default base model: a tiny Qwen3-VL built here, so the whole graph runs with no download.

Its tokenizer is trained on a demo corpus generated with a seed of its own, so it never sees the demo's
validation texts, yet knows the app's vocabulary (prompts and canonical analyses).
"""

from __future__ import annotations

import functools
import json
import sqlite3
import tempfile
from pathlib import Path

from mondrian_assets.core.schema import build_prompt
from mondrian_assets.demo.app import generate_demo_app
from mondrian_assets.demo.tiny_model import build_tiny_base_model

EMBEDDED_NAME = "tiny-qwen3-vl"
CORPUS_SEED = 1001
CORPUS_JOBS = 240


def embedded_base_dir(models_dir: Path) -> Path:
    return models_dir / "base" / EMBEDDED_NAME


@functools.cache  # deterministic, and asked for by every split and training step of a process
def demo_corpus(seed: int = CORPUS_SEED, n_jobs: int = CORPUS_JOBS) -> tuple[str, ...]:
    """Every advisor's full prompt and the canonical analyses of a throwaway demo app."""
    with tempfile.TemporaryDirectory(prefix="mondrian-corpus-") as tmp:
        summary = generate_demo_app(Path(tmp) / "app", seed=seed, n_jobs=n_jobs, large_images=False)
        with sqlite3.connect(summary.db_path) as db:
            system = db.execute("SELECT value FROM config WHERE key = 'system_prompt'").fetchone()[0]
            prompts = [build_prompt(system, p) for (p,) in db.execute("SELECT prompt FROM advisors ORDER BY id")]
        truth = (summary.app_dir / "demo_truth.jsonl").read_text().splitlines()
        analyses = [t["intended"] for t in map(json.loads, truth) if t.get("intended")]
    return (*prompts, *analyses)


def ensure_embedded_base_model(models_dir: Path) -> Path:
    """Build the embedded model on first use; later calls find it built and return at once."""
    return build_tiny_base_model(embedded_base_dir(models_dir), demo_corpus(), seed=0)
