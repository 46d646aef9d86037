"""What a deploy decides on: the gates and per-example outcomes `eval_report` wrote for the candidate (read from
its report JSON, never assumed), and the active version's outcomes on the same validation examples.

The active version is evaluated with the evaluation's own pieces (`load_eval_examples`, `load_for_inference`,
`generate_analyses`, the canonical parser) and the candidate's settings (examples, token budget, batch, seed,
decoding), and cached in our state DB by (adapter content hash, validation file content, settings): a re-run with
nothing new does not generate again. The nightly re-check can read and fill the same cache (`evaluate_version`). MLX runs in
a child process (core/isolation.py), as in training and evaluation.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

from mondrian_assets.core.isolation import run_in_child
from mondrian_assets.core.registry.versions import RegistryError, Version, now
from mondrian_assets.core.schema import parse_analysis
from mondrian_assets.core.state_db import version_evaluations_table


@dataclass(frozen=True)
class ExampleOutcome:
    """One model's answer to one validation example, as much as the comparison needs."""

    example_id: str
    reference_score: float | None  # None: the reference itself does not validate (not scored)
    valid: bool
    score: float | None

    def as_dict(self) -> dict:
        return {"example_id": self.example_id, "reference_score": self.reference_score, "valid": self.valid,
                "score": self.score}  # fmt: skip


@dataclass(frozen=True)
class Evidence:
    """The candidate's evaluation, as `eval_report` wrote it."""

    report_path: Path
    evaluated_at: str
    adapter_hash: str  # the content that was evaluated
    validation_data: Path
    val_sha256: str
    settings: dict  # examples, token budget, batch, seed, thresholds: what the active version is run with too
    gates: list[dict]  # [{name, passed, message, ...}], in the report's order
    metrics: dict  # the fine-tuned model's metrics
    outcomes: list[ExampleOutcome]

    @property
    def gates_passed(self) -> bool:
        return bool(self.gates) and all(g.get("passed") is True for g in self.gates)

    @property
    def gate_failures(self) -> list[str]:
        if not self.gates:
            return [f"{self.report_path} records no gate results: nothing shows the candidate passed them"]
        return [f"gate {g.get('name')} failed: {g.get('message')}" for g in self.gates if g.get("passed") is not True]

    @property
    def key(self) -> str:
        """One decision per candidate and evidence: the same validation data and settings decide nothing new."""
        blob = json.dumps({"val": self.val_sha256, "settings": self.settings}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_evidence(report_path: Path, adapter_hash: str) -> Evidence:
    """Read the report `eval_report` wrote; a report without gate results or examples is evidence of nothing."""
    try:
        report = json.loads(Path(report_path).read_text())
    except (OSError, ValueError) as exc:
        raise RegistryError(f"cannot read the evaluation report {report_path}: {exc}; run eval_report again") from exc
    validation_data = Path(report["validation_data"])
    outcomes = [
        ExampleOutcome(
            example_id=str(row["example_id"]),
            reference_score=row["reference"].get("overall_score") if row["reference"].get("valid") else None,
            valid=bool(row["fine_tuned_model"].get("valid")),
            score=row["fine_tuned_model"].get("overall_score"),
        )
        for row in report.get("sample_results", [])
    ]
    return Evidence(
        report_path=Path(report_path),
        evaluated_at=str(report.get("evaluation_date", "")),
        adapter_hash=adapter_hash,
        validation_data=validation_data,
        val_sha256=file_sha256(validation_data) if validation_data.is_file() else "missing",
        settings=report.get("settings", {}),
        gates=list(report.get("gates", [])),
        metrics=report.get("metrics", {}).get("fine_tuned_model", {}),
        outcomes=outcomes,
    )


def outcome_of(example_id: str, reference: str, output: str) -> ExampleOutcome:
    ref, out = parse_analysis(reference), parse_analysis(output)
    return ExampleOutcome(
        example_id=example_id,
        reference_score=ref.analysis.overall_score if ref.analysis is not None else None,
        valid=out.analysis is not None,
        score=out.analysis.overall_score if out.analysis is not None else None,
    )


def _settings_key(version: Version, settings: dict) -> str:
    keep = {k: settings.get(k) for k in ("max_examples", "max_tokens", "batch_size", "seed", "decoding")}
    return json.dumps({"base_model": version.base_model, **keep}, sort_keys=True)


def generate_outcomes(base_model: str, adapter_dir: Path, validation_data: Path, settings: dict, label: str,
                      log: Callable[[str], None] = print) -> list[ExampleOutcome]:  # fmt: skip
    """An adapter's outcomes on the validation examples with the given generation settings (MLX runs here)."""
    from mondrian_assets.core.evaluation.run import decoded_expected_scores
    from mondrian_assets.core.inference.generate import generate_analyses, load_eval_examples
    from mondrian_assets.core.inference.loading import load_for_inference

    examples = load_eval_examples(validation_data, limit=settings.get("max_examples"))
    log(f"{label}: generating {len(examples)} analyses on the current validation data")
    loaded = load_for_inference(base_model, adapter_dir)
    generations = generate_analyses(
        loaded, examples, max_tokens=settings["max_tokens"], seed=settings.get("seed", 0),
        batch_size=settings.get("batch_size", 4), expected_scores=decoded_expected_scores(settings),
    )  # fmt: skip
    return [outcome_of(e.example_id, e.reference, g.text) for e, g in zip(examples, generations, strict=True)]


def evaluate_version(
    engine: sa.Engine, version: Version, validation_data: Path, settings: dict, log: Callable[[str], None] = print
) -> list[ExampleOutcome]:
    """`version`'s outcomes on `validation_data` with the given generation settings, from the cache when this
    exact (content, validation file, settings) was evaluated before."""
    t = version_evaluations_table.c
    key = (version.content_hash, file_sha256(validation_data), _settings_key(version, settings))
    with engine.connect() as conn:
        cached = conn.execute(
            sa.select(t.results).where(t.content_hash == key[0], t.val_sha256 == key[1], t.settings_key == key[2])
        ).scalar()
    if cached is not None:
        log(f"{version.name}: outcomes on this validation data already known (cached)")
        return [ExampleOutcome(**row) for row in json.loads(cached)]

    if version.pruned_at is not None or not version.path.is_dir():
        raise RegistryError(f"{version.name}'s files are gone ({version.path}); it cannot be evaluated")
    outcomes = run_in_child(
        generate_outcomes, {"base_model": version.base_model, "adapter_dir": version.path,
                            "validation_data": validation_data, "settings": settings, "label": version.name},
        what=f"evaluation of {version.name}", report_to="log", on_report=log, expected=(ValueError,),
    )  # fmt: skip
    with engine.begin() as conn:
        conn.execute(
            sa.insert(version_evaluations_table).prefix_with("OR IGNORE").values(
                content_hash=key[0], val_sha256=key[1], settings_key=key[2],
                results=json.dumps([o.as_dict() for o in outcomes]), created_at=now(),
            )
        )  # fmt: skip
    return outcomes
