"""The registry at a glance, per advisor: versions, active, pinned, previous, last evaluation and last decision.

Reading the status also repairs any active pointer that disagrees with the registry (see `pointer.py`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

from mondrian_assets.core.registry.decisions import previous_in
from mondrian_assets.core.registry.pointer import read_pointer, sync_pointer
from mondrian_assets.core.registry.versions import (
    Deployment,
    Version,
    active_in,
    last_deployment_in,
    list_versions,
    pinned_in,
    registered_advisors,
)
from mondrian_assets.core.state_db import deployments_table, model_versions_table, version_evaluations_table


@dataclass(frozen=True)
class AdvisorStatus:
    advisor: str
    versions: list[Version]
    active: Version | None
    pinned: Version | None
    previous: Version | None
    last_decision: Deployment | None
    last_evaluation: str | None  # when a version of this advisor was last evaluated (by eval_report or a re-check)
    pointer: str | None  # the active pointer's target, after repair
    pointer_repaired: bool


def _last_evaluation(conn: sa.Connection, advisor: str) -> str | None:
    v, e, d = model_versions_table.c, version_evaluations_table.c, deployments_table.c
    rechecked = conn.execute(
        sa.select(sa.func.max(e.created_at)).join_from(
            version_evaluations_table, model_versions_table, e.content_hash == v.content_hash
        ).where(v.advisor == advisor)
    ).scalar()
    decided = [json.loads(x).get("evaluated_at") for x in conn.execute(sa.select(d.evidence).where(d.advisor == advisor)).scalars()]
    dates = [x for x in [rechecked, *decided] if x]
    return max(dates) if dates else None


def advisor_status(engine: sa.Engine, models: Path, advisor: str) -> AdvisorStatus:
    repaired = sync_pointer(engine, models, advisor)
    with engine.connect() as conn:
        active, pinned, previous = active_in(conn, advisor), pinned_in(conn, advisor), previous_in(conn, advisor)
        last, evaluated = last_deployment_in(conn, advisor), _last_evaluation(conn, advisor)
    return AdvisorStatus(advisor, list_versions(engine, advisor), active, pinned, previous, last, evaluated,
                         read_pointer(models, advisor), repaired)  # fmt: skip


def registry_status(engine: sa.Engine, models: Path) -> list[AdvisorStatus]:
    return [advisor_status(engine, models, a) for a in registered_advisors(engine)]
