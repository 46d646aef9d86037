"""Child-process entry point for `isolation.run_training_subprocess`.

    python -m mondrian_assets.core.training.worker request.json

Protocol lines (`PROTOCOL_PREFIX` + JSON) go to the original stdout: `{"type": "report", "report": {...}}` per
report, then `{"type": "result", "result": {...}}` or `{"type": "error", "kind": ..., "message": ...}`. Anything else
that writes to stdout (libraries, C code) is redirected to stderr, so it cannot corrupt the protocol.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from pathlib import Path

from mondrian_assets.core.training.config import TrainConfig, TrainingConfigError
from mondrian_assets.core.training.isolation import PROTOCOL_PREFIX
from mondrian_assets.core.training.loop import train_lora


CRASH_AFTER_STEP_ENV = "MONDRIAN_TRAIN_CRASH_AFTER_STEP"


def _die_once_after(step: int, marker: Path, report: dict) -> None:
    """Fault injection for resume tests (`CRASH_AFTER_STEP_ENV="<step>:<marker file>"`): the first worker to report
    `step` or later is killed as the OOM killer would kill it; the marker file lets every later attempt live."""
    if report.get("step", 0) >= step and not marker.exists():
        marker.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)


def main(argv: list[str]) -> int:
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1, encoding="utf-8")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())

    def send(message: dict) -> None:
        protocol.write(PROTOCOL_PREFIX + json.dumps(message) + "\n")
        protocol.flush()

    request = json.loads(Path(argv[1]).read_text())
    crash = os.environ.get(CRASH_AFTER_STEP_ENV)

    def report(report: dict) -> None:
        if crash:
            step, marker = crash.split(":", 1)
            _die_once_after(int(step), Path(marker), report)
        send({"type": "report", "report": report})

    try:
        result = train_lora(
            TrainConfig.from_dict(request["config"]),
            Path(request["train_jsonl"]),
            Path(request["val_jsonl"]) if request.get("val_jsonl") else None,
            Path(request["out_dir"]),
            data_version=request["data_version"],
            on_report=report,
            keep_checkpoints=request.get("keep_checkpoints", False),
        )
    except TrainingConfigError as exc:
        send({"type": "error", "kind": "config", "message": str(exc)})
        return 2
    except Exception as exc:
        traceback.print_exc()
        send({"type": "error", "kind": "exception", "message": f"{type(exc).__name__}: {exc}"})
        return 1
    send({"type": "result", "result": result.to_dict()})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
