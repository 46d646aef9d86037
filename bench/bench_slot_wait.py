"""What a step costs while it waits for an `mlx` slot: CPU-seconds per wall-second of the waiting run's process,
under Dagster's multiprocess executor (its default), its in-process executor, and ours
(`mondrian_assets/defs/executor.py`), side by side in one run.

    .venv/bin/python bench/bench_slot_wait.py [--seconds 10]

A live run (this process) holds the pool's only slot; each executor in turn runs a one-step job whose step is in
the pool, in a process of its own. Once its step is queued for the slot, the process's CPU time is sampled over
`--seconds` from /proc (Linux), then the process is stopped.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dagster as dg
from dagster._core.test_utils import create_run_for_test

from mondrian_assets.defs.executor import repairing_in_process_executor
from mondrian_assets.defs.run_workers import MLX_POOL, WORKER_TAG, worker_tags
from mondrian_assets.project_instance import INSTANCE_TEMPLATE

EXECUTORS = {"dagster multiprocess": dg.multiprocess_executor, "dagster in_process": dg.in_process_executor,
             "ours": repairing_in_process_executor}  # fmt: skip


@dg.op(pool=MLX_POOL)
def waiting_step() -> None:
    pass


def waiting_job(executor: str) -> dg.JobDefinition:
    return dg.GraphDefinition(name="waiting", node_defs=[waiting_step]).to_job(executor_def=EXECUTORS[executor])


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _waiting(instance: dg.DagsterInstance) -> list:
    """Steps queued for a slot (the holder's own entry is assigned)."""
    pending = instance.event_log_storage.get_concurrency_info(MLX_POOL).pending_steps
    return [p for p in pending if not p.assigned_timestamp]


def _measure(instance: dg.DagsterInstance, executor: str, seconds: float, env: dict) -> float:
    code = ("import sys, dagster as dg; sys.path.insert(0, sys.argv[2]); import bench_slot_wait as b; "
            "dg.execute_job(dg.build_reconstructable_job('bench_slot_wait', 'waiting_job', (sys.argv[1],)), "
            "dg.DagsterInstance.get())")  # fmt: skip
    child = subprocess.Popen([sys.executable, "-c", code, executor, str(Path(__file__).parent)], env=env)
    try:
        deadline = time.monotonic() + 120
        while not _waiting(instance):
            if child.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{executor}: the step never queued for the slot")
            time.sleep(0.2)
        time.sleep(1.0)  # past the first claim attempts
        before, start = _cpu_seconds(child.pid), time.monotonic()
        time.sleep(seconds)
        return (_cpu_seconds(child.pid) - before) / (time.monotonic() - start)
    finally:
        child.kill()
        child.wait()
        for info in _waiting(instance):
            instance.event_log_storage.free_concurrency_slots_for_run(info.run_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="wall seconds sampled per executor (default 10)")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="bench-slot-wait-"))
    try:
        # the project's settings, without per-step log capture (its `tail` processes outlive a killed run)
        no_capture = "\ncompute_logs:\n  module: dagster._core.storage.noop_compute_log_manager\n"
        (home / "dagster.yaml").write_text(INSTANCE_TEMPLATE.read_text() + no_capture + "  class: NoOpComputeLogManager\n")
        env = {**os.environ, "DAGSTER_HOME": str(home)}
        os.environ["DAGSTER_HOME"] = str(home)
        with dg.DagsterInstance.get() as instance:
            holder = create_run_for_test(instance, job_name="train_job", status=dg.DagsterRunStatus.STARTED,
                                         tags={WORKER_TAG: worker_tags()[WORKER_TAG]})  # fmt: skip
            instance.event_log_storage.initialize_concurrency_limit_to_default(MLX_POOL)
            assert instance.event_log_storage.claim_concurrency_slot(MLX_POOL, holder.run_id, "lora_adapter").is_claimed
            rates = {name: _measure(instance, name, args.seconds, env) for name in EXECUTORS}
    finally:
        shutil.rmtree(home, ignore_errors=True)
    print(f"CPU-seconds per wall-second of a run whose step waits for an {MLX_POOL} slot ({args.seconds:.0f} s each):")
    for name, rate in rates.items():
        print(f"  {name:22s} {rate:6.3f}")
    ours = max(rates["ours"], 1e-3)
    print(f"ratio dagster multiprocess / ours: {rates['dagster multiprocess'] / ours:.0f}x; "
          f"dagster in_process / ours: {rates['dagster in_process'] / ours:.0f}x")


if __name__ == "__main__":
    main()
