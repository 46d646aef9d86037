"""Which process did a piece of work, and is it still alive: a host, a pid and the pid's start time.

A pid alone is not an identity: after a crash or a reboot the number is handed to some other process. Its start
time is, together with the host: a recorded worker is alive only if a process with that pid runs on this host and
started when the recorded one did.
"""

from __future__ import annotations

import enum
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

# `ps` prints start times to the second; /proc to a clock tick. Two readings of one process agree within this.
_START_TOLERANCE_S = 1.5


class Liveness(enum.Enum):
    ALIVE = "alive"
    DEAD = "dead"  # no such process here any more, or its pid now belongs to a process started later
    ELSEWHERE = "elsewhere"  # recorded on another host: this one cannot tell


@dataclass(frozen=True)
class ProcessIdentity:
    host: str
    pid: int
    started: float  # seconds since the epoch

    @classmethod
    def current(cls) -> ProcessIdentity:
        pid = os.getpid()
        started = process_start_time(pid)
        if started is None:  # unreadable for our own pid: nothing can ever tell this process apart
            raise OSError(f"cannot read the start time of this process ({pid})")
        return cls(socket.gethostname(), pid, started)

    def to_text(self) -> str:
        return f"{self.host}:{self.pid}:{self.started:.2f}"

    @classmethod
    def from_text(cls, text: str) -> ProcessIdentity | None:
        """The identity `to_text` wrote, or None for anything else."""
        host, _, rest = text.rpartition(":")
        host, _, pid = host.rpartition(":")
        try:
            return cls(host, int(pid), float(rest)) if host else None
        except ValueError:
            return None

    def liveness(self) -> Liveness:
        if self.host != socket.gethostname():
            return Liveness.ELSEWHERE
        started = process_start_time(self.pid)
        if started is None or abs(started - self.started) > _START_TOLERANCE_S:
            return Liveness.DEAD
        return Liveness.ALIVE

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}"


def process_start_time(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), or None if there is no such process."""
    if pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # it exists, under another user
        pass
    if sys.platform.startswith("linux"):
        return _linux_start_time(pid)
    return _ps_start_time(pid)


def _linux_start_time(pid: int) -> float | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = next(line for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime "))
    except (OSError, StopIteration):
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after the command name, which may hold spaces
    if fields[0] == "Z":  # a zombie: dead, only not yet reaped
        return None
    return int(boot.split()[1]) + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def _ps_start_time(pid: int) -> float | None:
    out = subprocess.run(["ps", "-o", "lstart=", "-p", str(pid)], capture_output=True, text=True,
                         env={**os.environ, "LC_ALL": "C"})  # fmt: skip
    text = " ".join(out.stdout.split())
    if out.returncode != 0 or not text:
        return None
    return datetime.strptime(text, "%a %b %d %H:%M:%S %Y").timestamp()
