"""`train_lora` in a child process (`training.worker`), so an MLX crash cannot take the caller down."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mondrian_assets.core.training.config import ReportFn, TrainConfig, TrainingConfigError, TrainingFailed, TrainResult

PROTOCOL_PREFIX = "@@mondrian-train@@ "
_STDERR_TAIL_LINES = 60


def run_training_subprocess(
    config: TrainConfig,
    train_jsonl: Path,
    val_jsonl: Path | None,
    out_dir: Path,
    *,
    data_version: str,
    on_report: ReportFn | None = None,
    on_start: Callable[[int], None] | None = None,
    env: dict[str, str] | None = None,
    keep_checkpoints: bool = False,
) -> TrainResult:
    """`train_lora` in a child Python process; its reports stream back to `on_report`.

    A crash of the child (a segfault in MLX, the OOM killer, an exception) raises TrainingFailed with its exit
    code or signal and the tail of its stderr; the caller's process is untouched. `on_start` receives the child's
    pid. If the caller is interrupted, the child is terminated. `keep_checkpoints`: see `loop.train_lora`.
    """
    request = {
        "config": config.to_dict(),
        "train_jsonl": str(train_jsonl),
        "val_jsonl": str(val_jsonl) if val_jsonl is not None else None,
        "out_dir": str(out_dir),
        "data_version": data_version,
        "keep_checkpoints": keep_checkpoints,
    }
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="mondrian-train-", delete=False) as f:
        json.dump(request, f)
        request_path = f.name
    child = subprocess.Popen(
        [sys.executable, "-m", "mondrian_assets.core.training.worker", request_path],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
        env={**os.environ, **(env or {})},
    )
    stderr_tail: deque[str] = deque(maxlen=_STDERR_TAIL_LINES)
    drain = threading.Thread(target=lambda: stderr_tail.extend(child.stderr or ()), daemon=True)
    drain.start()
    result: dict | None = None
    error: dict | None = None
    try:
        if on_start is not None:
            on_start(child.pid)
        for message in _protocol_messages(child.stdout):
            if message["type"] == "report" and on_report is not None:
                on_report(message["report"])
            elif message["type"] == "result":
                result = message["result"]
            elif message["type"] == "error":
                error = message
        returncode = child.wait()
    except BaseException:
        _stop(child)
        raise
    finally:
        drain.join(timeout=5)
        os.unlink(request_path)
    tail = "".join(stderr_tail)
    if error is not None:
        exc_type = TrainingConfigError if error.get("kind") == "config" else TrainingFailed
        if exc_type is TrainingConfigError:
            raise TrainingConfigError(error["message"])
        raise TrainingFailed(f"training failed: {error['message']}", returncode=returncode, stderr_tail=tail)
    if returncode != 0 or result is None:
        if returncode < 0:
            how = f"was killed by signal {signal.Signals(-returncode).name}"
        else:
            how = f"exited with code {returncode}"
        raise TrainingFailed(
            f"the training process {how}; last stderr lines:\n{tail}", returncode=returncode, stderr_tail=tail
        )
    return TrainResult(**result)


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
