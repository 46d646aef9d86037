"""The nightly schedule: at 02:00 every advisor with an active version gets a re-check run.

A plain cron schedule (not `on_cron`, which would skip nights without a new training): drift shows on the current
validation data whether or not anything retrained. The timezone is $MONDRIAN_SCHEDULE_TIMEZONE (an IANA name such
as Europe/Paris), default UTC. It starts switched on; switch it off in the UI (Automation) or with
`dagster schedule stop nightly_evaluation_schedule -w workspace.yaml`.
"""

import os

import dagster as dg

from mondrian_assets.core.registry.versions import active_version, registered_advisors
from mondrian_assets.defs.nightly import nightly_evaluation_job
from mondrian_assets.defs.partitions import ADVISOR_PARTITIONS_NAME
from mondrian_assets.defs.resources import MondrianDatabase

NIGHTLY_CRON = "0 2 * * *"
TIMEZONE = os.environ.get("MONDRIAN_SCHEDULE_TIMEZONE") or "UTC"


@dg.schedule(
    cron_schedule=NIGHTLY_CRON,
    job=nightly_evaluation_job,
    execution_timezone=TIMEZONE,
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="02:00: re-evaluate every advisor's active version on the current validation data.",
)
def nightly_evaluation_schedule(context: dg.ScheduleEvaluationContext, mondrian_db: MondrianDatabase):
    engine = mondrian_db.state_engine()
    active = [a for a in registered_advisors(engine) if active_version(engine, a) is not None]
    unknown = [a for a in active if not context.instance.has_dynamic_partition(ADVISOR_PARTITIONS_NAME, a)]
    if unknown:  # versions registered from another Dagster instance: link here first
        context.log.warning(f"active versions but no partition on this instance: {', '.join(unknown)}")
    active = [a for a in active if a not in unknown]
    if not active:
        return dg.SkipReason("no advisor has an active version yet: nothing to re-check")
    night = context.scheduled_execution_time.strftime("%Y-%m-%d")
    # one run per advisor and night: a repeated tick for the same night cannot start a second re-check
    return [dg.RunRequest(run_key=f"nightly-{advisor}-{night}", partition_key=advisor) for advisor in active]
