"""`active_version_evaluation`: every night, each advisor's active version re-evaluated on the current validation
data; its check fails loudly (a failed run, an alert) when the version no longer holds up."""

import dagster as dg
from pydantic import Field

from mondrian_assets.core.data.splits import split_files
from mondrian_assets.core.evaluation.gates import GateThresholds
from mondrian_assets.core.registry.recheck import DEFAULT_MAE_TOLERANCE, Recheck, recheck_active_version
from mondrian_assets.core.registry.versions import RegistryError, active_version
from mondrian_assets.defs.partitions import advisor_partitions
from mondrian_assets.defs.resources import AlertWebhook, MondrianDatabase
from mondrian_assets.defs.run_workers import MLX_POOL

CHECK_NAME = "active_version_holds_up"


class NightlyConfig(dg.Config):
    min_format_compliance: float = Field(default=GateThresholds().min_format_compliance,
                                         description="The format gate's bar, as at deployment.")  # fmt: skip
    mae_tolerance: float = Field(default=DEFAULT_MAE_TOLERANCE,
                                 description="Allowed rise of the overall-score MAE over the deployment-time "
                                             "evaluation's, in score points.")  # fmt: skip


def _alert(result: Recheck, run_id: str) -> dict:
    return {
        "text": f"mondrian-assets: {result.advisor}-v{result.version} failed its nightly re-check: "
        + "; ".join(result.reasons),
        "advisor": result.advisor,
        "version": result.version,
        "reasons": result.reasons,
        "format_compliance": result.format_compliance,
        "overall_score_mae": result.overall_score_mae,
        "reference_overall_score_mae": result.reference_overall_score_mae,
        "report": result.report,
        "dagster_run_id": run_id,
    }


@dg.asset(
    partitions_def=advisor_partitions,
    group_name="monitoring",
    kinds={"mlx", "sqlite"},
    deps=["deployed_version", "val_split"],
    pool=MLX_POOL,  # an evaluation is an MLX step like training: it waits its turn in the same pool
    code_version="1",  # bump when the re-check's bars change
    check_specs=[dg.AssetCheckSpec(
        CHECK_NAME, asset="active_version_evaluation", blocking=True,
        description="The active version still meets the format gate on the current validation data, and its "
                    "overall-score MAE is within the tolerance of its deployment-time evaluation.",
    )],
)  # fmt: skip
def active_version_evaluation(
    context: dg.AssetExecutionContext, config: NightlyConfig, mondrian_db: MondrianDatabase, alert_webhook: AlertWebhook
):
    """The advisor's active version, evaluated with the evaluation's own code (base and fine-tuned) on today's
    validation data with the settings that deployed it; appended to `evaluation_history` in our state DB."""
    advisor = context.partition_key
    loc = mondrian_db.locations()
    engine = mondrian_db.state_engine()
    version = active_version(engine, advisor)
    if version is None:
        raise dg.Failure(f"{advisor} has no active version: nothing to re-check (deploy one first)", allow_retries=False)
    files = split_files(loc.training_data, advisor)
    thresholds = GateThresholds(min_format_compliance=config.min_format_compliance)
    try:
        result = recheck_active_version(
            engine, version, files.val_json, files.train_json, loc.evaluation / advisor / "nightly",
            thresholds=thresholds, mae_tolerance=config.mae_tolerance, actor=f"dagster:{context.run.run_id}",
            log=context.log.info,
        )  # fmt: skip
    except RegistryError as exc:
        raise dg.Failure(f"{advisor}: {exc}", allow_retries=False) from exc
    summary = f"{version.name}: {'holds up' if result.passed else 'REGRESSED'}: " + "; ".join(result.reasons)
    (context.log.info if result.passed else context.log.error)(summary)
    alert = "passed: no alert" if result.passed else alert_webhook.send(_alert(result, context.run.run_id))
    if not result.passed:
        context.log.warning(alert)

    def number(value: float | None) -> float:
        return float("nan") if value is None else value

    yield dg.Output(
        result.as_dict(),
        metadata={
            "version": version.name,
            "passed": result.passed,
            "format_compliance": number(result.format_compliance),
            "overall_score_mae": number(result.overall_score_mae),
            "deployment_format_compliance": number(result.reference_format_compliance),
            "deployment_overall_score_mae": number(result.reference_overall_score_mae),
            "examples": result.examples,
            "validation_data": dg.MetadataValue.path(result.validation_data),
            "report": dg.MetadataValue.path(result.report),
            "alert": alert,
        },
    )
    yield dg.AssetCheckResult(
        check_name=CHECK_NAME, passed=result.passed, severity=dg.AssetCheckSeverity.ERROR,
        metadata={"reasons": dg.MetadataValue.md("\n".join(f"- {r}" for r in result.reasons)),
                  "min_format_compliance": result.min_format_compliance, "mae_tolerance": result.mae_tolerance,
                  "alert": alert},
    )  # fmt: skip


nightly_evaluation_job = dg.define_asset_job(
    "nightly_evaluation_job", selection=dg.AssetSelection.assets(active_version_evaluation),
    description="Re-evaluate one advisor's active version on the current validation data (the nightly schedule's job).",
)  # fmt: skip
