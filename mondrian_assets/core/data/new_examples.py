"""New linkable examples per advisor since the last look, and which advisors are due for retraining.

A look costs what is new, not what was seen: it reads the app's rows past its cursor and the rows that were not
finished last time (job_changes), screens them with the linker's own row and file checks (no image decoding), and
re-checks a bounded slice of "waiting" jobs (finished, but not linkable for want of a file: a missing image, no or
a broken analysis) by the signatures of the files they would link with, so an analysis file that appears or is
fixed later is noticed too. Per advisor, new examples wait until there are `min_new_examples` of them or
`max_wait_s` has passed since the first; then a batch is due, named by a digest of its job ids.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import sqlalchemy as sa

from mondrian_assets.core.data.app_db import JobRow, snapshot
from mondrian_assets.core.data.job_changes import JobCursor, read_changed_jobs, read_jobs_by_rowid
from mondrian_assets.core.data.linker import ABSENT, ROW_SKIP_REASONS, LinkState, file_signature, screen, watched_paths
from mondrian_assets.core.locations import Locations


@dataclass(frozen=True)
class RetrainPolicy:
    min_new_examples: int = 10
    max_wait_s: float = 24 * 3600.0
    rows_per_look: int = 5000  # a first look at a big app is spread over several looks
    waiting_per_look: int = 100  # waiting jobs re-checked per look, round robin


@dataclass
class Pending:
    """An advisor's new examples not yet handed to a retrain."""

    count: int
    first_seen: float  # epoch seconds
    digest: str  # chained over the job ids: the batch's name


@dataclass
class WatchCursor:
    jobs: JobCursor
    waiting: dict[int, str] = field(default_factory=dict)  # rowid -> signature of its watched files
    sweep_from: int = 0  # the next waiting rowid to re-check
    pending: dict[str, Pending] = field(default_factory=dict)

    @classmethod
    def after(cls, state: LinkState | None) -> WatchCursor:
        """Start where a link ended: its rows are not new, and the jobs it could not link for want of a file wait
        with the signatures the link saw, so a file that changed since is noticed."""
        if state is None:
            return cls(JobCursor())
        waiting = [r for r, skip in state.early_skips.items() if skip.reason not in ROW_SKIP_REASONS]
        files = state.files[state.files["app_rowid"].isin(waiting)]
        signatures: dict[int, list] = {}
        for rowid, size, mtime, inode in files[["app_rowid", "size", "mtime_ns", "inode"]].itertuples(index=False):
            signatures.setdefault(int(rowid), []).append(None if inode == ABSENT else (int(size), int(mtime), int(inode)))
        return cls(state.cursor, {rowid: _digest(sigs) for rowid, sigs in signatures.items()})

    def encode(self) -> str:
        return json.dumps(
            {
                "jobs": self.jobs.encode(),
                "waiting": ",".join(f"{r}:{s}" for r, s in sorted(self.waiting.items())),
                "sweep": self.sweep_from,
                "pending": {a: [p.count, p.first_seen, p.digest] for a, p in sorted(self.pending.items())},
            }
        )

    @classmethod
    def decode(cls, text: str | None) -> WatchCursor | None:
        if not text:
            return None
        try:
            raw = json.loads(text)
            jobs = JobCursor.decode(raw["jobs"])
            waiting = {int(r): s for r, s in (item.split(":") for item in filter(None, raw["waiting"].split(",")))}
            pending = {a: Pending(int(n), float(t), str(d)) for a, (n, t, d) in raw["pending"].items()}
            return None if jobs is None else cls(jobs, waiting, int(raw["sweep"]), pending)
        except (ValueError, KeyError, TypeError):
            return None


@dataclass(frozen=True)
class Batch:
    """New examples of one advisor that are due for a retrain."""

    advisor: str
    count: int
    first_seen: float
    digest: str
    reason: str

    @property
    def run_key(self) -> str:
        """The same batch always gets the same key, so a repeated look cannot request a second run."""
        return f"retrain-{self.advisor}-{self.digest[:16]}"


