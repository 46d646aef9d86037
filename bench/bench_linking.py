"""Linking speed, measured side by side in one run on a generated app database.

Prints three ratios:
  full link / incremental link   after N new jobs land (a re-link reads only the rows past its cursor, the rows
                                 not finished last time and the jobs whose files changed; same result)
  naive link / full link         a one-file-at-a-time linker (a DB query per job, a full decode per image,
                                 no threads, no cache), like the plan's original link script
Both linkers must agree on which jobs link; the script fails loudly otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sqlite3
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageOps

from mondrian_assets.core.data import app_db, linker
from mondrian_assets.core.data.link_cache import LinkCache, LinkStore
from mondrian_assets.core.locations import Locations, PathRejected
from mondrian_assets.core.state_db import state_engine
from mondrian_assets.demo.app import append_demo_jobs, generate_demo_app


def ours(loc: Locations, use_cache: bool) -> tuple[float, linker.LinkResult]:
    started = time.perf_counter()
    store = LinkStore(state_engine(loc.state_db)) if use_cache else None
    with app_db.read_only_engine(loc.db_path).connect() as conn:
        result = linker.link(conn, loc, store)
    return time.perf_counter() - started, result


def naive(loc: Locations) -> tuple[float, set[str]]:
    """One job at a time: query it, find and parse its analysis, then read, fully decode and hash its image."""
    started = time.perf_counter()
    # the same order ours dedupes in (earliest job first), so both keep the same job of a duplicated image
    query = "SELECT id FROM jobs ORDER BY coalesce(created_at, ''), id"
    ids = [r[0] for r in sqlite3.connect(f"file:{loc.db_path}?mode=ro", uri=True).execute(query)]
    linked: set[str] = set()
    seen: set[tuple[str, bytes]] = set()
    for job_id in ids:
        conn = sqlite3.connect(f"file:{loc.db_path}?mode=ro", uri=True)
        conn.row_factory = sqlite3.Row
        row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        conn.close()
        job = app_db.JobRow(**{k: (None if row[k] is None else str(row[k])) for k in app_db.JobRow.__dataclass_fields__ if k in row.keys()})
        candidate = linker._candidate(job, loc, LinkCache(None), recover_html_cards=True)
        if isinstance(candidate, linker.Skip):
            continue
        try:
            data = candidate.image_path.read_bytes()
            with Image.open(candidate.image_path) as img:
                upright = ImageOps.exif_transpose(img)
                upright.load()
                if min(upright.size) < linker.MIN_IMAGE_SIDE:
                    continue
        except (OSError, PathRejected):
            continue
        key = (candidate.advisor, hashlib.sha256(data).digest())
        if key in seen:
            continue
        seen.add(key)
        linked.add(job_id)
    return time.perf_counter() - started, linked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=20000, help="jobs in the generated app DB (default 20000)")
    parser.add_argument("--new", type=int, default=10, help="jobs added before the incremental link (default 10)")
    parser.add_argument("--workdir", type=Path, help="where to generate (default: a temp dir)")
    args = parser.parse_args()

    root = args.workdir or Path(tempfile.mkdtemp(prefix="bench-linking-"))
    t0 = time.perf_counter()
    generate_demo_app(root / "app", seed=11, n_jobs=args.jobs, large_images=False)
    print(f"generated {args.jobs} jobs in {time.perf_counter() - t0:.1f} s under {root}")
    loc = Locations.resolve(app_dir=str(root / "app"), home=str(root / "home"), environ={})

    t_full, full = ours(loc, use_cache=True)  # cold cache: a full link
    append_demo_jobs(loc.app_dir, args.new, seed=12)
    t_incr, incr = ours(loc, use_cache=True)
    t_ours, ours_result = ours(loc, use_cache=False)
    if not (incr.records.equals(ours_result.records) and incr.skips == ours_result.skips):
        raise SystemExit("the incremental link differs from a full link")
    t_naive, naive_linked = naive(loc)

    ours_linked = set(ours_result.records["job_id"])
    if ours_linked != naive_linked:
        raise SystemExit(f"linkers disagree: {len(ours_linked ^ naive_linked)} jobs differ")
    rows = {
        "full link (cold cache)": t_full,
        f"incremental link (+{args.new} jobs)": t_incr,
        "full link (no cache)": t_ours,
        "naive one-at-a-time link": t_naive,
    }
    for name, seconds in rows.items():
        print(f"{name:<32} {seconds:8.2f} s")
    print(f"linked {len(incr.records)} of {args.jobs + args.new} jobs; the incremental link read {incr.jobs_read} rows "
          f"and {incr.cache_misses} new files or texts")
    print(f"ratio full / incremental: {t_full / t_incr:6.1f}x")
    print(f"ratio naive / full (no cache): {t_naive / t_ours:6.1f}x")
    print(json.dumps({"full_over_incremental": round(t_full / t_incr, 2), "naive_over_full": round(t_naive / t_ours, 2)}))


if __name__ == "__main__":
    main()
