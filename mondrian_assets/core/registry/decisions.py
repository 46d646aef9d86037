"""Who is active: deploy decisions and the manual actions, each one registry transaction, then the pointer.

- `deploy_candidate`: register the candidate (idempotent by content), then promote it only if its gates passed,
  the advisor is not pinned, and it is at least as good as the active version on the same validation examples;
  otherwise record it as rejected with the reasons. Every candidate gets a recorded decision, once per evidence:
  the same adapter evaluated on the same validation data with the same settings changes nothing (`unchanged`).
- `rollback` (default: the previous active version), `pin` (keep a version active; candidates are still recorded,
  never promoted), `unpin`. A version whose gates failed is never made active, by a deploy or by hand.
- Retention keeps the files of the newest `keep_last` versions, and always the active, pinned and previous ones.

Crash safety: a version folder is complete before its row exists; a decision is one transaction; the pointer is
switched after the commit by `sync_pointer`, which every later deploy, manual action and `status` repeats. A crash
between any two steps leaves the old or the new version active, and a pointer the next call repairs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from mondrian_assets.core.evaluation.paired import WORST_SCORE_ERROR, paired_score_errors
from mondrian_assets.core.registry.evidence import Evidence, ExampleOutcome
from mondrian_assets.core.registry.pointer import sync_pointer
from mondrian_assets.core.registry.versions import (
    RegistryError,
    Version,
    active_in,
    decision_in,
    insert_deployment,
    model_versions_table,
    pinned_in,
    prune_versions,
    register_version,
    step_done,
    update_version,
    version_in,
    write_lock,
)

DEFAULT_KEEP_LAST = 5
WORST_ERROR = WORST_SCORE_ERROR  # an invalid answer counts as the largest possible overall-score error (9)


@dataclass(frozen=True)
class ActiveComparison:
    """Candidate vs active on the same examples (those whose reference validates)."""

    examples: int
    candidate_error: float
    active_error: float
    candidate_valid: int
    active_valid: int

    @property
    def candidate_at_least_as_good(self) -> bool:
        return self.candidate_error <= self.active_error

    def as_dict(self) -> dict:
        return {"examples": self.examples, "candidate_mean_error": round(self.candidate_error, 4),
                "active_mean_error": round(self.active_error, 4), "candidate_valid": self.candidate_valid,
                "active_valid": self.active_valid, "invalid_counts_as": WORST_ERROR}  # fmt: skip


def candidate_vs_active(candidate: list[ExampleOutcome], active: list[ExampleOutcome]) -> ActiveComparison:
    """Paired, by the evaluation's own rule (`paired.paired_score_errors`): the same examples for both; an invalid
    answer is the worst error on its example."""
    by_id = {o.example_id: o for o in active}
    if set(by_id) != {o.example_id for o in candidate}:
        raise RegistryError("the candidate and the active version were evaluated on different examples")
    pairs = [(c, by_id[c.example_id]) for c in candidate]
    paired = paired_score_errors(
        [c.reference_score for c, _ in pairs],
        [a.score if a.valid else None for _, a in pairs],
        [c.score if c.valid else None for c, _ in pairs],
        invalid_error=WORST_ERROR,
    )  # fmt: skip
    if paired.mae_a is None or paired.mae_b is None:
        raise RegistryError("no validation example has a valid reference: nothing to compare on")
    return ActiveComparison(paired.examples, paired.mae_b, paired.mae_a, paired.valid_b, paired.valid_a)


@dataclass(frozen=True)
class Decision:
    advisor: str
    action: str  # promote | reject | unchanged
    candidate: Version
    active: Version | None  # after the decision
    reasons: list[str]
    comparison: dict | None = None
    pointer_repaired: bool = False
    pruned: list[int] = field(default_factory=list)

    def summary(self) -> str:
        active = self.active.name if self.active else "none"
        verb = {"promote": "promoted", "reject": "rejected", "unchanged": "unchanged"}[self.action]
        head = f"{verb} {self.candidate.name} (active: {active})"
        return head if self.action == "promote" else f"{head}: " + "; ".join(self.reasons)


def previous_in(conn: sa.Connection, advisor: str) -> Version | None:
    """Where `rollback` returns by default: the newest earlier version that was once active, passed its gates
    and still has its files."""
    active = active_in(conn, advisor)
    if active is None:
        return None
    c = model_versions_table.c
    number = conn.execute(
        sa.select(c.number).where(
            c.advisor == advisor, c.number < active.number, c.status == "retired", c.gates_passed == sa.true(),
            c.pruned_at.is_(None),
        ).order_by(c.number.desc()).limit(1)
    ).scalar()  # fmt: skip
    return version_in(conn, advisor, number) if number is not None else None


def apply_retention(engine: sa.Engine, advisor: str, keep_last: int) -> list[int]:
    with engine.connect() as conn:
        keep = (active_in(conn, advisor), pinned_in(conn, advisor), previous_in(conn, advisor))
    return prune_versions(engine, advisor, keep_last, {v.number for v in keep if v is not None})


def _judge(
    candidate: Version, active: Version | None, pinned: Version | None, evidence: Evidence,
    evaluate: Callable[[Version], list[ExampleOutcome]],
) -> tuple[list[str], ActiveComparison | None]:  # fmt: skip
    reasons = evidence.gate_failures
    if pinned is not None:
        reasons.append(f"{candidate.advisor} is pinned to {pinned.name}: candidates are recorded, not promoted")
    comparison = None
    if not reasons and active is not None:
        comparison = candidate_vs_active(evidence.outcomes, evaluate(active))
        if not comparison.candidate_at_least_as_good:
            reasons.append(
                f"worse than the active {active.name} on the same {comparison.examples} validation examples: "
                f"mean overall-score error {comparison.candidate_error:.3f} vs {comparison.active_error:.3f} "
                f"(an invalid answer counts as {WORST_ERROR:g})"
            )
    return reasons, comparison


def _number(version: Version | None) -> int | None:
    return version.number if version is not None else None


def deploy_candidate(
    engine: sa.Engine,
    models: Path,
    advisor: str,
    adapter_dir: Path,
    evidence: Evidence,
    *,
    evaluate: Callable[[Version], list[ExampleOutcome]],
    actor: str,
    keep_last: int = DEFAULT_KEEP_LAST,
) -> Decision:
    """Register `adapter_dir` and decide. `evaluate(version)` returns a version's outcomes on the candidate's
    validation examples (`evidence.evaluate_version`); it runs outside the write lock, and the decision is
    judged again if the active version changed meanwhile."""
    candidate, _ = register_version(
        engine, models, advisor, adapter_dir, report=evidence.report_path, metrics=evidence.metrics,
        gates_passed=evidence.gates_passed, expected_hash=evidence.adapter_hash,
    )  # fmt: skip
    for _ in range(3):
        with engine.connect() as conn:
            active, pinned = active_in(conn, advisor), pinned_in(conn, advisor)
            prior = decision_in(conn, advisor, candidate.number, evidence.key)
        if prior is not None or _number(active) == candidate.number:
            note = (f"{candidate.name} was already decided on this evidence: {prior.action} at {prior.at}"
                    if prior is not None else f"{candidate.name} is already the active version")  # fmt: skip
            repaired = sync_pointer(engine, models, advisor)
            return Decision(advisor, "unchanged", candidate, active, [note], pointer_repaired=repaired)
        reasons, comparison = _judge(candidate, active, pinned, evidence, evaluate)
        action = "reject" if reasons else "promote"
        record = {"report": str(evidence.report_path), "evaluated_at": evidence.evaluated_at,
                  "validation_data": str(evidence.validation_data),
                  "val_sha256": evidence.val_sha256, "gates": evidence.gates,
                  "candidate_vs_active": comparison.as_dict() if comparison else None}  # fmt: skip
        with write_lock(engine) as conn:
            if _number(active_in(conn, advisor)) != _number(active) or decision_in(
                conn, advisor, candidate.number, evidence.key
            ):
                continue  # another deploy decided meanwhile: judge again against what is active now
            current = version_in(conn, advisor, candidate.number)
            assert current is not None
            evaluated = {"gates_passed": evidence.gates_passed, "metrics": json.dumps(evidence.metrics)}
            if action == "promote":
                if active is not None:
                    update_version(conn, active, status="retired")
                update_version(conn, current, status="active", **evaluated)
            else:  # a version that was active once stays `retired`: rollback may still return to it
                update_version(conn, current, status="rejected" if current.status == "candidate" else current.status,
                               **evaluated)  # fmt: skip
            why = reasons or ["gates passed, " + ("at least as good as the active version" if active else "first version")]
            insert_deployment(conn, advisor, action, from_version=_number(active), to_version=candidate.number,
                              reasons=why, actor=actor, evidence=record, evidence_key=evidence.key)  # fmt: skip
            after, decided = active_in(conn, advisor), version_in(conn, advisor, candidate.number)
        step_done("decision_recorded")
        repaired = sync_pointer(engine, models, advisor)
        pruned = apply_retention(engine, advisor, keep_last)
        assert decided is not None
        return Decision(advisor, action, decided, after, why, record["candidate_vs_active"], repaired, pruned)
    raise RegistryError(f"{advisor}: the active version kept changing during the decision; deploy again")


def _activatable(conn: sa.Connection, advisor: str, number: int) -> Version:
    version = version_in(conn, advisor, number)
    if version is None:
        raise RegistryError(f"{advisor} has no version {number}")
    if version.pruned_at is not None:
        raise RegistryError(f"{version.name}'s files were removed by retention at {version.pruned_at}")
    if not version.gates_passed:
        raise RegistryError(f"{version.name} failed its evaluation gates; it cannot be made active")
    return version


def _activate(conn: sa.Connection, active: Version | None, target: Version) -> None:
    if active is not None and active.number != target.number:
        update_version(conn, active, status="retired")  # first: at most one active row, always
    update_version(conn, target, status="active")


def rollback(engine: sa.Engine, models: Path, advisor: str, *, to: int | None = None, actor: str) -> Version:
    """Make `to` (default: the previous active version) active again."""
    with write_lock(engine) as conn:
        active, pinned = active_in(conn, advisor), pinned_in(conn, advisor)
        if active is None:
            raise RegistryError(f"{advisor} has no active version: nothing to roll back")
        if pinned is not None:
            raise RegistryError(f"{advisor} is pinned to {pinned.name}: unpin it first, or pin another version")
        target = _activatable(conn, advisor, to) if to is not None else previous_in(conn, advisor)
        if target is None:
            raise RegistryError(f"{advisor}: no earlier version was active and passed its gates; name one with --to")
        if target.number == active.number:
            raise RegistryError(f"{target.name} is already the active version")
        _activate(conn, active, target)
        insert_deployment(conn, advisor, "rollback", from_version=active.number, to_version=target.number,
                          reasons=[f"rolled back from {active.name} to {target.name}"], actor=actor)  # fmt: skip
        result = version_in(conn, advisor, target.number)
    sync_pointer(engine, models, advisor)
    assert result is not None
    return result


def pin(engine: sa.Engine, models: Path, advisor: str, *, number: int | None = None, actor: str) -> Version:
    """Pin `number` (default: the active version) and make it active; deploys then record candidates only."""
    with write_lock(engine) as conn:
        active, pinned = active_in(conn, advisor), pinned_in(conn, advisor)
        target = _activatable(conn, advisor, number) if number is not None else active
        if target is None:
            raise RegistryError(f"{advisor} has no active version to pin; name one with --version")
        if pinned is not None and pinned.number == target.number:
            result = pinned  # already so: nothing to record
        else:
            if pinned is not None:
                update_version(conn, pinned, pinned=False)
            _activate(conn, active, target)
            update_version(conn, target, pinned=True)
            insert_deployment(conn, advisor, "pin", from_version=_number(active), to_version=target.number,
                              reasons=[f"pinned {target.name}"], actor=actor)  # fmt: skip
            result = version_in(conn, advisor, target.number)
    sync_pointer(engine, models, advisor)
    assert result is not None
    return result


def unpin(engine: sa.Engine, models: Path, advisor: str, *, actor: str) -> Version:
    """Let deploys promote again; the active version stays until a better candidate arrives."""
    with write_lock(engine) as conn:
        pinned = pinned_in(conn, advisor)
        if pinned is None:
            raise RegistryError(f"{advisor} is not pinned")
        update_version(conn, pinned, pinned=False)
        insert_deployment(conn, advisor, "unpin", from_version=pinned.number, to_version=pinned.number,
                          reasons=[f"unpinned {pinned.name}"], actor=actor)  # fmt: skip
    sync_pointer(engine, models, advisor)
    return pinned