@dataclass(frozen=True)
class Look:
    cursor: WatchCursor
    due: list[Batch]
    new_examples: dict[str, int]  # advisor -> linkable examples found in this look
    rows_read: int
    waiting_checked: int
    caught_up: bool  # False while a first look at a big app is still being spread over several looks


def _digest(signatures: list) -> str:
    return hashlib.sha1(repr(signatures).encode()).hexdigest()[:10]


def watch_signature(job: JobRow, loc: Locations) -> str:
    """A digest of the signatures of the files `job` would link with: it changes when any of them does."""
    return _digest([file_signature(p) for p in watched_paths(job, loc)])


def look(conn: sa.Connection, loc: Locations, cursor: WatchCursor, policy: RetrainPolicy, now: float) -> Look:
    """One look at the app since `cursor` (a first one starts from `WatchCursor.after` the last link), on one
    committed state of its DB: the new rows and the re-checked waiting ones cannot disagree about a job."""
    with snapshot(conn):
        return _look(conn, loc, cursor, policy, now)


def _look(conn: sa.Connection, loc: Locations, cursor: WatchCursor, policy: RetrainPolicy, now: float) -> Look:
    changes = read_changed_jobs(conn, cursor.jobs, limit=policy.rows_per_look)
    waiting = {} if changes.reset else dict(cursor.waiting)  # a replaced database: its rowids are other jobs
    found: list[tuple[str, str]] = []  # (advisor, job id), in row order

    def consider(rowid: int, job: JobRow) -> None:
        verdict = screen(job, loc)
        if isinstance(verdict, str):
            waiting.pop(rowid, None)
            found.append((verdict, job.id))
        elif verdict.reason not in ROW_SKIP_REASONS:
            waiting[rowid] = watch_signature(job, loc)

    for rowid in sorted(changes.finished_rowids):
        consider(rowid, changes.rows[rowid])

    # A slice of the waiting jobs, round robin: cost bounded per look, every one re-checked in turn.
    ring = sorted(r for r in waiting if r not in changes.rows)
    due_next = [r for r in ring if r >= cursor.sweep_from][: policy.waiting_per_look]
    if len(due_next) < policy.waiting_per_look:
        due_next += [r for r in ring if r < cursor.sweep_from][: policy.waiting_per_look - len(due_next)]
    rows = read_jobs_by_rowid(conn, due_next)
    for rowid in due_next:
        job = rows.get(rowid)
        if job is None or not job.finished:  # deleted, or put back in the queue by the app
            waiting.pop(rowid, None)
        elif watch_signature(job, loc) != waiting[rowid]:
            consider(rowid, job)
    sweep_from = (max(due_next) + 1) if due_next else 0

    pending = {a: Pending(p.count, p.first_seen, p.digest) for a, p in cursor.pending.items()}
    new_examples: dict[str, int] = {}
    for advisor, job_id in found:
        entry = pending.setdefault(advisor, Pending(0, now, ""))
        entry.count += 1
        entry.digest = hashlib.sha1(f"{entry.digest}\n{job_id}".encode()).hexdigest()
        new_examples[advisor] = new_examples.get(advisor, 0) + 1

    due: list[Batch] = []
    if changes.complete:
        for advisor, entry in sorted(pending.items()):
            if entry.count >= policy.min_new_examples:
                reason = f"{entry.count} new examples (min_new_examples={policy.min_new_examples})"
            elif now - entry.first_seen >= policy.max_wait_s:
                reason = f"{entry.count} new examples, waiting since {now - entry.first_seen:.0f} s (max_wait)"
            else:
                continue
            due.append(Batch(advisor, entry.count, entry.first_seen, entry.digest, reason))
            del pending[advisor]
    next_cursor = WatchCursor(changes.cursor, waiting, sweep_from, pending)
    return Look(next_cursor, due, new_examples, len(changes.rows) + len(rows), len(due_next), changes.complete)
