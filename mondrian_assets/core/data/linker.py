"""Link finished jobs to their image and analysis through the app's DB, keeping a reason for every rejected row.

A link after the first reads only what changed since (see `link`); its result is the same as a full link's.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import sqlalchemy as sa

from mondrian_assets.core import atomic
from mondrian_assets.core.data.app_db import JobRow, snapshot
from mondrian_assets.core.data.html_card import NOT_HTML, looks_like_html, recover_card
from mondrian_assets.core.data.images import ImageFacts, inspect_image
from mondrian_assets.core.data.job_changes import JobCursor, all_rowids, read_changed_jobs, read_jobs_by_rowid
from mondrian_assets.core.data.link_cache import LinkCache, LinkStore, file_key
from mondrian_assets.core.locations import Locations, PathRejected
from mondrian_assets.core.schema import ParseResult, canonical_json, parse_analysis

_ANALYSIS_KIND = "analysis.v2"  # bump when _Analysis changes shape: old cache entries are then never hit
_CARD_KIND = "html_card.v1"  # the same, for analyses recovered from the older app's HTML cards
HTML_CARD_SOURCE = "html_card"
MIN_IMAGE_SIDE = 16  # the app's 1x1 test image and similar slivers carry nothing to learn from
MAX_ANALYSIS_CHARS = 1_000_000  # real analyses, runaway repetition included, stay far below; never parse more

RECORD_COLUMNS = [
    "job_id", "advisor", "image_path", "image_sha256", "width", "height", "analysis_source", "analysis_path",
    "analysis_json", "overall_score", "json_size", "created_at", "completed_at", "derived_fields",
]  # fmt: skip


@dataclass(frozen=True)
class Skip:
    job_id: str
    advisor: str | None
    reason: str
    detail: str = ""


@dataclass(frozen=True)
class LinkResult:
    records: pd.DataFrame
    skips: list[Skip]
    cache_hits: int
    cache_misses: int
    jobs_read: int = 0  # rows read from the app's DB this time
    files_changed: int = 0  # watched files found changed since the last link

    def skip_counts(self) -> dict[str, int]:
        return dict(Counter(s.reason for s in self.skips).most_common())

    def advisor_counts(self) -> dict[str, int]:
        return {str(k): int(v) for k, v in self.records["advisor"].value_counts().sort_index().items()}


@dataclass(frozen=True)
class _Analysis:
    """What linking keeps of a parsed analysis, and what the cache stores: canonical JSON or an error code."""

    json: str | None
    overall_score: float = 0.0
    error: str | None = None
    detail: str = ""
    derived_fields: tuple[str, ...] = ()  # fields a recovered HTML card did not carry

    @classmethod
    def of(cls, result: ParseResult, derived_fields: tuple[str, ...] = ()) -> _Analysis:
        if result.analysis is None:
            return cls(None, error=result.error, detail=result.detail)
        return cls(canonical_json(result.analysis), result.analysis.overall_score, derived_fields=derived_fields)


@dataclass(frozen=True)
class _Candidate:
    job: JobRow
    advisor: str
    image_path: Path
    analysis: _Analysis
    analysis_source: str
    analysis_path: Path | None


def _single_advisor(value: str | None) -> str | None:
    advisor = (value or "").strip().lower()
    if not advisor or advisor in {"all", "random"} or "," in advisor:
        return None
    return advisor


def _looks_like_path(text: str) -> bool:
    stripped = text.strip()
    return "\n" not in stripped and len(stripped) < 512 and stripped.lower().endswith((".md", ".json", ".txt"))


def _analysis_sources(job: JobRow, advisor: str, loc: Locations) -> Iterable[tuple[str, str | None, str | None]]:
    """(source name, inline text, file reference) in the order the app's eras stored them."""
    if job.llm_outputs:
        try:
            outputs = json.loads(job.llm_outputs)
        except json.JSONDecodeError:
            outputs = None
        if isinstance(outputs, dict):
            if isinstance(outputs.get("response"), str):
                yield "llm_outputs.response", outputs["response"], None
            legacy = outputs.get(advisor)
            if isinstance(legacy, dict):
                legacy = legacy.get("html")
            if isinstance(legacy, str):
                yield "llm_outputs.html", legacy, None
    if job.analysis_markdown:
        if _looks_like_path(job.analysis_markdown):
            yield "analysis_markdown.path", None, job.analysis_markdown
        else:
            yield "analysis_markdown.text", job.analysis_markdown, None
    if job.analysis_file:
        yield "analysis_file", None, job.analysis_file
    base_id = job.id.split(" ")[0]
    for job_id in dict.fromkeys((job.id, base_id)):
        fallback = loc.analysis_dir / f"analysis-{advisor}-{job_id}.md"
        yield "fallback_file", None, str(fallback)


