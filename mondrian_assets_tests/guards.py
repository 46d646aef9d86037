"""Enforcement hooks for tests, built on CPython's audit hooks: while armed, every network connection or name
lookup that is not loopback is refused, and every file opened under the watched folders is recorded.

Child Python processes (training, evaluation, the reload check) arm the same hooks through `child_guard/sitecustomize.py` when
`GUARD_LOG` is in their environment; every event is appended to that log, so the test sees its children too.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

GUARD_LOG = "MONDRIAN_GUARD_LOG"
GUARD_WATCH = "MONDRIAN_GUARD_WATCH"  # os.pathsep-separated folders whose file opens are recorded
CHILD_GUARD_DIR = Path(__file__).parent / "child_guard"

_state: dict = {"log": None, "watch": ()}


class NetworkRefused(ConnectionRefusedError):
    """Raised in place of a connection the test forbids."""


def _is_loopback(host: object) -> bool:
    if host is None or host in ("localhost", "", b"localhost"):
        return True
    if isinstance(host, bytes):
        host = host.decode()
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False  # a name other than localhost would need DNS: that is the network


def _record(event: dict) -> None:
    with open(_state["log"], "a", encoding="utf-8") as log:
        log.write(json.dumps(event) + "\n")


def _hook(event: str, args: tuple) -> None:
    if _state["log"] is None:
        return
    if event == "open":
        path = args[0]
        if isinstance(path, (str, bytes)) and not isinstance(path, int):
            text = os.fsdecode(path)
            if text != _state["log"] and any(text.startswith(root) for root in _state["watch"]):
                _record({"open": os.path.abspath(text), "pid": os.getpid()})
    elif event in ("socket.connect", "socket.sendto"):
        sock, address = args[0], args[-1]
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address[0]):
            _record({"network": f"{event} {address[0]}:{address[1]}", "pid": os.getpid()})
            raise NetworkRefused(f"test guard: no network outside loopback ({address[0]})")
    elif event == "socket.getaddrinfo" and not _is_loopback(args[0]):
        _record({"network": f"getaddrinfo {args[0]}", "pid": os.getpid()})
        raise NetworkRefused(f"test guard: no name lookups ({args[0]})")


def arm(log: Path, watch: tuple[str, ...]) -> None:
    if not getattr(sys, "_mondrian_guard_installed", False):
        sys.addaudithook(_hook)  # audit hooks cannot be removed: disarming clears the state instead
        sys._mondrian_guard_installed = True
    _state["log"], _state["watch"] = str(log), tuple(watch)


def disarm() -> None:
    _state["log"], _state["watch"] = None, ()


@contextmanager
def guarded(log: Path, watch: tuple[Path, ...]) -> Iterator[list[dict]]:
    """Arm the hooks here and in child Python processes; yields the events, filled in when the block ends."""
    log.touch()
    folders = tuple(str(w) for w in watch)
    saved = {k: os.environ.get(k) for k in (GUARD_LOG, GUARD_WATCH, "PYTHONPATH")}
    os.environ[GUARD_LOG], os.environ[GUARD_WATCH] = str(log), os.pathsep.join(folders)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(CHILD_GUARD_DIR), saved["PYTHONPATH"]) if p)
    events: list[dict] = []
    arm(log, folders)
    try:
        yield events
    finally:
        disarm()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        events.extend(json.loads(line) for line in log.read_text().splitlines())
