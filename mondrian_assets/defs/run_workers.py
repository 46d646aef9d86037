"""Who runs each run, and what becomes of runs whose process died without a word.

A run killed outright (`kill -9`, the OOM killer, power loss, a closed lid) stays STARTED in the instance and keeps
its slot in the `mlx` pool, so every later MLX step waits forever. Every run of this project records its worker
(`WORKER_TAG`: host, pid and the pid's start time) when it starts executing; `repair_instance`, called before
every launch that runs here (the executor, the command line) and by `status`, marks the runs whose worker is gone
from this host as failed and frees their slots. A live run, a run on another host and a run that recorded no
worker are never touched. The daemon path is the run launcher's health check (`run_launcher.py`), which reads the
same tag for Dagster's own run monitoring.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
from dagster._core.storage.tags import MAX_RETRIES_TAG

from mondrian_assets.core import atomic
from mondrian_assets.core.processes import Liveness, ProcessIdentity

WORKER_TAG = "mondrian/run_worker"
MLX_POOL = "mlx"  # the MLX steps' concurrency pool: its limit (1 in the project's dagster.yaml) is MLX jobs per machine
# What `lend_pool_slots` changed, kept in the instance's folder until it is given back (so a killed lender's
# change is undone by the next start).
LENT_SLOTS_FILE = "mondrian-lent-slots.json"
_WATCHED = (dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING)


def worker_tags() -> dict[str, str]:
    """The tag that names this process as a run's worker."""
    return {WORKER_TAG: ProcessIdentity.current().to_text()}


def run_worker(run: dg.DagsterRun) -> ProcessIdentity | None:
    text = run.tags.get(WORKER_TAG)
    return ProcessIdentity.from_text(text) if text else None


def dead_worker_reason(run: dg.DagsterRun) -> str | None:
    """Why `run`'s worker is known to be gone, or None (alive, elsewhere, or never recorded: then nobody here can
    tell, and nothing is done)."""
    worker = run_worker(run)
    if worker is None or worker.liveness() is not Liveness.DEAD:
        return None
    return (f"its worker process ({worker.describe()}) is gone: it was killed or crashed without reporting; marked "
            "failed so that its concurrency slots are free (a new run resumes from the last checkpoint)")


@dataclass(frozen=True)
class PoolHolder:
    run_id: str
    step_key: str
    state: str  # "running (pid N on host)", "worker gone", "run FAILURE", ...
    claimed: bool  # a slot held, or only a place in the queue for one


def pool_holders(instance: dg.DagsterInstance, pool: str = MLX_POOL) -> list[PoolHolder]:
    """Every run holding a slot of `pool` or waiting for one, with what is known of its worker."""
    info = instance.event_log_storage.get_concurrency_info(pool)
    entries = [(s.run_id, s.step_key, True) for s in info.claimed_slots]
    entries += [(p.run_id, p.step_key, False) for p in info.pending_steps if p.assigned_timestamp is None]
    holders = []
    for run_id, step_key, claimed in entries:
        holders.append(PoolHolder(run_id, step_key, _run_state(instance.get_run_by_id(run_id)), claimed))
    return holders


def _run_state(run: dg.DagsterRun | None) -> str:
    if run is None:
        return "run deleted"
    if run.status not in _WATCHED:
        return f"run {run.status.value}"
    worker = run_worker(run)
    if worker is None:
        return f"run {run.status.value}, worker not recorded"
    liveness = worker.liveness()
    return {Liveness.ALIVE: f"running ({worker.describe()})", Liveness.DEAD: f"worker gone ({worker.describe()})",
            Liveness.ELSEWHERE: f"running elsewhere ({worker.describe()})"}[liveness]  # fmt: skip


def repair_instance(instance: dg.DagsterInstance) -> list[str]:
    """Fail the runs whose worker died here, free the slots of runs that ended, give back slots a dead demo lent;
    one line for each thing done."""
    done = []
    for record in instance.get_run_records(dg.RunsFilter(statuses=list(_WATCHED))):
        run = record.dagster_run
        reason = dead_worker_reason(run)
        if reason is None:
            continue
        fresh = instance.get_run_by_id(run.run_id)
        if fresh is None or fresh.status not in _WATCHED:  # someone (run monitoring) got there first
            continue
        # the launch that found it resumes the work; a daemon retry of the dead run would only repeat it
        instance.add_run_tags(run.run_id, {MAX_RETRIES_TAG: "0"})
        instance.report_run_failed(fresh, f"Run {run.run_id} failed: {reason}.")
        done.append(f"marked run {run.run_id[:8]} ({_what(run)}) failed: {reason}")
    storage = instance.event_log_storage
    if storage.supports_global_concurrency_limits:
        for run_id in sorted(storage.get_concurrency_run_ids()):
            run = instance.get_run_by_id(run_id)
            if run is None or run.is_finished:
                storage.free_concurrency_slots_for_run(run_id)
                state = "deleted" if run is None else f"ended ({run.status.value})"
                done.append(f"freed the concurrency slots of run {run_id[:8]}, which has {state}")
    if line := _return_lent_slots(instance):
        done.append(line)
    return done


def _what(run: dg.DagsterRun) -> str:
    partition = run.tags.get("dagster/partition")
    return f"{run.job_name}, {partition}" if partition else run.job_name


def _lent_file(instance: dg.DagsterInstance) -> Path | None:
    root = getattr(instance, "root_directory", None)
    return Path(root) / LENT_SLOTS_FILE if root else None


def lend_pool_slots(instance: dg.DagsterInstance, pool: str, slots: int) -> bool:
    """Raise `pool` to `slots` for this process's work, recorded first so that the change outlives no crash;
    False (nothing changed) when someone set the pool's limit (anything but the instance's default)."""
    storage = instance.event_log_storage
    record = _lent_file(instance)
    if record is None or not storage.get_concurrency_info(pool).using_default_limit:
        return False
    lender = ProcessIdentity.current().to_text()
    atomic.write_text(record, json.dumps({"pool": pool, "slots": slots, "lender": lender}))
    storage.set_concurrency_slots(pool, slots)
    return True


def return_pool_slots(instance: dg.DagsterInstance, pool: str) -> None:
    """Undo `lend_pool_slots`: the pool back at the instance's default."""
    instance.event_log_storage.delete_concurrency_limit(pool)
    if record := _lent_file(instance):
        record.unlink(missing_ok=True)


def _return_lent_slots(instance: dg.DagsterInstance) -> str | None:
    record = _lent_file(instance)
    if record is None or not record.is_file():
        return None
    try:
        lent = json.loads(record.read_text())
        pool, slots, lender = lent["pool"], int(lent["slots"]), ProcessIdentity.from_text(lent["lender"])
    except (OSError, ValueError, KeyError, TypeError):
        record.unlink(missing_ok=True)
        return f"removed an unreadable record of lent slots ({record})"
    if lender is not None and lender.liveness() is not Liveness.DEAD:
        return None  # still lending, or lent from another host sharing this folder
    info = instance.event_log_storage.get_concurrency_info(pool)
    if info.limit == slots and not info.using_default_limit:
        return_pool_slots(instance, pool)
        return (f"gave back the {slots} {pool} slots that {lender.describe() if lender else 'a process'} lent "
                f"and did not return (killed): pool {pool} is at the instance's default again")  # fmt: skip
    record.unlink(missing_ok=True)  # someone set another limit since: theirs stands
    return None
