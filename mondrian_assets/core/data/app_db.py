"""Read the app's mondrian.db without ever writing to it, whichever era of the app wrote it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

FINISHED_STATUSES = frozenset({"completed", "done"})
JOB_COLUMNS = (
    "id", "filename", "advisor", "status", "analysis_file", "analysis_markdown", "llm_outputs",
    "created_at", "started_at", "completed_at", "mode", "model", "adapter", "enable_rag", "error",
)  # fmt: skip


class AppDatabaseError(RuntimeError):
    """The app's database is missing, damaged, locked for too long, or not shaped like the app's."""


@dataclass(frozen=True)
class JobRow:
    """One row of `jobs`; every column but `id` may be absent in an older app era, hence all optional."""

    id: str
    filename: str | None = None
    advisor: str | None = None
    status: str | None = None
    analysis_file: str | None = None
    analysis_markdown: str | None = None
    llm_outputs: str | None = None
    created_at: str | None = None
    completed_at: str | None = None

    @property
    def finished(self) -> bool:
        return (self.status or "").strip().lower() in FINISHED_STATUSES


@dataclass(frozen=True)
class AdvisorRow:
    id: str
    name: str
    prompt: str | None
    bio: str | None = None


def read_only_engine(db_path: Path, *, busy_timeout_s: float = 10.0) -> sa.Engine:
    """An engine that can only read: SQLite opens the file with mode=ro, so even a bug cannot write.

    The app may be writing concurrently (WAL or rollback journal); the busy timeout waits for its locks
    instead of failing, and our reads are short (`snapshot`), so we never hold the DB for long.
    """
    if not db_path.is_file():
        raise AppDatabaseError(f"the app database {db_path} does not exist (set MONDRIAN_APP_DIR or MONDRIAN_DB)")
    url = f"sqlite:///file:{db_path.as_posix()}?mode=ro&uri=true"
    engine = sa.create_engine(url, connect_args={"timeout": busy_timeout_s}, poolclass=sa.pool.NullPool)

    @sa.event.listens_for(engine, "connect")
    def _decode_leniently(dbapi_connection, _record) -> None:
        # One row with bytes that are not UTF-8 must cost that row's text, not the whole read.
        dbapi_connection.text_factory = lambda raw: raw.decode("utf-8", "replace")

    @sa.event.listens_for(engine, "handle_error")
    def _explain(context: sa.engine.ExceptionContext) -> None:
        problem = _database_problem(str(context.original_exception), db_path, busy_timeout_s)
        if problem is not None:
            raise AppDatabaseError(problem) from context.original_exception

    return engine


@contextmanager
def snapshot(conn: sa.Connection) -> Iterator[sa.Connection]:
    """Every read inside sees one committed state of the app's DB, however many statements it takes and whatever
    the app commits meanwhile: one read transaction. In WAL mode the app keeps writing; in rollback-journal
    mode its next commit waits for the end of the block (on its own busy timeout), so keep the block to reads."""
    conn.exec_driver_sql("BEGIN")
    try:
        yield conn
    finally:
        conn.rollback()  # nothing was written: ending the read transaction is all it does


def _database_problem(message: str, db_path: Path, busy_timeout_s: float) -> str | None:
    """What to tell the user for the SQLite errors a damaged or busy app database raises; None for others."""
    if "locked" in message or "busy" in message:
        return (f"the app database {db_path} stayed locked by another writer for more than {busy_timeout_s:g} s; "
                "retry when the app is idle, or raise the resource's busy_timeout_s")  # fmt: skip
    if "not a database" in message or "malformed" in message or "disk I/O error" in message:
        return (f"the app database {db_path} is not a readable SQLite database ({message}); check that "
                "MONDRIAN_DB points at the app's mondrian.db and restore it from a backup if it is damaged")  # fmt: skip
    return None


def table_columns(conn: sa.Connection, table: str) -> list[str]:
    return [row[1] for row in conn.exec_driver_sql(f"PRAGMA table_info('{table}')")]


def job_columns(conn: sa.Connection) -> list[str]:
    """The JobRow fields the `jobs` table has (older app eras lack some)."""
    present = set(table_columns(conn, "jobs"))
    if "id" not in present:
        raise AppDatabaseError("the app database has no `jobs` table with an `id` column")
    return [c for c in JobRow.__dataclass_fields__ if c in present]


def read_advisors(conn: sa.Connection) -> dict[str, AdvisorRow]:
    present = set(table_columns(conn, "advisors"))
    if "id" not in present:
        return {}
    cols = [c for c in ("id", "name", "prompt", "bio") if c in present]
    rows = conn.exec_driver_sql(f"SELECT {', '.join(cols)} FROM advisors").mappings().all()
    return {
        str(r["id"]): AdvisorRow(str(r["id"]), str(r.get("name") or r["id"]), r.get("prompt"), r.get("bio"))
        for r in rows
    }


def read_system_prompt(conn: sa.Connection) -> str | None:
    if not {"key", "value"} <= set(table_columns(conn, "config")):
        return None
    row = conn.exec_driver_sql("SELECT value FROM config WHERE key = 'system_prompt'").first()
    return row[0] if row and row[0] else None
