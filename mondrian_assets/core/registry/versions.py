"""Immutable adapter versions per advisor: rows in our state DB, files under `models/versions/<advisor>-v<N>/`.

What other parts call (the service, the nightly re-check, the retrain sensor):
- `active_version(engine, advisor) -> Version | None`: the advisor's active version, from the registry row (the
  truth; the `models/<advisor>-active` pointer follows it, see `pointer.py`). `Version.path` is its immutable
  folder: `mlx_vlm.load(version.base_model, adapter_path=str(version.path))` loads it.
- `list_versions(engine, advisor)`, `get_version(engine, advisor, number)`, `registered_advisors(engine)`.
- `register_version(...)`: copy an adapter folder in as a new version, or return the existing version holding
  the same adapter content (the hash of `adapter_config.json` + `adapters.safetensors`: what loading reads).

Every write goes through `write_lock` (SQLite `BEGIN IMMEDIATE`): writers of one state DB run one at a time, so two
deploys of an advisor cannot both allocate version N or both see "no version yet".
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import sqlalchemy as sa

from mondrian_assets.core.state_db import deployments_table, model_versions_table

ADAPTER_FILES = ("adapter_config.json", "adapters.safetensors")  # what mlx_vlm.load reads: the content hash
RECORD_FILES = ("training_args.json", "training_log.jsonl", "loss_curve.png")  # copied along when present
REPORT_NAME = "comparison_report.json"

# Crash injection for the atomicity tests: called with the name of each step boundary. None in normal runs.
crash_hook: Callable[[str], None] | None = None


def step_done(name: str) -> None:
    if crash_hook is not None:
        crash_hook(name)


class RegistryError(ValueError):
    """An expected refusal (no such version, a gate-failed target, nothing to roll back to): say it plainly."""


@dataclass(frozen=True)
class Version:
    advisor: str
    number: int
    content_hash: str
    base_model: str
    data_version: str
    fingerprint: str
    metrics: dict
    eval_report: str | None
    gates_passed: bool
    status: str  # candidate | active | retired | rejected
    pinned: bool
    path: Path  # immutable: models/versions/<advisor>-v<N>
    created_at: str
    pruned_at: str | None

    @property
    def name(self) -> str:
        return f"{self.advisor}-v{self.number}"


@dataclass(frozen=True)
class Deployment:
    advisor: str
    from_version: int | None
    to_version: int | None
    action: str  # promote | reject | rollback | pin | unpin
    reasons: list[str]
    evidence: dict
    actor: str
    at: str


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def versions_root(models: Path) -> Path:
    return models / "versions"


def version_dir(models: Path, advisor: str, number: int) -> Path:
    return versions_root(models) / f"{advisor}-v{number}"


@contextmanager
def write_lock(engine: sa.Engine) -> Iterator[sa.Connection]:
    """A transaction that holds SQLite's write lock from its first statement; commits on success. An exception
    (or a killed process) leaves the DB as it was."""
    with engine.connect() as conn:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
        yield conn
        conn.commit()


def adapter_content_hash(adapter_dir: Path) -> str:
    digest = hashlib.sha256()
    for name in ADAPTER_FILES:
        path = adapter_dir / name
        if not path.is_file():
            raise RegistryError(f"{adapter_dir} has no {name}: not an adapter folder")
        digest.update(f"{name}\0{path.stat().st_size}\0".encode())
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _home_of(conn: sa.Connection) -> Path:
    """The state DB's folder (MONDRIAN_HOME): version paths are stored relative to it, so the home can move."""
    return Path(conn.engine.url.database or ".").resolve().parent


def _stored(path: Path, home: Path) -> str:
    return str(path.relative_to(home)) if path.is_relative_to(home) else str(path)


def _version(row: sa.Row, home: Path) -> Version:
    return Version(
        advisor=row.advisor, number=row.number, content_hash=row.content_hash, base_model=row.base_model,
        data_version=row.data_version, fingerprint=row.fingerprint, metrics=json.loads(row.metrics),
        eval_report=str(home / row.eval_report) if row.eval_report else None, gates_passed=bool(row.gates_passed),
        status=row.status, pinned=bool(row.pinned), path=home / row.path, created_at=row.created_at,
        pruned_at=row.pruned_at,
    )  # fmt: skip


