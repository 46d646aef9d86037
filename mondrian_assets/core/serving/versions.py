"""The registry lookup the service makes on every request: which version of an advisor is active, and where."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from mondrian_assets.core.locations import Locations


@dataclass(frozen=True)
class ActiveVersion:
    advisor: str
    version: int
    path: Path  # the immutable version folder: the adapter files mlx_vlm.load(base, adapter_path=...) reads


def active_version(locations: Locations, advisor: str) -> ActiveVersion | None:
    """The pointer models/<advisor>-active -> models/versions/<advisor>-v<N>/, or None when nothing is active."""
    pointer = locations.models / f"{advisor}-active"
    if not pointer.exists():
        return None
    target = pointer.resolve()
    match = re.fullmatch(rf"{re.escape(advisor)}-v(\d+)", target.name)
    if match is None:
        return None
    return ActiveVersion(advisor, int(match.group(1)), target)