def _parse_cached(cache: LinkCache, key: str | None, parse: Callable[[], _Analysis]) -> _Analysis:
    """Parse only what the cache has not seen: a hit costs a dict lookup, not a parse."""
    cached = cache.get(key)
    if cached is not None:
        return _Analysis(**cached)
    analysis = parse()
    cache.put(key, asdict(analysis))
    return analysis


def _text_key(kind: str, text: str) -> str:
    return f"{kind}:text:" + hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class _Stored:
    """One stored analysis that was found: where, how to read it, and its cache key for a given parse kind."""

    source: str
    read: Callable[[], str]
    key: Callable[[str], str | None]
    path: Path | None
    size: int  # characters, or bytes for a file


def _card(stored: _Stored, cache: LinkCache) -> _Analysis:
    def parse() -> _Analysis:
        recovery = recover_card(stored.read())
        return _Analysis.of(recovery.result, recovery.derived_fields)

    return _parse_cached(cache, stored.key(_CARD_KIND), parse)


def _find_analysis(
    job: JobRow, advisor: str, loc: Locations, cache: LinkCache, recover_html_cards: bool
) -> tuple[_Analysis, str, Path | None] | Skip:
    """The first stored analysis that parses as JSON; failing that, the first HTML card that can be recovered;
    otherwise the problem with the first card, or else with the first analysis found."""
    first_failure: tuple[_Analysis, str] | None = None
    unparsed: list[_Stored] = []
    for source, text, reference in _analysis_sources(job, advisor, loc):
        if reference is not None:
            try:
                path = loc.analysis_file(reference)
            except PathRejected as exc:
                first_failure = first_failure or (_Analysis(None, error="path_outside_roots", detail=str(exc)), source)
                continue
            if not path.is_file():
                if source != "fallback_file":
                    first_failure = first_failure or (_Analysis(None, error="file_not_found", detail=str(path)), source)
                continue
            read, key = (lambda p=path: p.read_text("utf-8", "replace")), (lambda kind, p=path: file_key(kind, p))
            stored = _Stored(source, read, key, path, path.stat().st_size)
        else:
            content = text or ""
            stored = _Stored(source, lambda t=content: t, lambda kind, t=content: _text_key(kind, t), None, len(content))
        if stored.size > MAX_ANALYSIS_CHARS:
            too_large = _Analysis(None, error="too_large", detail=f"{stored.size} characters, at most {MAX_ANALYSIS_CHARS}")
            first_failure = first_failure or (too_large, source)
            continue
        result = _parse_cached(cache, stored.key(_ANALYSIS_KIND), lambda s=stored: _Analysis.of(parse_analysis(s.read())))
        if result.json is not None:
            return result, source, stored.path
        first_failure = first_failure or (result, source)
        unparsed.append(stored)
    for stored in unparsed:
        if not recover_html_cards:
            if looks_like_html(stored.read()):
                off = _Analysis(None, error="html_card_not_recovered", detail="HTML card; recovery is turned off")
                first_failure = (off, stored.source)
                break
            continue
        card = _card(stored, cache)
        if card.json is not None:
            return card, HTML_CARD_SOURCE, stored.path
        if card.error != NOT_HTML:
            first_failure = (card, stored.source)
            break
    if first_failure is None:
        return Skip(job.id, advisor, "analysis_missing", "no analysis in the DB and no analysis_md fallback file")
    result, source = first_failure
    return Skip(job.id, advisor, f"analysis_{result.error}", f"{source}: {result.detail}"[:500])


def _candidate(job: JobRow, loc: Locations, cache: LinkCache, recover_html_cards: bool) -> _Candidate | Skip:
    if not job.id:
        return Skip(job.id, job.advisor, "job_id_missing", "the row has no id")
    if not job.finished:
        return Skip(job.id, job.advisor, "not_finished", f"status={job.status!r}")
    advisor = _single_advisor(job.advisor)
    if advisor is None:
        return Skip(job.id, job.advisor, "advisor_not_single", f"advisor={job.advisor!r}")
    if not job.filename or not job.filename.strip():
        return Skip(job.id, advisor, "image_not_recorded", "the job has no filename")
    try:
        image_path = loc.image_path(job.filename)
    except PathRejected as exc:
        return Skip(job.id, advisor, "path_outside_roots", str(exc))
    if not image_path.is_file():
        return Skip(job.id, advisor, "image_not_found", str(image_path))
    found = _find_analysis(job, advisor, loc, cache, recover_html_cards)
    if isinstance(found, Skip):
        return found
    result, source, analysis_path = found
    return _Candidate(job, advisor, image_path, result, source, analysis_path)


