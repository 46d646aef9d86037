"""Run a job in-process on the persistent instance and read what happened back from the instance.

The outcome is read from the events the run stored (asset check evaluations, observations, step failures), never
from error text: a blocking check that failed is a verdict ("gated"), an advisor with too little data is a decision
(an observation), and only a step failure no failed gate accounts for is a real failure.
"""

from __future__ import annotations

import logging
import sys
import warnings
from dataclasses import dataclass, field

import dagster as dg
from dagster._core.log_manager import LOG_RECORD_METADATA_ATTR

from mondrian_assets.definitions import defs
from mondrian_assets.defs.run_workers import repair_instance


@dataclass(frozen=True)
class FailedGate:
    asset: str
    check: str
    message: str
    stops_downstream: bool = False  # a blocking check failed at ERROR severity (a WARN one only informs)


@dataclass(frozen=True)
class RunOutcome:
    run_id: str
    failed_gates: list[FailedGate] = field(default_factory=list)
    decisions: dict[str, dict[str, object]] = field(default_factory=dict)  # asset -> observed decision metadata
    errors: list[str] = field(default_factory=list)  # step failures that no failed gate explains
    materialized: set[str] = field(default_factory=set)  # assets this run materialized

    @property
    def status(self) -> str:
        """ok, gated (a gate check failed: a verdict on a materialized asset) or failed (a real failure)."""
        return "failed" if self.errors else "gated" if self.failed_gates else "ok"


# Engine notes that only restate a decision already logged (no adapter: no adapter outputs).
_ENGINE_NOTES = ("op 'lora_adapter' did not yield or return expected outputs",)


class _ProgressOnly(logging.Filter):
    """Keep what the assets log (progress, decisions); drop Dagster's own event records (and their tracebacks),
    which stay in the instance for `dagster dev`."""

    def filter(self, record: logging.LogRecord) -> bool:
        meta = getattr(record, LOG_RECORD_METADATA_ATTR, None) or {}
        if meta.get("dagster_event") is not None or str(meta.get("orig_message", "")).startswith(_ENGINE_NOTES):
            return False
        record.msg, record.args = meta.get("orig_message", record.getMessage()), ()
        return True


@dg.logger(description="Console lines for the command line: the assets' own messages, no event noise.")
def progress_logger(init_context: dg.InitLoggerContext) -> logging.Logger:
    logger = logging.getLogger("mondrian_assets.progress")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.addFilter(_ProgressOnly())
        handler.setFormatter(logging.Formatter("%(asctime)s  %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    return logger


def console_job(name: str) -> dg.JobDefinition:
    """Job `name` with the progress logger (for `run_job`: rebuilt by name in the run's process)."""
    return defs.resolve_job_def(name).with_logger_defs({"progress": progress_logger})


def run_job(name: str, instance: dg.DagsterInstance, partition_key: str | None = None) -> RunOutcome:
    """Run `name` in this process with the progress logger on the console; the instance keeps every event.

    The job's own executor runs it (as for a launch from the UI): the run records its worker, the instance is
    repaired first (runs whose worker died here are failed and their slots freed), a step blocked by a pool
    limit sleeps."""
    warnings.filterwarnings("ignore", category=dg.BetaWarning)
    # An advisor with too little data yields no adapter and so no adapter checks: Dagster says so per check,
    # though what they would gate is skipped anyway.
    logging.getLogger("dagster._core.execution.plan.active").setLevel(logging.ERROR)
    for line in repair_instance(instance):  # the executor would too, but its engine events stay off the console
        print(line, flush=True)
    job = dg.build_reconstructable_job(__name__, console_job.__name__, reconstructable_args=(name,))
    tags = {"dagster/partition": partition_key} if partition_key else {}
    with dg.execute_job(job, instance, run_config={"loggers": {"progress": {}}}, tags=tags,
                        raise_on_error=False) as result:  # fmt: skip
        run_id = result.run_id
    return read_outcome(instance, run_id)


def read_outcome(instance: dg.DagsterInstance, run_id: str) -> RunOutcome:
    """What a finished run decided, from the events it stored in the instance."""
    kinds = {
        dg.DagsterEventType.ASSET_CHECK_EVALUATION,
        dg.DagsterEventType.ASSET_OBSERVATION,
        dg.DagsterEventType.STEP_FAILURE,
        dg.DagsterEventType.ASSET_MATERIALIZATION,
    }
    gates, decisions, failures, materialized, gated_steps = [], {}, [], set(), set()
    for entry in instance.all_logs(run_id, of_type=kinds):
        event = entry.dagster_event
        if event is None:
            continue
        if event.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION:
            check = event.asset_check_evaluation_data
            if not check.passed:  # blocking or not (eval_report's gates inform deployed_version), a verdict
                stops = bool(check.blocking) and check.severity == dg.AssetCheckSeverity.ERROR
                asset = check.asset_key.to_user_string()
                gates.append(FailedGate(asset, check.check_name, _message(check.metadata), stops))
                gated_steps.add(event.step_key)  # the step that ran it: advisor_splits for train_split's checks
        elif event.event_type == dg.DagsterEventType.ASSET_OBSERVATION:
            observation = event.asset_observation_data.asset_observation
            if "decision" in observation.metadata:
                decisions[observation.asset_key.to_user_string()] = {k: v.value for k, v in observation.metadata.items()}
        elif event.event_type == dg.DagsterEventType.ASSET_MATERIALIZATION:
            materialized.add(event.asset_key.to_user_string())
        else:
            error = event.step_failure_data.error
            failures.append((event.step_key, error.message.strip() if error else "see the run log"))
    errors = [f"{step}: {message}" for step, message in failures if step not in gated_steps]
    return RunOutcome(run_id, gates, decisions, errors, materialized)


def _message(metadata: dict) -> str:
    value = metadata.get("message")
    return str(value.value) if value is not None else ""
