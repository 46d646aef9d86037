"""Registry test helpers: real adapter folders (safetensors written by MLX), real report files, a state DB.

Each candidate's report is what `eval_report` writes: gates and per-example outcomes. A version's outcomes on the
same (unchanged) validation data are those its copied report recorded, so decisions in tests are exact.
"""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import sqlalchemy as sa

from mondrian_assets.core.registry.decisions import deploy_candidate
from mondrian_assets.core.registry.evidence import ExampleOutcome, read_evidence
from mondrian_assets.core.registry.pointer import read_pointer
from mondrian_assets.core.registry.versions import Version, adapter_content_hash
from mondrian_assets.core.state_db import state_engine

REFERENCES = [7.0, 5.0, 8.0, 6.0]


def make_adapter(root: Path, seed: int) -> Path:
    """An adapter folder as training writes it; `seed` makes its weights (its content) distinct."""
    folder = root / f"adapter-{seed}"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    mx.save_safetensors(str(folder / "adapters.safetensors"), {"lora_a": mx.array(rng.normal(size=(8, 4)).astype(np.float32))})
    config = {"base_model": "base-model", "data_version": "d1", "fingerprint": f"run-{seed}", "rank": 4}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "training_args.json").write_text(json.dumps({"seed": seed}))
    (folder / "training_log.jsonl").write_text(json.dumps({"step": 1, "val_loss": 1.0}) + "\n")
    return folder


def make_report(root: Path, name: str, errors: list[float | None], *, gates: list[bool] | None = None) -> Path:
    """A comparison report: per example the absolute error of the fine-tuned score (None: invalid output)."""
    val = root / "val.json"
    if not val.exists():
        val.write_text(json.dumps([{"image_path": f"{i}.jpg", "prompt": "p", "response": "r"} for i in range(4)]))
    gates = [True, True, True] if gates is None else gates
    samples = [
        {"example_id": f"ex{i}", "reference": {"valid": True, "overall_score": ref},
         "fine_tuned_model": {"valid": err is not None, "overall_score": None if err is None else ref + err}}
        for i, (ref, err) in enumerate(zip(REFERENCES, errors, strict=True))
    ]  # fmt: skip
    report = {
        "evaluation_date": "2026-12-02T10:00:00+00:00",
        "validation_data": str(val),
        "settings": {"max_examples": None, "max_tokens": 64, "batch_size": 4, "seed": 0},
        "metrics": {"fine_tuned_model": {"format_compliance": sum(e is not None for e in errors) / len(errors)}},
        "gates": [{"name": f"gate{i}", "passed": ok, "message": f"gate{i} {'passed' if ok else 'failed'}"}
                  for i, ok in enumerate(gates)],  # fmt: skip
        "sample_results": samples,
    }
    path = root / "reports" / name / "comparison_report.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(report))
    return path


def own_report_outcomes(version: Version) -> list[ExampleOutcome]:
    """A version's outcomes on the (unchanged) validation data: what its copied report recorded."""
    return read_evidence(version.path / "comparison_report.json", version.content_hash).outcomes


class Registry:
    """A registry under `home` (models/ and the state DB as the pipeline lays them out) and candidates to deploy."""

    def __init__(self, tmp_path: Path, home: Path | None = None):
        self.root = tmp_path
        home = home or tmp_path / "home"
        self.models = home / "models"
        self.engine = state_engine(home / "mondrian_assets.db")
        self.evaluated: list[str] = []

    def evaluate(self, version: Version) -> list[ExampleOutcome]:
        self.evaluated.append(version.name)
        return own_report_outcomes(version)

    def candidate(self, seed: int, errors: list[float | None], gates: list[bool] | None = None) -> tuple[Path, Path]:
        return make_adapter(self.root / "adapters", seed), make_report(self.root, f"r{seed}", errors, gates=gates)

    def deploy(self, adapter: Path, report: Path, advisor: str = "weston", keep_last: int = 5):
        evidence = read_evidence(report, adapter_content_hash(adapter))
        return deploy_candidate(self.engine, self.models, advisor, adapter, evidence, evaluate=self.evaluate,
                                actor="test", keep_last=keep_last)  # fmt: skip

    def rows(self, table: sa.Table) -> int:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(table)).scalar()

    def pointer(self, advisor: str = "weston") -> str | None:
        return read_pointer(self.models, advisor)