def _deployment(row: sa.Row) -> Deployment:
    return Deployment(
        advisor=row.advisor, from_version=row.from_version, to_version=row.to_version, action=row.action,
        reasons=json.loads(row.reasons), evidence=json.loads(row.evidence), actor=row.actor, at=row.at,
    )  # fmt: skip


_V = model_versions_table.c


def _select(conn: sa.Connection, *where: sa.ColumnElement[bool]) -> list[Version]:
    rows = conn.execute(sa.select(model_versions_table).where(*where).order_by(_V.number)).all()
    home = _home_of(conn)
    return [_version(r, home) for r in rows]


def _one(conn: sa.Connection, *where: sa.ColumnElement[bool]) -> Version | None:
    found = _select(conn, *where)
    return found[0] if found else None


def active_in(conn: sa.Connection, advisor: str) -> Version | None:
    return _one(conn, _V.advisor == advisor, _V.status == "active")


def pinned_in(conn: sa.Connection, advisor: str) -> Version | None:
    return _one(conn, _V.advisor == advisor, _V.pinned == sa.true())


def version_in(conn: sa.Connection, advisor: str, number: int) -> Version | None:
    return _one(conn, _V.advisor == advisor, _V.number == number)


def active_version(engine: sa.Engine, advisor: str) -> Version | None:
    """The advisor's active version (the registry row, the truth), or None when nothing was ever promoted."""
    with engine.connect() as conn:
        return active_in(conn, advisor)


def get_version(engine: sa.Engine, advisor: str, number: int) -> Version | None:
    with engine.connect() as conn:
        return version_in(conn, advisor, number)


def list_versions(engine: sa.Engine, advisor: str) -> list[Version]:
    with engine.connect() as conn:
        return _select(conn, _V.advisor == advisor)


def registered_advisors(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(sa.select(_V.advisor).distinct().order_by(_V.advisor)).scalars())


_D = deployments_table.c


def deployments(engine: sa.Engine, advisor: str) -> list[Deployment]:
    """The advisor's deployment history, oldest first."""
    with engine.connect() as conn:
        rows = conn.execute(sa.select(deployments_table).where(_D.advisor == advisor).order_by(_D.id)).all()
    return [_deployment(r) for r in rows]


def last_deployment_in(conn: sa.Connection, advisor: str) -> Deployment | None:
    row = conn.execute(sa.select(deployments_table).where(_D.advisor == advisor).order_by(_D.id.desc())).first()
    return _deployment(row) if row is not None else None


def decision_in(conn: sa.Connection, advisor: str, number: int, evidence_key: str) -> Deployment | None:
    """The decision already recorded for this version on this evidence, if any."""
    row = conn.execute(
        sa.select(deployments_table).where(
            _D.advisor == advisor, _D.to_version == number, _D.evidence_key == evidence_key
        )
    ).first()
    return _deployment(row) if row is not None else None


def insert_deployment(
    conn: sa.Connection, advisor: str, action: str, *, from_version: int | None, to_version: int | None,
    reasons: list[str], actor: str, evidence: dict | None = None, evidence_key: str | None = None,
) -> None:  # fmt: skip
    conn.execute(sa.insert(deployments_table).values(
        advisor=advisor, from_version=from_version, to_version=to_version, action=action,
        reasons=json.dumps(reasons), evidence=json.dumps(evidence or {}), evidence_key=evidence_key, actor=actor,
        at=now(),
    ))  # fmt: skip


def update_version(conn: sa.Connection, version: Version, **values: object) -> None:
    conn.execute(
        sa.update(model_versions_table)
        .where(_V.advisor == version.advisor, _V.number == version.number)
        .values(**values)
    )


