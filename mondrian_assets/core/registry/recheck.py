"""The nightly re-check: does each advisor's active version still hold up on the current validation data?

The active version is evaluated with the one evaluation entry (`evaluate_adapter`: base and fine-tuned on the same
examples, the same gates), with the generation settings of the evaluation that deployed it, so the scores are
comparable; only the validation data is today's. The verdict compares against that deployment-time evaluation
(the version's registry metrics): it fails when format compliance falls below the gate's bar, or when the
overall-score MAE got worse by more than a tolerance. Every re-check is appended to `evaluation_history`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import sqlalchemy as sa

from mondrian_assets.core.evaluation.gates import GateThresholds
from mondrian_assets.core.evaluation.run import EvalSettings, decoded_expected_scores, evaluate_adapter
from mondrian_assets.core.registry.evidence import file_sha256
from mondrian_assets.core.registry.versions import RegistryError, Version, now
from mondrian_assets.core.state_db import evaluation_history_table

DEFAULT_MAE_TOLERANCE = 0.5  # overall-score points (scores are 1-10): validation sets are small and noisy


@dataclass(frozen=True)
class RecheckVerdict:
    passed: bool
    reasons: list[str]  # one sentence per failed bar, or what held


@dataclass(frozen=True)
class Recheck:
    advisor: str
    version: int
    content_hash: str
    evaluated_at: str
    validation_data: str
    val_sha256: str
    examples: int
    format_compliance: float | None
    overall_score_mae: float | None
    reference_format_compliance: float | None  # the deployment-time evaluation's
    reference_overall_score_mae: float | None
    min_format_compliance: float
    mae_tolerance: float
    passed: bool
    reasons: list[str]
    report: str
    actor: str

    def as_dict(self) -> dict:
        return asdict(self)


def judge(
    format_compliance: float | None,
    overall_score_mae: float | None,
    reference_mae: float | None,
    *,
    min_format_compliance: float,
    mae_tolerance: float,
) -> RecheckVerdict:
    """The two bars: compliance at least the gate's, MAE no more than `mae_tolerance` above deployment time."""
    failures, held = [], []
    if format_compliance is None or format_compliance < min_format_compliance:
        shown = "undefined" if format_compliance is None else f"{format_compliance:.3f}"
        failures.append(f"format compliance {shown} is below the gate's {min_format_compliance:.3f}")
    else:
        held.append(f"format compliance {format_compliance:.3f} >= {min_format_compliance:.3f}")
    if overall_score_mae is None:
        failures.append("no valid scored output: the overall-score MAE is undefined")
    elif reference_mae is None:
        held.append(f"overall-score MAE {overall_score_mae:.3f} (no deployment-time MAE to compare with)")
    elif overall_score_mae > reference_mae + mae_tolerance:
        failures.append(f"overall-score MAE {overall_score_mae:.3f} regressed from {reference_mae:.3f} at deployment "
                        f"by more than the tolerance {mae_tolerance:.2f}")  # fmt: skip
    else:
        held.append(f"overall-score MAE {overall_score_mae:.3f} within {mae_tolerance:.2f} of {reference_mae:.3f} "
                    "at deployment")  # fmt: skip
    return RecheckVerdict(not failures, failures or held)


def deployment_settings(version: Version, thresholds: GateThresholds) -> EvalSettings:
    """The generation settings of the evaluation that deployed `version` (from its copied report), so today's
    numbers compare with its registry metrics; evaluation defaults when the report is gone."""
    report = Path(version.eval_report) if version.eval_report else None
    saved = json.loads(report.read_text()).get("settings", {}) if report is not None and report.is_file() else {}
    defaults = EvalSettings()
    return EvalSettings(
        max_examples=saved.get("max_examples"),
        max_tokens=saved.get("max_tokens"),
        batch_size=saved.get("batch_size", defaults.batch_size),
        seed=saved.get("seed", defaults.seed),
        expected_scores=decoded_expected_scores(saved) if saved else defaults.expected_scores,
        thresholds=thresholds,
    )


def recheck_active_version(
    engine: sa.Engine,
    version: Version,
    val_json: Path,
    train_json: Path,
    out_dir: Path,
    *,
    thresholds: GateThresholds = GateThresholds(),
    mae_tolerance: float = DEFAULT_MAE_TOLERANCE,
    actor: str,
    log: Callable[[str], None] = print,
) -> Recheck:
    """Evaluate `version` on today's validation data, judge it against its deployment-time metrics, and append
    the result to `evaluation_history`."""
    if version.pruned_at is not None or not version.path.is_dir():
        raise RegistryError(f"{version.name}'s files are gone ({version.path}); it cannot be re-checked")
    if not val_json.is_file():
        raise RegistryError(f"{version.advisor} has no validation data at {val_json}; materialize val_split first")
    outcome = evaluate_adapter(version.base_model, version.path, val_json, train_json, out_dir,
                               deployment_settings(version, thresholds), log=log)  # fmt: skip
    tuned = outcome.comparison.as_dict()["fine_tuned_model"]
    reference = version.metrics
    verdict = judge(tuned["format_compliance"], tuned["overall_score_mae"], reference.get("overall_score_mae"),
                    min_format_compliance=thresholds.min_format_compliance, mae_tolerance=mae_tolerance)  # fmt: skip
    result = Recheck(
        advisor=version.advisor, version=version.number, content_hash=version.content_hash, evaluated_at=now(),
        validation_data=str(val_json), val_sha256=file_sha256(val_json), examples=outcome.examples,
        format_compliance=tuned["format_compliance"], overall_score_mae=tuned["overall_score_mae"],
        reference_format_compliance=reference.get("format_compliance"),
        reference_overall_score_mae=reference.get("overall_score_mae"),
        min_format_compliance=thresholds.min_format_compliance, mae_tolerance=mae_tolerance,
        passed=verdict.passed, reasons=verdict.reasons, report=str(outcome.paths.report_json), actor=actor,
    )  # fmt: skip
    with engine.begin() as conn:
        conn.execute(sa.insert(evaluation_history_table).values(**result.as_dict() | {"reasons": json.dumps(result.reasons)}))
    return result


def _row(row: sa.Row) -> Recheck:
    return Recheck(**{**row._asdict(), "reasons": json.loads(row.reasons)})


def history(engine: sa.Engine, advisor: str) -> list[Recheck]:
    """The advisor's re-checks, oldest first."""
    t = evaluation_history_table
    with engine.connect() as conn:
        rows = conn.execute(sa.select(*[c for c in t.c if c.name != "id"]).where(t.c.advisor == advisor).order_by(t.c.id)).all()
    return [_row(r) for r in rows]


def last_recheck(engine: sa.Engine, advisor: str) -> Recheck | None:
    t = evaluation_history_table
    with engine.connect() as conn:
        row = conn.execute(
            sa.select(*[c for c in t.c if c.name != "id"]).where(t.c.advisor == advisor).order_by(t.c.id.desc())
        ).first()
    return _row(row) if row is not None else None
