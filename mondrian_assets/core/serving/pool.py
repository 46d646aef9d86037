"""A fixed set of generation worker processes behind a bounded wait queue.

- A request takes an idle worker, or waits in a queue of at most `max_waiting`; beyond that it is refused at once
  (`PoolSaturated`, the service's 503) instead of piling up behind a 300 s client timeout.
- A worker that dies mid-job (any signal, any exit) fails that job with the cause (`WorkerDied`) and is replaced
  in the background; one that overruns `job_timeout_s` is killed and replaced (`WorkerTimeout`).
- `begin_shutdown` refuses new work and fails the queued requests explicitly (`PoolClosed`); jobs already
  running finish; `close` then stops the workers.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import multiprocessing
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from mondrian_assets.core.serving.worker import Job, JobResult, WorkerSpec, worker_main


class PoolSaturated(RuntimeError):
    """Every worker is busy and the wait queue is full."""


class PoolClosed(RuntimeError):
    """The service is shutting down, or no worker could start."""


class WorkerDied(RuntimeError):
    """The worker process ended while it held a job."""


class WorkerTimeout(RuntimeError):
    """The job ran past its time limit; the worker was killed."""


class JobFailed(RuntimeError):
    """The worker answered, with an error (a bad adapter, a failed load, a generation error)."""


def _exit_cause(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


class Worker:
    """One child process and its pipe; blocking calls, run from threads by the pool."""

    _ids = iter(range(1, 1 << 30))

    def __init__(self, spec: WorkerSpec):
        context = multiprocessing.get_context("spawn")  # never fork a process that may hold MLX / Metal state
        self.id = next(Worker._ids)
        self._conn, child = context.Pipe()
        self.process = context.Process(target=worker_main, args=(child, spec), name=f"mondrian-worker-{self.id}")
        self.process.daemon = True
        self.process.start()
        child.close()
        self.info: dict[str, Any] = {}

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def wait_ready(self, timeout_s: float) -> None:
        if not self._conn.poll(timeout_s):
            self.kill()
            raise WorkerTimeout(f"worker {self.id} did not load within {timeout_s:.0f} s")
        try:
            message = self._conn.recv()
        except EOFError:
            raise WorkerDied(f"worker {self.id} {self._exit_cause()} while loading") from None
        if not message.get("ready"):
            self.kill()
            raise JobFailed(f"worker {self.id} could not load the model: {message.get('error')}")
        self.info = message

    def call(self, job: Job, timeout_s: float) -> JobResult:
        try:
            self._conn.send(job)
        except (BrokenPipeError, ConnectionResetError):
            raise WorkerDied(f"generation worker {self.id} (pid {self.pid}) {self._exit_cause()}") from None
        if not self._conn.poll(timeout_s):
            self.kill()
            raise WorkerTimeout(f"generation ran past {timeout_s:.0f} s; worker {self.id} was stopped")
        try:
            message = self._conn.recv()
        except (EOFError, ConnectionResetError):
            raise WorkerDied(f"generation worker {self.id} (pid {self.pid}) {self._exit_cause()}") from None
        if not message["ok"]:
            raise JobFailed(message["error"])
        return JobResult(**message["result"])

    def _exit_cause(self) -> str:
        self.process.join(timeout=5)
        return _exit_cause(self.process.exitcode)

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5)

    def stop(self, timeout_s: float) -> None:
        try:
            self._conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        self.process.join(timeout=timeout_s)
        self.kill()
        self._conn.close()


@dataclass
class PoolStatus:
    size: int
    ready: int
    busy: int
    starting: int
    waiting: int
    max_waiting: int
    closing: bool
    load_error: str | None
    restarts: int
    worker_pids: list[int] = field(default_factory=list)
    device: str | None = None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class WorkerPool:
    def __init__(self, spec: WorkerSpec, *, size: int = 1, max_waiting: int = 4, job_timeout_s: float = 300.0,
                 load_timeout_s: float = 600.0):  # fmt: skip
        if size < 1:
            raise ValueError("the pool needs at least one worker")
        self.spec = spec
        self.size = size
        self.max_waiting = max_waiting
        self.job_timeout_s = job_timeout_s
        self.load_timeout_s = load_timeout_s
        self._idle: collections.deque[Worker] = collections.deque()
        self._busy: set[Worker] = set()
        self._starting = 0
        self._waiters: collections.deque[asyncio.Future[Worker]] = collections.deque()
        self._closing = False
        self._load_error: str | None = None
        self._restarts = 0
        self._tasks: set[asyncio.Task] = set()

    # --- life cycle ---

    async def start(self) -> None:
        """Start every worker in the background; requests wait (within the queue bound) until one is ready."""
        for _ in range(self.size):
            self._spawn_in_background()

    def _spawn_in_background(self) -> None:
        self._starting += 1
        task = asyncio.get_running_loop().create_task(self._spawn())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _spawn(self) -> None:
        try:
            worker = await asyncio.to_thread(self._start_worker)
        except (WorkerDied, WorkerTimeout, JobFailed) as exc:
            self._starting -= 1
            self._load_error = str(exc)
            if not self._idle and not self._busy and not self._starting:
                self._fail_waiters(PoolClosed(f"no generation worker could start: {exc}"))
            return
        self._starting -= 1
        self._load_error = None
        if self._closing:
            await asyncio.to_thread(worker.stop, 5.0)
            return
        self._release(worker)

    def _start_worker(self) -> Worker:
        worker = Worker(self.spec)
        worker.wait_ready(self.load_timeout_s)
        return worker

    def begin_shutdown(self) -> None:
        """Refuse new requests and fail the queued ones; running jobs go on."""
        self._closing = True
        self._fail_waiters(PoolClosed("the service is shutting down"))

    async def close(self, grace_s: float = 10.0) -> None:
        self.begin_shutdown()
        deadline = time.monotonic() + grace_s
        while self._busy and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        workers = [*self._idle, *self._busy]
        self._idle.clear()
        await asyncio.gather(*(asyncio.to_thread(w.stop, 5.0) for w in workers))
        for task in list(self._tasks):
            task.cancel()

    # --- requests ---

    async def run(self, job: Job) -> JobResult:
        worker = await self._acquire()
        while not worker.process.is_alive():  # died while idle: replace it; this job has not started anywhere
            self._busy.discard(worker)
            self._replace(worker)
            worker = await self._acquire()
        try:
            result = await asyncio.to_thread(worker.call, job, self.job_timeout_s)
        except (WorkerDied, WorkerTimeout):
            self._busy.discard(worker)
            self._replace(worker)
            raise
        except BaseException:
            self._busy.discard(worker)
            self._release(worker)
            raise
        self._busy.discard(worker)
        self._release(worker)
        return result

    def _replace(self, worker: Worker) -> None:
        self._restarts += 1
        worker.kill()
        if not self._closing:
            self._spawn_in_background()

    async def _acquire(self) -> Worker:
        if self._closing:
            raise PoolClosed("the service is shutting down")
        if self._idle:
            worker = self._idle.popleft()
            self._busy.add(worker)
            return worker
        if not self._starting and not self._busy:
            raise PoolClosed(f"no generation worker is running: {self._load_error or 'none started'}")
        if len(self._waiters) >= self.max_waiting:
            raise PoolSaturated(
                f"all {self.size} workers are busy and {len(self._waiters)} requests are waiting; retry later"
            )
        future: asyncio.Future[Worker] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        try:
            worker = await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.exception() is None:
                self._release(future.result())  # handed over just as the request went away
            raise
        finally:
            if future in self._waiters:
                self._waiters.remove(future)
        self._busy.add(worker)
        return worker

    def _release(self, worker: Worker) -> None:
        if self._closing and not self._waiters:
            self._idle.append(worker)  # close() stops it
            return
        while self._waiters:
            future = self._waiters.popleft()
            if not future.done():
                future.set_result(worker)
                return
        self._idle.append(worker)

    def _fail_waiters(self, error: Exception) -> None:
        while self._waiters:
            future = self._waiters.popleft()
            if not future.done():
                future.set_exception(error)

    def status(self) -> PoolStatus:
        workers = [*self._idle, *self._busy]
        device = next((w.info.get("device") for w in workers if w.info), None)
        return PoolStatus(
            size=self.size, ready=len(self._idle), busy=len(self._busy), starting=self._starting,
            waiting=len(self._waiters), max_waiting=self.max_waiting, closing=self._closing,
            load_error=self._load_error, restarts=self._restarts,
            worker_pids=sorted(w.pid for w in workers if w.pid is not None), device=device,
        )  # fmt: skip
