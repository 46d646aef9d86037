"""The base model named as users name it, resolved once to the local folder every stage then loads.

A name is a model folder (the embedded tiny model, a converted checkpoint, an MLX 4-bit or 8-bit base) or a Hugging
Face hub id such as `Qwen/Qwen3-VL-4B-Instruct`, found in the local Hugging Face cache (`HF_HUB_CACHE`, by default
`~/.cache/huggingface/hub`). A hub id is never downloaded here: a multi-gigabyte download does not belong inside a
pipeline step and its retries; `hf download <id>` fetches it once.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path


class BaseModelError(ValueError):
    """The base model cannot be found; the message says where it was looked for and what to do."""


@dataclass(frozen=True)
class ResolvedBase:
    name: str  # as configured
    path: Path  # the local folder: training, checks, evaluation and training_args all use this
    revision: str | None  # the cached snapshot's commit, for a hub id
    quantization: dict | None  # {"bits", "group_size", ...} of an MLX-quantized base

    def describe(self) -> str:
        parts = [self.name]
        if self.revision:
            parts.append(f"revision {self.revision[:12]}")
        if self.quantization:
            parts.append(f"{self.quantization.get('bits')}-bit")
        if str(self.path) != self.name:
            parts.append(f"at {self.path}")
        return ", ".join(parts)


def _looks_like_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and all(name.split("/"))


def _from_hub_cache(repo_id: str) -> tuple[Path, str]:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True))
    except LocalEntryNotFoundError as exc:
        raise BaseModelError(
            f"base model {repo_id!r} is not a folder and not in the local Hugging Face cache "
            f"({constants.HF_HUB_CACHE}); download it once with `hf download {repo_id}` or give a local folder"
        ) from exc
    return folder, folder.name  # snapshots/<commit>


def resolve_base(name: str | Path) -> ResolvedBase:
    """The local folder of `name`, checked to hold a model config."""
    name = str(name)
    if not name:
        raise BaseModelError("base_model is not set")
    path, revision = Path(name).expanduser(), None
    if not path.exists():
        if not _looks_like_hub_id(name):
            raise BaseModelError(f"base model folder {name} does not exist")
        path, revision = _from_hub_cache(name)
    if not path.is_dir():
        raise BaseModelError(f"base model path {path} is not a folder")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise BaseModelError(f"{path} is not a model folder: no config.json")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise BaseModelError(f"{config_file} is not valid JSON: {exc}") from exc
    quantization = config.get("quantization")  # MLX's own; other formats do not load in MLX
    return ResolvedBase(name, path.resolve(), revision, quantization if isinstance(quantization, dict) else None)


@functools.lru_cache(maxsize=64)
def _folder(name: str) -> Path | None:
    try:
        return resolve_base(name).path
    except BaseModelError:
        return None


def same_base(a: str, b: str) -> bool:
    """Whether two names are the same base model: one folder however it is written, a hub id and its cached
    snapshot alike; names that resolve nowhere are compared as written."""
    left, right = _folder(a), _folder(b)
    return left == right if left is not None and right is not None else a == b
