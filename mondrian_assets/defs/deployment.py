"""`deployed_version`: the registry's decision on each evaluated candidate; `rollback_job` and `pin_job` for the UI.

How the gates reach the decision: `eval_report`'s gate checks are not blocking, so every candidate reaches
`deployed_version` in the same run and gets a recorded decision. `deployed_version` reads the gate results from
the report JSON `eval_report` wrote (never from the run's success) and checks that the report belongs to the
adapter content it registers; a candidate whose gates failed is recorded as rejected, whichever run deploys it.
"""

from pathlib import Path

import dagster as dg
from pydantic import Field

from mondrian_assets.core.registry import decisions
from mondrian_assets.core.registry.evidence import evaluate_version, read_evidence
from mondrian_assets.core.registry.pointer import pointer_path
from mondrian_assets.core.registry.versions import RegistryError, Version, list_versions
from mondrian_assets.defs.partitions import advisor_partitions
from mondrian_assets.defs.resources import MondrianDatabase


class DeployConfig(dg.Config):
    keep_last: int = Field(default=decisions.DEFAULT_KEEP_LAST, ge=1,
                           description="Keep the files of this many newest versions per advisor (the active, "
                                       "pinned and previous versions are always kept).")  # fmt: skip


def versions_table(versions: list[Version]) -> dg.TableMetadataValue:
    columns = [("version", "int"), ("status", "string"), ("pinned", "bool"), ("gates_passed", "bool"),
               ("created_at", "string"), ("content_hash", "string"), ("files", "string")]  # fmt: skip
    return dg.MetadataValue.table(
        [dg.TableRecord({"version": v.number, "status": v.status, "pinned": v.pinned, "gates_passed": v.gates_passed,
                         "created_at": v.created_at, "content_hash": v.content_hash[:12],
                         "files": "pruned" if v.pruned_at else str(v.path)}) for v in versions],
        schema=dg.TableSchema([dg.TableColumn(name, kind) for name, kind in columns]),
    )  # fmt: skip


def _comparison_md(comparison: dict | None) -> str:
    if not comparison:
        return "no comparison (first version, a failed gate, or a pinned advisor)"
    return "\n".join([
        "| on the same examples | candidate | active |", "| --- | --- | --- |",
        f"| mean overall-score error | {comparison['candidate_mean_error']:.3f} | {comparison['active_mean_error']:.3f} |",
        f"| valid answers | {comparison['candidate_valid']}/{comparison['examples']} | "
        f"{comparison['active_valid']}/{comparison['examples']} |",
        f"\nAn invalid answer counts as an error of {comparison['invalid_counts_as']:g}.",
    ])  # fmt: skip


@dg.asset(partitions_def=advisor_partitions, group_name="model", kinds={"sqlite"},
          code_version="1")  # bump when the deploy decision rule changes
def deployed_version(
    context: dg.AssetExecutionContext, config: DeployConfig, mondrian_db: MondrianDatabase, eval_report: dict
) -> dg.Output[dict]:
    """Register the evaluated adapter as an immutable version and promote it only if its gates passed and it is
    at least as good as the active version on the same validation examples; otherwise record it as rejected.
    The decision is the output; `models/<advisor>-active` points at the active version."""
    advisor = context.partition_key
    loc = mondrian_db.locations()
    engine = mondrian_db.state_engine()
    if "adapter_sha256" not in eval_report:
        raise dg.Failure(f"{advisor}: this eval_report predates the registry; materialize eval_report again",
                         allow_retries=False)  # fmt: skip
    try:
        evidence = read_evidence(Path(eval_report["report"]), eval_report["adapter_sha256"])
        decision = decisions.deploy_candidate(
            engine, loc.models, advisor, Path(eval_report["adapter_dir"]), evidence,
            evaluate=lambda v: evaluate_version(engine, v, evidence.validation_data, evidence.settings,
                                                log=context.log.info),
            actor=f"dagster:{context.run.run_id}", keep_last=config.keep_last,
        )  # fmt: skip
    except RegistryError as exc:
        raise dg.Failure(f"{advisor}: {exc}", allow_retries=False) from exc
    context.log.info(f"{advisor}: {decision.summary()}")
    active = decision.active.name if decision.active else "none"
    return dg.Output(
        {"advisor": advisor, "decision": decision.action, "candidate": decision.candidate.number,
         "active": decision.active.number if decision.active else None, "reasons": decision.reasons},
        metadata={
            "decision": decision.action,
            "candidate_version": decision.candidate.name,
            "active_version": active,
            "reasons": dg.MetadataValue.md("\n".join(f"- {r}" for r in decision.reasons)),
            "candidate_vs_active": dg.MetadataValue.md(_comparison_md(decision.comparison)),
            "versions": versions_table(list_versions(engine, advisor)),
            "active_pointer": dg.MetadataValue.path(str(pointer_path(loc.models, advisor))),
            "pruned_versions": ", ".join(map(str, decision.pruned)) or "none",
        },
    )  # fmt: skip


class RollbackConfig(dg.Config):
    advisor: str = Field(description="The advisor to roll back.")
    to_version: int | None = Field(default=None, description="Version number; empty: the previous active version.")


class PinConfig(dg.Config):
    advisor: str = Field(description="The advisor to pin or unpin.")
    version: int | None = Field(default=None, description="Version to pin (made active); empty: the active one.")
    unpin: bool = Field(default=False, description="Unpin instead: deploys may promote again.")


def _report(context: dg.OpExecutionContext, engine, advisor: str, what: str) -> dg.AssetMaterialization:
    """A manual change of the active version is a new state of `deployed_version`: record it there for the UI."""
    context.log.info(f"{advisor}: {what}")
    versions = list_versions(engine, advisor)
    active = next((v.name for v in versions if v.status == "active"), "none")
    return dg.AssetMaterialization(
        asset_key="deployed_version", partition=advisor,
        metadata={"decision": what, "active_version": active, "versions": versions_table(versions)},
    )  # fmt: skip


@dg.op
def rollback_active_version(context: dg.OpExecutionContext, config: RollbackConfig, mondrian_db: MondrianDatabase):
    engine = mondrian_db.state_engine()
    try:
        version = decisions.rollback(engine, mondrian_db.locations().models, config.advisor, to=config.to_version,
                                     actor=f"dagster:{context.run.run_id}")  # fmt: skip
    except RegistryError as exc:
        raise dg.Failure(str(exc), allow_retries=False) from exc
    yield _report(context, engine, config.advisor, f"rollback to {version.name}")
    yield dg.Output(version.number)


@dg.op
def pin_active_version(context: dg.OpExecutionContext, config: PinConfig, mondrian_db: MondrianDatabase):
    engine, models, actor = mondrian_db.state_engine(), mondrian_db.locations().models, f"dagster:{context.run.run_id}"
    try:
        if config.unpin:
            version = decisions.unpin(engine, models, config.advisor, actor=actor)
        else:
            version = decisions.pin(engine, models, config.advisor, number=config.version, actor=actor)
    except RegistryError as exc:
        raise dg.Failure(str(exc), allow_retries=False) from exc
    yield _report(context, engine, config.advisor, f"{'unpinned' if config.unpin else 'pinned'} {version.name}")
    yield dg.Output(version.number)


@dg.job(description="Make an earlier version of an advisor active again (default: the previous active one).")
def rollback_job():
    rollback_active_version()


@dg.job(description="Pin an advisor's version (deploys then only record candidates), or unpin it.")
def pin_job():
    pin_active_version()
