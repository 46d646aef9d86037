"""`retrain_sensor`: new finished jobs or analysis files in the app start a retrain of the advisors they belong to."""

import time

import dagster as dg

from mondrian_assets.core.data.link_cache import LinkStore
from mondrian_assets.core.data.linker import last_link
from mondrian_assets.core.data.new_examples import WatchCursor, look
from mondrian_assets.defs.jobs import retrain_job
from mondrian_assets.defs.partitions import ADVISOR_PARTITIONS_NAME, advisor_partitions
from mondrian_assets.defs.resources import MondrianDatabase, RetrainSettings


@dg.sensor(
    job=retrain_job,
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description="Reads only what is new in the app's DB and files since the last tick; once an advisor has "
    "min_new_examples new linkable examples (or max_wait_hours after the first), requests one retrain_job run "
    "for it. New advisors become partitions. Limits: one run per advisor, one MLX step per machine (dagster.yaml).",
)
def retrain_sensor(
    context: dg.SensorEvaluationContext, mondrian_db: MondrianDatabase, retrain_settings: RetrainSettings
) -> dg.SensorResult:
    loc = mondrian_db.locations()
    if not loc.db_path.is_file():  # nothing to watch yet (a fresh checkout before `./dev demo`): no error each tick
        return dg.SensorResult(skip_reason=f"no app database at {loc.db_path} yet (set MONDRIAN_APP_DIR or "
                               "MONDRIAN_DB, or run ./dev demo-data)", cursor=context.cursor)  # fmt: skip
    cursor = WatchCursor.decode(context.cursor)
    if cursor is None:  # the first tick starts where the last link ended: what it linked is not new
        linked = last_link(LinkStore(mondrian_db.state_engine()), loc)
        if linked is None:  # a fresh home: training every advisor unasked would hold the machine for hours
            return dg.SensorResult(skip_reason="the app was never linked here: materialize linked_records (or run "
                                   "./dev demo) first; from then on new analyses start retrains")  # fmt: skip
        cursor = WatchCursor.after(linked)
    with mondrian_db.app_connection() as conn:
        seen = look(conn, loc, cursor, retrain_settings.policy(), time.time())

    known = set(context.instance.get_dynamic_partitions(ADVISOR_PARTITIONS_NAME))
    new_advisors = sorted(set(seen.new_examples) - known)
    requests = [
        dg.RunRequest(
            run_key=batch.run_key,
            partition_key=batch.advisor,
            tags={"mondrian/retrain_reason": batch.reason, "mondrian/new_examples": str(batch.count)},
        )
        for batch in seen.due
    ]
    waiting = ", ".join(f"{a} {p.count}" for a, p in sorted(seen.cursor.pending.items())) or "none"
    context.log.info(f"read {seen.rows_read} rows, re-checked {seen.waiting_checked} waiting jobs; new examples: "
                     f"{seen.new_examples or 'none'}; still waiting: {waiting}")  # fmt: skip
    return dg.SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[advisor_partitions.build_add_request(new_advisors)] if new_advisors else None,
        cursor=seen.cursor.encode(),
        skip_reason=None if requests else f"no advisor due (new examples waiting: {waiting})",
    )
