"""Which of the app's jobs are new or changed since the last look, without re-reading the ones already seen.

The app's `jobs` table has no monotonic column (ids are UUID text, `completed_at` is often NULL, a job turns
finished through an UPDATE), but every row of an ordinary SQLite table has a rowid, and an insert takes one past
the largest. So a look reads the rows past a high-water mark plus the rows that were not finished last time
(by rowid), and nothing else: its cost grows with what is new, not with the jobs already seen.
What this cannot see is a finished row edited in place; a full link re-reads everything.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import sqlalchemy as sa

from mondrian_assets.core.data.app_db import JobRow, job_columns

_SQL_PARAMS = 500  # rowids per IN (...) list, well under SQLite's variable limit


@dataclass(frozen=True)
class JobCursor:
    """Where the last look ended: the largest rowid read, the rows read that were not finished yet, how many
    rows the table had, and a digest of the high-water row's id (a replaced database does not match it)."""

    high_water: int = 0
    open_rowids: tuple[int, ...] = ()
    row_count: int = 0
    anchor: str = ""

    def encode(self) -> str:
        """Compact text: open rowids as base-36 deltas, so thousands of them stay a few kilobytes."""
        deltas, last = [], 0
        for rowid in self.open_rowids:
            deltas.append(_b36(rowid - last))
            last = rowid
        return json.dumps({"hw": self.high_water, "n": self.row_count, "a": self.anchor, "open": ".".join(deltas)})

    @classmethod
    def decode(cls, text: str | None) -> JobCursor | None:
        if not text:
            return None
        try:
            raw = json.loads(text)
            rowids, last = [], 0
            for delta in filter(None, raw["open"].split(".")):
                last += int(delta, 36)
                rowids.append(last)
            return cls(int(raw["hw"]), tuple(rowids), int(raw["n"]), str(raw["a"]))
        except (ValueError, KeyError, TypeError):
            return None


@dataclass(frozen=True)
class JobChanges:
    """Rows read this time (new ones and the ones that were open), keyed by rowid, and the cursor after them.

    `reset`: the cursor did not fit the database (replaced, or its newest row gone), so everything was read.
    `deleted`: rows counted fewer than expected, so some seen rows are gone (only checked when asked).
    `complete`: every changed row was read (False when `limit` cut the new rows short).
    """

    rows: dict[int, JobRow]
    cursor: JobCursor
    reset: bool = False
    deleted: bool = False
    complete: bool = True
    finished_rowids: frozenset[int] = field(default_factory=frozenset)


def _b36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if n == 0:
            return out


def _anchor(job_id: str | None) -> str:
    return hashlib.sha1((job_id or "").encode()).hexdigest()[:12] if job_id is not None else ""


def _job_select(conn: sa.Connection) -> tuple[str, list[str]]:
    columns = job_columns(conn)
    return f"SELECT rowid, {', '.join(columns)} FROM jobs", columns


def _rows(conn: sa.Connection, sql: str, columns: list[str], params: tuple = ()) -> dict[int, JobRow]:
    out: dict[int, JobRow] = {}
    for rowid, *values in conn.exec_driver_sql(sql, params).all():
        out[int(rowid)] = JobRow(**{c: (None if v is None else str(v)) for c, v in zip(columns, values)})
    return out


def read_jobs_by_rowid(conn: sa.Connection, rowids: list[int]) -> dict[int, JobRow]:
    select, columns = _job_select(conn)
    out: dict[int, JobRow] = {}
    for i in range(0, len(rowids), _SQL_PARAMS):
        chunk = rowids[i : i + _SQL_PARAMS]
        out.update(_rows(conn, f"{select} WHERE rowid IN ({', '.join('?' * len(chunk))})", columns, tuple(chunk)))
    return out


def read_changed_jobs(
    conn: sa.Connection, cursor: JobCursor | None, *, check_deletions: bool = False, limit: int | None = None
) -> JobChanges:
    """The rows past `cursor.high_water` (at most `limit` of them, oldest first) and the rows it held open;
    with no cursor (or one that does not fit), every row."""
    select, columns = _job_select(conn)
    reset = False
    if cursor is not None and cursor.high_water:
        row = conn.exec_driver_sql("SELECT id FROM jobs WHERE rowid = ?", (cursor.high_water,)).first()
        if row is None or _anchor(str(row[0])) != cursor.anchor:
            cursor, reset = None, True
    start = cursor or JobCursor()
    page = f" LIMIT {int(limit)}" if limit else ""
    new = _rows(conn, f"{select} WHERE rowid > ? ORDER BY rowid{page}", columns, (start.high_water,))
    reopened = read_jobs_by_rowid(conn, list(start.open_rowids))
    complete = not limit or len(new) < limit
    high_water = max(new, default=start.high_water)
    rows = {**reopened, **new}
    still_open = tuple(sorted(r for r, job in rows.items() if not job.finished))
    finished = frozenset(r for r, job in rows.items() if job.finished)
    anchor = _anchor(rows[high_water].id) if high_water in rows else start.anchor
    row_count = start.row_count + len(new)
    deleted = False
    if check_deletions:
        actual = int(conn.exec_driver_sql("SELECT count(*) FROM jobs").scalar_one())
        deleted, row_count = actual != row_count, actual
    next_cursor = JobCursor(high_water, still_open, row_count, anchor)
    return JobChanges(rows, next_cursor, reset=reset, deleted=deleted, complete=complete, finished_rowids=finished)


def all_rowids(conn: sa.Connection) -> set[int]:
    return {int(r[0]) for r in conn.exec_driver_sql("SELECT rowid FROM jobs")}