# Skip reasons decided by the row alone: no file that appears later can change them.
ROW_SKIP_REASONS = frozenset({"job_id_missing", "not_finished", "advisor_not_single", "image_not_recorded"})


def screen(job: JobRow, loc: Locations, *, recover_html_cards: bool = True) -> Skip | str:
    """The linker's row and file checks for one job, without image decoding, cache or deduplication: the advisor
    it would link under, or why not. Cheap enough for a sensor."""
    outcome = _candidate(job, loc, LinkCache(None), recover_html_cards)
    return outcome if isinstance(outcome, Skip) else outcome.advisor


def _image_facts(paths: list[Path], cache: LinkCache, workers: int) -> dict[Path, ImageFacts]:
    facts: dict[Path, ImageFacts] = {}
    todo: list[tuple[Path, str | None]] = []
    for path in dict.fromkeys(paths):
        key = file_key("image", path)
        cached = cache.get(key)
        if cached is None:
            todo.append((path, key))
        else:
            facts[path] = ImageFacts(**cached)
    # Pillow releases the GIL while decoding and hashlib while hashing, so threads overlap the work.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for (path, key), fact in zip(todo, pool.map(inspect_image, [p for p, _ in todo])):
            facts[path] = fact
            cache.put(key, asdict(fact))
    return facts


def watched_paths(job: JobRow, loc: Locations) -> tuple[str, ...]:
    """Every file whose appearance, disappearance or change can alter how `job` links: the place its image name
    points to, and each place its analysis references (the analysis_md fallbacks included) are looked up."""
    advisor = _single_advisor(job.advisor)
    if not job.id or not job.finished or advisor is None:
        return ()
    paths = list(loc.image_lookups(job.filename)) if job.filename and job.filename.strip() else []
    for _, _, reference in _analysis_sources(job, advisor, loc):
        if reference is not None:
            paths += loc.analysis_lookups(reference)
    return tuple(dict.fromkeys(map(str, paths)))


def file_signature(path: str) -> tuple[int, int, int] | None:
    """(size, mtime, inode): any write, replacement or deletion changes it; None when the file is absent."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino


_RACY_NS = 1_000_000_000  # a folder changed this recently may change again within its mtime's resolution


def _folder_mtime(folder: str) -> int | None:
    try:
        return os.stat(folder).st_mtime_ns
    except (OSError, ValueError):
        return None


def _trusted(mtime: int | None, now_ns: int) -> int | None:
    """An mtime that proves "unchanged" next time; None (list the folder again next time) when too recent."""
    return None if mtime is None or now_ns - mtime < _RACY_NS else mtime


_FRAME_COLUMNS = ["app_rowid", *RECORD_COLUMNS, "image_error", "image_detail"]
_FRAME_NUMBERS = {"app_rowid": "int64", "width": "int64", "height": "int64", "overall_score": "float64", "json_size": "int64"}
# Text stays plain Python objects: the same dtype however the frame was put together (new, loaded, concatenated).
_FRAME_DTYPES = {column: _FRAME_NUMBERS.get(column, "object") for column in _FRAME_COLUMNS}
_OPTIONAL_TEXT = ("analysis_path", "created_at", "completed_at")


def _frame(rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame.from_records(rows, columns=_FRAME_COLUMNS).astype(_FRAME_DTYPES)


def _evaluate(rows: dict[int, JobRow], loc: Locations, cache: LinkCache, workers: int,
              recover_html_cards: bool) -> tuple[list[tuple], dict[int, Skip]]:  # fmt: skip
    """Each row becomes a skip, or a candidate with its image facts (deduplication comes later, over all jobs)."""
    skips: dict[int, Skip] = {}
    candidates: list[tuple[int, _Candidate]] = []
    for rowid, job in rows.items():
        outcome = _candidate(job, loc, cache, recover_html_cards)
        if isinstance(outcome, Skip):
            skips[rowid] = outcome
        else:
            candidates.append((rowid, outcome))
    facts = _image_facts([c.image_path for _, c in candidates], cache, workers)
    values = []
    for rowid, c in candidates:
        fact, analysis_json = facts[c.image_path], c.analysis.json
        values.append((
            rowid, c.job.id, c.advisor, str(c.image_path), fact.sha256, fact.width, fact.height, c.analysis_source,
            str(c.analysis_path) if c.analysis_path else None, analysis_json, c.analysis.overall_score,
            len(analysis_json or ""), c.job.created_at, c.job.completed_at, ",".join(c.analysis.derived_fields),
            fact.error, fact.detail,
        ))  # fmt: skip
    return values, skips


def _drop_repeated_ids(candidates: pd.DataFrame, early_skips: dict[int, Skip]) -> tuple[pd.DataFrame, dict[int, Skip]]:
    """`jobs.id` is the app's primary key: a later row with an id already seen is a copy, not a second example."""
    ids = sorted([(rowid, skip.job_id) for rowid, skip in early_skips.items()]
                 + list(zip(candidates["app_rowid"].tolist(), candidates["job_id"].tolist())), key=lambda r: r[0])  # fmt: skip
    first: dict[str | None, int] = {}
    repeated = {rowid for rowid, job_id in ids if first.setdefault(job_id, rowid) != rowid}
    if not repeated:
        return candidates, early_skips
    advisors = dict(zip(candidates["app_rowid"].tolist(), candidates["advisor"].tolist()))
    skips = dict(early_skips)
    for rowid, job_id in ids:
        if rowid in repeated:
            advisor = early_skips[rowid].advisor if rowid in early_skips else advisors[rowid]
            skips[rowid] = Skip(job_id, advisor, "duplicate_job_id", "an earlier row has the same id")
    return candidates[~candidates["app_rowid"].isin(repeated)], skips


