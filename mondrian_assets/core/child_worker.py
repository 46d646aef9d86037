"""Child-process entry point for `isolation.run_in_child`.

    python -m mondrian_assets.core.child_worker request.pkl

Protocol lines (`PROTOCOL_PREFIX` + JSON) go to the original stdout: `{"type": "report", "report": ...}` per
report, then `{"type": "result"}` once the result is pickled to the request's result file, or
`{"type": "error", "types": [...], "message": ...}`. Anything else that writes to stdout (libraries, C code) is
redirected to stderr, so it cannot corrupt the protocol.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

from mondrian_assets.core.atomic import write_bytes
from mondrian_assets.core.isolation import CRASH_ENV, PROTOCOL_PREFIX


def _crash_point(function_name: str) -> tuple[int, Path] | None:
    """From `CRASH_ENV` (`isolation.crash_once_at`): the step at which this child dies, if it is the one."""
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return None
    name, step, marker = spec.split(":", 2)
    return (int(step), Path(marker)) if name == function_name else None


def _exit_with_parent() -> None:
    """End this process when the parent goes away: it holds the only write end of our stdin, so end-of-file
    there means it exited or was killed (`run_in_child` closes it only after we have exited)."""

    def watch() -> None:
        stdin = sys.stdin.fileno()
        while os.read(stdin, 4096):  # the raw fd: a buffered reader's lock would abort the interpreter's exit
            pass
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def main(argv: list[str]) -> int:
    _exit_with_parent()
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1, encoding="utf-8")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())

    def send(message: dict) -> None:
        protocol.write(PROTOCOL_PREFIX + json.dumps(message) + "\n")
        protocol.flush()

    request = pickle.loads(Path(argv[1]).read_bytes())
    function = request["function"]
    crash = _crash_point(function.__qualname__)
    sent = 0

    def die_at(step: int) -> None:
        if crash is not None and step >= crash[0] and not crash[1].exists():
            crash[1].write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer would: no cleanup, no last words

    def report(value: Any) -> None:
        nonlocal sent
        sent += 1
        die_at(value.get("step", sent) if isinstance(value, dict) else sent)
        send({"type": "report", "report": value})

    die_at(0)  # step 0: before the function starts
    kwargs = dict(request["kwargs"])
    if request["report_to"]:
        kwargs[request["report_to"]] = report
    try:
        result = function(**kwargs)
    except Exception as exc:
        traceback.print_exc()
        types = [f"{t.__module__}.{t.__qualname__}" for t in type(exc).__mro__]
        send({"type": "error", "types": types, "name": type(exc).__name__, "message": str(exc)})
        return 1
    write_bytes(Path(request["result"]), pickle.dumps(result))
    send({"type": "result"})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
