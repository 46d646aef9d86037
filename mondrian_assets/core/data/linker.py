"""Link finished jobs to their image and analysis through the app's DB, keeping a reason for every rejected row."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from mondrian_assets.core import atomic
from mondrian_assets.core.data.app_db import JobRow
from mondrian_assets.core.data.html_card import NOT_HTML, looks_like_html, recover_card
from mondrian_assets.core.data.images import ImageFacts, inspect_image
from mondrian_assets.core.data.link_cache import LinkCache, file_key
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


def link_jobs(
    jobs: list[JobRow], loc: Locations, cache: LinkCache, *, workers: int = 4, recover_html_cards: bool = True
) -> LinkResult:
    """Every finished job becomes a linked record or a Skip; one record per (advisor, image content).
    `recover_html_cards`: read the older app's HTML cards (core/data/html_card.py) where no JSON analysis parses."""
    skips: list[Skip] = []
    candidates: list[_Candidate] = []
    seen_ids: set[str | None] = set()
    for job in jobs:
        if job.id in seen_ids:  # `jobs.id` is the app's primary key; a copy of a row is not a second example
            skips.append(Skip(job.id, job.advisor, "duplicate_job_id", "an earlier row has the same id"))
            continue
        seen_ids.add(job.id)
        outcome = _candidate(job, loc, cache, recover_html_cards)
        (skips if isinstance(outcome, Skip) else candidates).append(outcome)

    facts = _image_facts([c.image_path for c in candidates], cache, workers)
    rows: list[dict] = []
    kept: dict[tuple[str, str], str] = {}
    # Earliest job first, so a later re-analysis of the same picture never displaces the record already split.
    for c in sorted(candidates, key=lambda c: (c.job.created_at or "", c.job.id)):
        fact = facts[c.image_path]
        if fact.error:
            skips.append(Skip(c.job.id, c.advisor, fact.error, fact.detail))
            continue
        if min(fact.width, fact.height) < MIN_IMAGE_SIDE:
            skips.append(Skip(c.job.id, c.advisor, "image_too_small", f"{fact.width}x{fact.height} px"))
            continue
        duplicate_of = kept.get((c.advisor, fact.sha256 or ""))
        if duplicate_of is not None:
            skips.append(Skip(c.job.id, c.advisor, "duplicate_image", f"same image content as job {duplicate_of}"))
            continue
        kept[(c.advisor, fact.sha256 or "")] = c.job.id
        response = c.analysis.json
        rows.append(
            {
                "job_id": c.job.id,
                "advisor": c.advisor,
                "image_path": str(c.image_path),
                "image_sha256": fact.sha256,
                "width": fact.width,
                "height": fact.height,
                "analysis_source": c.analysis_source,
                "analysis_path": str(c.analysis_path) if c.analysis_path else None,
                "analysis_json": response,
                "overall_score": c.analysis.overall_score,
                "json_size": len(response or ""),
                "created_at": c.job.created_at,
                "completed_at": c.job.completed_at,
                "derived_fields": ",".join(c.analysis.derived_fields),
            }
        )
    records = pd.DataFrame(rows, columns=RECORD_COLUMNS).sort_values(["advisor", "job_id"], ignore_index=True)
    cache.flush()
    return LinkResult(records, skips, cache.hits, cache.misses)


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