def _finalize(candidates: pd.DataFrame, early_skips: dict[int, Skip]) -> tuple[pd.DataFrame, list[Skip]]:
    """Image checks and deduplication over every candidate at once, the same step for a full and an incremental
    link. Earliest job first, so a later re-analysis of the same picture never displaces the record already split."""
    candidates, early_skips = _drop_repeated_ids(candidates, early_skips)
    ordered = candidates.assign(_created=candidates["created_at"].fillna("")).sort_values(
        ["_created", "job_id"], kind="stable", ignore_index=True
    )
    unusable = ordered["image_error"].notna()
    too_small = ~unusable & (ordered[["width", "height"]].min(axis=1) < MIN_IMAGE_SIDE)
    usable = ~unusable & ~too_small
    content = ordered["advisor"] + "\0" + ordered["image_sha256"].fillna("")
    duplicate = pd.Series(False, index=ordered.index)
    duplicate[usable] = content[usable].duplicated()
    kept = usable & ~duplicate
    first_job = dict(zip(content[kept], ordered["job_id"][kept]))

    skips = [early_skips[rowid] for rowid in sorted(early_skips)]
    rejected = ordered[~kept].assign(is_unusable=unusable[~kept], is_small=too_small[~kept], content_key=content[~kept])
    for row in rejected.itertuples():
        if row.is_unusable:
            skips.append(Skip(row.job_id, row.advisor, row.image_error, row.image_detail))
        elif row.is_small:
            skips.append(Skip(row.job_id, row.advisor, "image_too_small", f"{row.width}x{row.height} px"))
        else:
            skips.append(Skip(row.job_id, row.advisor, "duplicate_image", f"same image content as job {first_job[row.content_key]}"))
    records = ordered.loc[kept, RECORD_COLUMNS].sort_values(["advisor", "job_id"], ignore_index=True)
    for column in _OPTIONAL_TEXT:  # concatenated frames mix NaN and None for a missing value: always None
        records[column] = records[column].astype(object).where(records[column].notna(), None)
    return records, skips


_FILE_COLUMNS = {"app_rowid": "int64", "folder": "object", "name": "object", "size": "int64", "mtime_ns": "int64", "inode": "int64"}
ABSENT = -1  # inode of a watched file that does not exist


