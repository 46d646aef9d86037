"""Run an MLX task (training, evaluation, the adapter reload check) in a child Python process.

MLX runs native code that can die outright (a segfault, an abort in Metal, the OOM killer's SIGKILL); in a child,
that fails the one task with a clear message and leaves the caller (the Dagster step process, the CLI) alive.

    result = run_in_child(train_lora, {"config": ..., ...}, what="training", report_to="on_report", on_report=log)

The function must be importable by name (module-level); its keyword arguments and its result travel pickled
through files only this user can read. `report_to` names the function's progress callback: the child streams each
report back to `on_report` as it comes. Exceptions of the `expected` types are raised again in the caller as
themselves (a bad setting is a decision to report, not a crash); anything else raises `failure` with the exit
code or signal and the tail of the child's stderr.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

PROTOCOL_PREFIX = "@@mondrian-child@@ "
# Fault injection for the kill tests: "<function name>:<step>:<marker file>" (see `child_worker`).
CRASH_ENV = "MONDRIAN_CHILD_CRASH_AT"
_STDERR_TAIL_LINES = 60

T = TypeVar("T")


class ChildProcessFailed(RuntimeError):
    """The child process died (a crash, a signal) or raised an error that is not one of the expected ones."""

    def __init__(self, message: str, *, returncode: int | None = None, stderr_tail: str = "") -> None:
        super().__init__(message)
        self.returncode = returncode
        self.stderr_tail = stderr_tail


def crash_once_at(function: Callable[..., Any], step: int, marker: Path) -> dict[str, str]:
    """The environment that makes the first child running `function` die by SIGKILL at its report `step`
    (the report's own "step", or its ordinal for reports without one; 0: before the function starts); `marker`
    lets every later attempt live."""
    return {CRASH_ENV: f"{function.__qualname__}:{step}:{marker}"}


def run_in_child(
    function: Callable[..., T],
    kwargs: dict[str, Any],
    *,
    what: str,
    report_to: str | None = None,
    on_report: Callable[[Any], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    env: dict[str, str] | None = None,
    expected: tuple[type[Exception], ...] = (),
    failure: type[ChildProcessFailed] = ChildProcessFailed,
) -> T:
    """`function(**kwargs)` in a child process; see the module docstring. `on_start` receives the child's pid;
    if the caller is interrupted, the child is terminated."""
    with tempfile.TemporaryDirectory(prefix="mondrian-child-") as scratch:
        request, result_path = Path(scratch) / "request.pkl", Path(scratch) / "result.pkl"
        request.write_bytes(pickle.dumps({"function": function, "kwargs": kwargs, "report_to": report_to,
                                          "result": str(result_path)}))  # fmt: skip
        # stdin is a pipe only this process writes to: when this process dies, even by SIGKILL, the child reads
        # end-of-file and exits (`child_worker`), so no orphan goes on training beside the run that resumes it
        child = subprocess.Popen(
            [sys.executable, "-m", "mondrian_assets.core.child_worker", str(request)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1, env={**os.environ, **(env or {})},
        )  # fmt: skip
        stderr_tail: deque[str] = deque(maxlen=_STDERR_TAIL_LINES)
        drain = threading.Thread(target=lambda: stderr_tail.extend(child.stderr or ()), daemon=True)
        drain.start()
        done, error = False, None
        try:
            if on_start is not None:
                on_start(child.pid)
            for message in _protocol_messages(child.stdout):
                if message["type"] == "report" and on_report is not None:
                    on_report(message["report"])
                elif message["type"] == "result":
                    done = True
                elif message["type"] == "error":
                    error = message
            returncode = child.wait()
        except BaseException:
            _stop(child)
            raise
        finally:
            drain.join(timeout=5)
            child.stdin.close()
        tail = "".join(stderr_tail)
        if error is not None:
            by_name = {f"{kind.__module__}.{kind.__qualname__}": kind for kind in expected}
            for name in error["types"]:  # the most specific expected type the child's exception is
                if name in by_name:
                    raise by_name[name](error["message"])
            raise failure(f"{what} failed: {error['name']}: {error['message']}", returncode=returncode, stderr_tail=tail)
        if returncode != 0 or not done:
            how = (f"was killed by signal {signal.Signals(-returncode).name}" if returncode < 0
                   else f"exited with code {returncode}")  # fmt: skip
            raise failure(f"the {what} process {how}; last stderr lines:\n{tail}", returncode=returncode,
                          stderr_tail=tail)  # fmt: skip
        return pickle.loads(result_path.read_bytes())


def _protocol_messages(stream: Any) -> Iterator[dict]:
    for line in stream:
        if line.startswith(PROTOCOL_PREFIX):
            yield json.loads(line[len(PROTOCOL_PREFIX) :])


def _stop(child: subprocess.Popen) -> None:
    if child.poll() is None:
        child.terminate()
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