def _stage_copy(adapter_dir: Path, report: Path | None, root: Path) -> Path:
    """Copy the version's files into a scratch folder beside the versions, all read-only."""
    root.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=root, prefix=".stage-"))
    names = [n for n in ADAPTER_FILES + RECORD_FILES if (adapter_dir / n).is_file()]
    for name in names:
        shutil.copyfile(adapter_dir / name, stage / name)
    if report is not None:
        shutil.copyfile(report, stage / REPORT_NAME)
    for path in stage.iterdir():
        path.chmod(0o444)
    stage.chmod(0o755)  # mkdtemp makes 0700; the folder stays writable so retention can delete it
    return stage


def _remove_tree(path: Path) -> None:
    """Rename first, then delete: a version folder is whole under its name or gone, never half deleted."""
    if not path.exists():
        return
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)  # a concurrent cleaner may be removing it too


def _clear_leftovers(root: Path) -> None:
    """Scratch folders of crashed writers. Only called under the write lock, when no writer is staging."""
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith((".stage-", ".trash-")):
                shutil.rmtree(path, ignore_errors=True)


def register_version(
    engine: sa.Engine,
    models: Path,
    advisor: str,
    adapter_dir: Path,
    *,
    report: Path | None,
    metrics: dict,
    gates_passed: bool,
    expected_hash: str | None = None,
) -> tuple[Version, bool]:
    """The version holding `adapter_dir`'s content: the existing one, or a new one (copied to a scratch folder,
    made read-only, renamed into place, then its row committed). Returns (version, created).

    `expected_hash`: the content that was evaluated; if the folder changed since, refuse rather than register
    an adapter nobody evaluated."""
    content_hash = adapter_content_hash(adapter_dir)
    if expected_hash is not None and content_hash != expected_hash:
        raise RegistryError(f"{adapter_dir} changed after it was evaluated; evaluate it again before deploying")
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    root = versions_root(models)
    with write_lock(engine) as conn:
        existing = _one(conn, _V.advisor == advisor, _V.content_hash == content_hash)
        if existing is not None:
            return existing, False
        _clear_leftovers(root)
        number = (conn.execute(sa.select(sa.func.max(_V.number)).where(_V.advisor == advisor)).scalar() or 0) + 1
        stage = _stage_copy(adapter_dir, report, root)
        if adapter_content_hash(stage) != content_hash:
            shutil.rmtree(stage)
            raise RegistryError(f"{adapter_dir} changed while it was being copied; deploy again")
        final, home = version_dir(models, advisor, number).resolve(), _home_of(conn)
        _remove_tree(final)  # a folder without a row: left by a writer that crashed before its commit
        os.replace(stage, final)
        step_done("version_dir_written")
        conn.execute(sa.insert(model_versions_table).values(
            advisor=advisor, number=number, content_hash=content_hash,
            base_model=str(config.get("base_model", "")), data_version=str(config.get("data_version", "")),
            fingerprint=str(config.get("fingerprint", "")), metrics=json.dumps(metrics),
            eval_report=_stored(final / REPORT_NAME, home) if report is not None else None, gates_passed=gates_passed,
            status="candidate", pinned=False, path=_stored(final, home), created_at=now(),
        ))  # fmt: skip
        version = version_in(conn, advisor, number)
    step_done("version_row_written")
    assert version is not None
    return version, True


def prune_versions(engine: sa.Engine, advisor: str, keep_last: int, protected: set[int]) -> list[int]:
    """Retention: delete the files of all but the newest `keep_last` versions, never one in `protected` (the
    active, pinned and previous versions). Rows stay, marked pruned. Returns the numbers pruned now."""
    with write_lock(engine) as conn:
        live = _select(conn, _V.advisor == advisor, _V.pruned_at.is_(None))
        newest = {v.number for v in live[-keep_last:]} if keep_last > 0 else set()
        doomed = [v.number for v in live if v.number not in newest | protected]
        if doomed:
            conn.execute(sa.update(model_versions_table).where(_V.advisor == advisor, _V.number.in_(doomed))
                         .values(pruned_at=now()))  # fmt: skip
        pruned = _select(conn, _V.advisor == advisor, _V.pruned_at.is_not(None))
    step_done("pruned_rows_written")
    for version in pruned:  # files follow the rows, including those a crash left behind after an earlier commit
        _remove_tree(version.path)
    return doomed
