"""The run launcher the project's instance uses: Dagster's default one, plus a worker health check.

Dagster's run monitoring (the daemon, `run_monitoring:` in dagster.yaml) asks the launcher whether a STARTED run's
worker is still there; the default launcher cannot say, so a run killed outright stays STARTED and keeps its
slots. This one answers from the worker every run records (`run_workers.WORKER_TAG`): gone from this host is
FAILED (the daemon then marks the run failed, frees its slots and, with `run_retries`, launches a retry that
resumes from the last checkpoint). A live worker, one on another host or none recorded yet is RUNNING: only the
host that ran it can tell.
"""

from __future__ import annotations

import dagster as dg
from dagster._core.launcher.base import CheckRunHealthResult, WorkerStatus

from mondrian_assets.defs.run_workers import dead_worker_reason


class WorkerCheckingRunLauncher(dg.DefaultRunLauncher):
    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: dg.DagsterRun) -> CheckRunHealthResult:
        reason = dead_worker_reason(run)
        if reason is not None:
            return CheckRunHealthResult(WorkerStatus.FAILED, reason)
        return CheckRunHealthResult(WorkerStatus.RUNNING)
