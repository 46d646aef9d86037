"""Atomic file and directory writes: a reader sees the old content or the new, never half of either."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


class WriteFailed(OSError):
    """An output could not be written (disk full, permission denied, ...); what was there before is unchanged."""


# What a full disk, a quota or a read-only or foreign folder raise while the contents of a staged dir are written.
_WRITE_ERRORS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS})


def _failed(path: Path, exc: OSError) -> WriteFailed:
    return WriteFailed(exc.errno, f"could not write {path}: {exc.strerror or exc}; its previous version is unchanged")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: Path, data: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise _failed(path, exc) from exc
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise _failed(path, exc) from exc
        raise


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, value: object, *, indent: int | None = 2) -> None:
    write_text(path, json.dumps(value, indent=indent, ensure_ascii=False) + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


@contextlib.contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """Yield a scratch directory beside `final`; on success it replaces `final` in one rename.

    An existing `final` is moved aside first and removed only after the new one is in place, so a crash
    leaves either the old directory or the new one.
    """
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    except OSError as exc:
        raise _failed(final, exc) from exc
    stage.chmod(0o777 & ~_umask())  # mkdtemp makes 0700
    try:
        yield stage
    except BaseException as exc:
        shutil.rmtree(stage, ignore_errors=True)
        if isinstance(exc, OSError) and not isinstance(exc, WriteFailed) and exc.errno in _WRITE_ERRORS:
            raise _failed(final, exc) from exc
        raise
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(stage, final)
    shutil.rmtree(old, ignore_errors=True)