def _files(rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame.from_records(rows, columns=list(_FILE_COLUMNS)).astype(_FILE_COLUMNS)


@dataclass
class LinkState:
    """What the last link saw, kept in our state DB so the next one reads only what changed."""

    cursor: JobCursor
    candidates: pd.DataFrame  # jobs past the row and file checks, with their image facts (before deduplication)
    early_skips: dict[int, Skip]  # app rowid -> why the job stopped before its image was inspected
    files: pd.DataFrame  # one row per (job, watched file): the file's signature before it was last read
    folders: dict[str, int | None]  # folder of an absent watched file -> its trusted mtime when last looked at

    @classmethod
    def empty(cls) -> LinkState:
        return cls(JobCursor(), _frame([]), {}, _files([]), {})

    def stale_jobs(self) -> tuple[set[int], int]:
        """Jobs with a watched file that changed, and how many files changed: present files by their signature,
        absent ones by listing only the folders whose mtime moved (there are many absent fallbacks)."""
        now = time.time_ns()
        listed: dict[str, list[str]] = {}
        for folder, mtime in self.folders.items():
            current = _folder_mtime(folder)
            if mtime is None or current != mtime:
                try:
                    listed[folder] = os.listdir(folder)
                except OSError:
                    listed[folder] = []
                self.folders[folder] = _trusted(current, now)
        files = self.files
        absent = files["inode"].to_numpy() == ABSENT
        changed = np.zeros(len(files), dtype=bool)
        for folder, names in listed.items():
            changed |= absent & (files["folder"] == folder).to_numpy() & files["name"].isin(names).to_numpy()
        present = np.flatnonzero(~absent)
        folders, names = files["folder"].to_numpy()[present].tolist(), files["name"].to_numpy()[present].tolist()
        known = zip(*(files[c].to_numpy()[present].tolist() for c in ("size", "mtime_ns", "inode")))
        for i, folder, name, signature in zip(present.tolist(), folders, names, known):
            if file_signature(folder + os.sep + name) != signature:
                changed[i] = True
        paths = set(zip(files["folder"].to_numpy()[changed], files["name"].to_numpy()[changed]))
        return set(files["app_rowid"].to_numpy()[changed].tolist()), len(paths)

    def forget(self, rowids: set[int]) -> None:
        """Drop what was known about `rowids` (rows re-read or deleted)."""
        self.candidates = self.candidates[~self.candidates["app_rowid"].isin(rowids)]
        self.files = self.files[~self.files["app_rowid"].isin(rowids)]
        for rowid in rowids:
            self.early_skips.pop(rowid, None)

    def watch(self, watched: dict[int, tuple[str, ...]]) -> None:
        """Record the files of the jobs about to be read, before they are read: a change while linking shows up
        next time. Folders are stat'ed before their files, for the same reason."""
        now = time.time_ns()
        paths = {p for paths in watched.values() for p in paths}
        new_folders = {os.path.dirname(p) for p in paths} - self.folders.keys()
        folder_mtimes = {folder: _folder_mtime(folder) for folder in new_folders}
        signatures = {p: file_signature(p) or (ABSENT, ABSENT, ABSENT) for p in paths}
        rows = []
        for rowid, job_paths in watched.items():
            for path in job_paths:
                folder, name = os.path.split(path)
                rows.append((rowid, folder, name, *signatures[path]))
                if signatures[path][2] == ABSENT and folder in folder_mtimes:
                    self.folders[folder] = _trusted(folder_mtimes[folder], now)
        if rows:
            self.files = pd.concat([self.files, _files(rows)], ignore_index=True)

    def add(self, candidates: list[tuple], early_skips: dict[int, Skip]) -> None:
        if candidates:
            self.candidates = pd.concat([self.candidates, _frame(candidates)], ignore_index=True)
        self.early_skips.update(early_skips)

    def persisted(self) -> tuple:
        """Everything but the candidates, which the store keeps as a base plus changes (a few folders repeat
        over every file: as a category they are stored once)."""
        files = self.files.astype({"folder": "category"})
        return self.cursor, self.early_skips, files, self.folders


_STATE_VERSION = 3


def _state_key(loc: Locations, recover_html_cards: bool) -> str:
    """A state from another app, other folders, another parser version or setting is never reused."""
    parts = [_STATE_VERSION, _ANALYSIS_KIND, _CARD_KIND, recover_html_cards, MIN_IMAGE_SIDE, _FRAME_COLUMNS,
             str(loc.db_path), str(loc.app_dir), str(loc.source_dir), str(loc.analysis_dir)]  # fmt: skip
    return hashlib.sha1(json.dumps(parts).encode()).hexdigest()


def _load_state(store: LinkStore, key: str) -> LinkState | None:
    loaded = store.load_state(key)
    if loaded is None:
        return None
    persisted, candidates = loaded
    try:
        cursor, early_skips, files, folders = persisted
        return LinkState(cursor, candidates, early_skips, files.astype(_FILE_COLUMNS), folders)
    except (TypeError, ValueError):  # another shape: a full link rewrites it
        return None


_PRELOAD_ABOVE = 500  # re-reading more jobs than this loads the whole content cache in one query


def link(conn: sa.Connection, loc: Locations, store: LinkStore | None = None, *, workers: int = 4,
         full: bool = False, recover_html_cards: bool = True) -> LinkResult:  # fmt: skip
    """Every job becomes a linked record or a Skip; one record per (advisor, image content).

    With a store, only what changed since the stored state is read: rows past its cursor or not finished then,
    rows gone, and jobs whose watched files changed; the result equals a full link's. `full`, no store or no
    usable state: every row and file is read (unchanged files still come from the content cache).
    `recover_html_cards`: read the older app's HTML cards (core/data/html_card.py) where no JSON analysis parses."""
    key = _state_key(loc, recover_html_cards)
    state = None if store is None or full else _load_state(store, key)
    with snapshot(conn):  # the app may be writing: every row read comes from one committed state
        changes = read_changed_jobs(conn, state.cursor if state else None, check_deletions=state is not None)
        rewrite = state is None or changes.reset
        if rewrite:
            state = LinkState.empty()
        gone: set[int] = set()
        if changes.deleted:
            gone = (set(state.early_skips) | set(state.candidates["app_rowid"])) - all_rowids(conn)
        stale, files_changed = state.stale_jobs()
        rows = dict(changes.rows)
        rows.update(read_jobs_by_rowid(conn, sorted(stale - rows.keys() - gone)))

    replaced = rows.keys() | gone
    state.forget(replaced)
    state.watch({rowid: watched_paths(job, loc) for rowid, job in rows.items()})
    cache = store.cache(preload=len(rows) > _PRELOAD_ABOVE) if store else LinkCache(None)
    candidates, early_skips = _evaluate(rows, loc, cache, workers, recover_html_cards)
    state.add(candidates, early_skips)
    state.cursor = changes.cursor

    records, skips = _finalize(state.candidates, state.early_skips)
    if store is not None:
        cache.flush()
        store.save_state(key, state.persisted(), state.candidates, _frame(candidates), removed=None if rewrite else replaced)
    return LinkResult(records, skips, cache.hits, cache.misses, jobs_read=len(rows), files_changed=files_changed)


def last_link(store: LinkStore, loc: Locations, *, recover_html_cards: bool = True) -> LinkState | None:
    """What the last link of this app (with that setting) saw, or None when nothing was linked yet."""
    return _load_state(store, _state_key(loc, recover_html_cards))


def _text_or_none(value: object) -> str | None:
    """pandas turns missing text into NaN; JSON wants null."""
    return value if isinstance(value, str) else None


def manifest(result: LinkResult, loc: Locations) -> dict:
    """The plan's training_data_manifest.json, plus where it came from and why rows were skipped."""
    by_advisor: dict[str, dict] = {}
    for advisor, group in result.records.groupby("advisor", sort=True):
        by_advisor[str(advisor)] = {
            "count": len(group),
            "records": [
                {
                    "job_id": r.job_id,
                    "image_path": r.image_path,
                    "analysis_path": _text_or_none(r.analysis_path),
                    "analysis_source": r.analysis_source,
                    "image_sha256": r.image_sha256,
                    "completed_at": _text_or_none(r.completed_at),
                    "json_size": int(r.json_size),
                    "overall_score": float(r.overall_score),
                    **({"derived_fields": r.derived_fields.split(",")} if r.derived_fields else {}),
                }
                for r in group.itertuples()
            ],
        }
    return {
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": {"db": str(loc.db_path), "app_dir": str(loc.app_dir)},
        "total_records": len(result.records),
        "by_advisor": by_advisor,
        "skipped": {
            "total": len(result.skips),
            "by_reason": result.skip_counts(),
            "records": [asdict(s) for s in result.skips],
        },
    }


def write_manifest(result: LinkResult, loc: Locations) -> dict:
    content = manifest(result, loc)
    atomic.write_json(loc.manifest_path, content)
    return content


def summary_text(content: dict) -> str:
    """The one-screen summary of a manifest that the CLI prints and the run log shows."""
    skipped = content["skipped"]
    lines = [f"linked {content['total_records']} records, skipped {skipped['total']} jobs"]
    lines += [f"  {adv:<12} {info['count']:>6} linked" for adv, info in content["by_advisor"].items()]
    lines += [f"  skip {reason:<28} {n:>6}" for reason, n in skipped["by_reason"].items()]
    return "\n".join(lines)
