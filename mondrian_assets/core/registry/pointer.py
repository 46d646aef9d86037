"""The app-facing active pointer `models/<advisor>-active`: a relative symlink to the active version's folder.

`mlx_vlm.load(base, adapter_path="models/<advisor>-active")` loads whatever it points at. It is switched
atomically: a new symlink is made under a temporary name, then renamed over the old one (`os.replace`), so a
reader, or a crash at any instant, sees the old version or the new one, never a half state. The registry row is
the truth: `sync_pointer` makes the pointer agree with it, and every deploy, rollback, pin and `status` calls it,
which repairs a pointer left behind by a crash or changed by hand.
"""

from __future__ import annotations

import os
from pathlib import Path

import sqlalchemy as sa

from mondrian_assets.core.registry.versions import RegistryError, active_in, step_done, write_lock


def pointer_path(models: Path, advisor: str) -> Path:
    return models / f"{advisor}-active"


def read_pointer(models: Path, advisor: str) -> str | None:
    """The pointer's target as written (relative to models/), or None when there is no pointer."""
    link = pointer_path(models, advisor)
    if link.is_symlink():
        return os.readlink(link)
    if link.exists():
        raise RegistryError(f"{link} is not a symlink; move it away so the registry can manage the pointer")
    return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def point_to(models: Path, advisor: str, target: Path | None) -> None:
    """Switch the pointer to `target` (a version folder) in one rename, or remove it when `target` is None."""
    link = pointer_path(models, advisor)
    read_pointer(models, advisor)  # refuses to replace something that is not our symlink
    if target is None:
        if link.is_symlink():
            link.unlink()
        return
    models.mkdir(parents=True, exist_ok=True)
    staged = models / f".{advisor}-active.{os.getpid()}.tmp"
    if staged.is_symlink():
        staged.unlink()
    os.symlink(os.path.relpath(target, models), staged)
    step_done("pointer_staged")
    os.replace(staged, link)
    _fsync_dir(models)
    step_done("pointer_switched")


def _clear_staged_links(models: Path, advisor: str) -> None:
    for path in models.glob(f".{advisor}-active.*.tmp") if models.is_dir() else []:
        path.unlink(missing_ok=True)


def sync_pointer(engine: sa.Engine, models: Path, advisor: str) -> bool:
    """Make the pointer agree with the registry's active version; True when it had to change. Runs under the
    registry's write lock, so two deploys cannot leave it at the older of their two decisions."""
    with write_lock(engine) as conn:
        active = active_in(conn, advisor)
        _clear_staged_links(models, advisor)
        want = os.path.relpath(active.path, models) if active is not None else None
        if read_pointer(models, advisor) == want:
            return False
        point_to(models, advisor, active.path if active is not None else None)
        return True
