"""The executor every job of this code location runs with: Dagster's in-process executor, with three changes.

- The run records its worker (`run_workers.WORKER_TAG`) before its first step, so a later launch or the daemon's
  run monitoring can tell a dead run from a live one.
- Before its first step it repairs the instance (`run_workers.repair_instance`): runs whose worker died on this
  host are marked failed and their slots freed, so this run does not wait forever behind them.
- A step blocked by a pool limit sleeps until its next claim check. Dagster 1.13 computes that wait as
  `min(0, ...)`, so a blocked step polls without pause and holds a whole core (the multiprocess executor's loop
  has no pause at all); `bench/bench_slot_wait.py` measures both.

In process, not one process per step: our steps run in order (one advisor's chain), and every MLX task already
runs in a child process of its own (`core/isolation.py`), so a crash there fails one step, not the run.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import dagster as dg
from dagster._core.events import DagsterEvent, EngineEventData
from dagster._core.execution.api import ExecuteRunWithPlanIterable
from dagster._core.execution.context.system import PlanExecutionContext, PlanOrchestrationContext
from dagster._core.execution.context_creation_job import PlanExecutionContextManager
from dagster._core.execution.plan.execute_plan import inner_plan_execution_iterator
from dagster._core.execution.plan.instance_concurrency_context import InstanceConcurrencyContext
from dagster._core.execution.plan.plan import ExecutionPlan
from dagster._core.execution.retries import RetryMode
from dagster._core.executor.in_process import InProcessExecutor

from mondrian_assets.defs.run_workers import repair_instance, worker_tags

# A blocked step re-checks its pool at least this often, so a slot freed by the run ahead is taken promptly.
MAX_CLAIM_WAIT_S = 5.0
# While blocked, the instance is repaired this often: the run holding the slot may die while this one waits.
REPAIR_EVERY_S = 10.0


class _SleepingConcurrencyContext(InstanceConcurrencyContext):
    def __init__(self, instance: dg.DagsterInstance, dagster_run: dg.DagsterRun) -> None:
        super().__init__(instance, dagster_run)
        self._repaired_at = time.monotonic()
        self.repairs: list[str] = []  # what a repair did, for the run log

    def claim(self, concurrency_key: str, step_key: str, step_priority: int = 0) -> bool:
        claimed = super().claim(concurrency_key, step_key, step_priority)
        if not claimed and time.monotonic() - self._repaired_at >= REPAIR_EVERY_S:
            self._repaired_at = time.monotonic()
            self.repairs += repair_instance(self._instance)
        return claimed

    def interval_to_next_pending_claim_check(self) -> float:
        due = [at for step, at in self._pending_timeouts.items() if step in self._pending_claims]
        if not due:
            return 0.0
        return min(MAX_CLAIM_WAIT_S, max(0.0, min(due) - time.time()))


def _steps(
    job_context: PlanExecutionContext,
    execution_plan: ExecutionPlan,
    instance_concurrency_context: InstanceConcurrencyContext | None = None,  # Dagster's signature; ours is made here
) -> Iterator[DagsterEvent]:
    with _SleepingConcurrencyContext(job_context.instance, job_context.dagster_run) as concurrency:
        for event in inner_plan_execution_iterator(job_context, execution_plan, concurrency):
            yield event
            while concurrency.repairs:
                yield DagsterEvent.engine_event(job_context, concurrency.repairs.pop(0), EngineEventData())


class RepairingInProcessExecutor(InProcessExecutor):
    def execute(self, plan_context: PlanOrchestrationContext, execution_plan: ExecutionPlan) -> Iterator[DagsterEvent]:
        instance, run = plan_context.instance, plan_context.dagster_run
        instance.add_run_tags(run.run_id, worker_tags())
        yield DagsterEvent.engine_event(
            plan_context, f"Executing steps in process (pid: {os.getpid()})",
            event_specific_data=EngineEventData.in_process(os.getpid(), execution_plan.step_keys_to_execute),
        )  # fmt: skip
        for line in repair_instance(instance):
            yield DagsterEvent.engine_event(plan_context, line, EngineEventData())
        yield from ExecuteRunWithPlanIterable(
            execution_plan=plan_context.execution_plan,
            iterator=_steps,
            execution_context_manager=PlanExecutionContextManager(
                job=plan_context.job, retry_mode=plan_context.retry_mode, execution_plan=plan_context.execution_plan,
                run_config=plan_context.run_config, dagster_run=plan_context.dagster_run, instance=instance,
                raise_on_error=plan_context.raise_on_error, output_capture=plan_context.output_capture,
                step_dependency_config=self.step_dependency_config,
            ),
        )  # fmt: skip


@dg.executor(name="in_process_repairing")
def repairing_in_process_executor(_init_context: dg.InitExecutorContext) -> RepairingInProcessExecutor:
    """Steps in the run's own process; dead runs failed and their slots freed first; blocked steps sleep."""
    return RepairingInProcessExecutor(retries=RetryMode.ENABLED)
