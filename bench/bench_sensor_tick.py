"""Retrain sensor tick time with many jobs already seen vs few, measured side by side in one run.

Two copies of one generated demo app grow to --small and --large jobs by cloning its rows (new ids, the same
files; compact rows whose analysis is in a file): most clones link, about 1% are still running and 1% wait for an
analysis file, as in a real app. Each starts from the cursor a tick that had seen all of them leaves; then 10 new
finished jobs arrive (both app eras) and the same tick (the Dagster sensor, from the same cursor) is timed several
times. Prints the median tick time of each and the ratio large / small, which the issue asks to stay <= 2.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import dagster as dg

from mondrian_assets.core.data import app_db
from mondrian_assets.core.data.job_changes import read_changed_jobs
from mondrian_assets.core.data.linker import ROW_SKIP_REASONS, screen
from mondrian_assets.core.data.new_examples import WatchCursor, watch_signature
from mondrian_assets.core.locations import Locations
from mondrian_assets.defs import sensors
from mondrian_assets.defs.resources import MondrianDatabase, RetrainSettings
from mondrian_assets.demo.app import append_demo_jobs, generate_demo_app, load_truth


SEED_JOBS = 300  # the generated app the clones come from (its extras make it a few more rows)


def _templates(app: Path) -> dict[str, list[str]]:
    """Job ids to clone: compact linkable rows, rows still running, rows waiting for an analysis file."""
    kinds: dict[str, list[str]] = {"linkable": [], "running": [], "waiting": []}
    for t in load_truth(app):
        if t["status"] in ("completed", "done") and not t["planted"] and t["storage"] == "analysis_file_column":
            kinds["linkable"].append(t["job_id"])
        elif "not_finished" in t["planted"]:
            kinds["running"].append(t["job_id"])
        elif "missing_analysis" in t["planted"]:
            kinds["waiting"].append(t["job_id"])
    return kinds


def grow(app: Path, total: int) -> None:
    """Clone rows until the jobs table has `total` rows: 98% linkable, 1% running, 1% waiting."""
    kinds = _templates(app)
    db = sqlite3.connect(app / "mondrian.db")
    columns = [r[1] for r in db.execute("PRAGMA table_info(jobs)")]
    rows = {kind: [db.execute("SELECT * FROM jobs WHERE id = ?", (i,)).fetchone() for i in ids] for kind, ids in kinds.items()}
    have = db.execute("SELECT count(*) FROM jobs").fetchone()[0]
    clones = []
    for k in range(total - have):
        kind = "running" if k % 100 == 0 else "waiting" if k % 100 == 1 else "linkable"
        row = list(rows[kind][k % len(rows[kind])])
        row[columns.index("id")] = str(uuid.UUID(int=k + 1))
        clones.append(row)
    db.executemany(f"INSERT INTO jobs VALUES ({', '.join('?' * len(columns))})", clones)
    db.commit()
    db.close()


def seen_cursor(loc: Locations, generated: int) -> str:
    """The cursor a tick leaves after seeing every job: read position, running rows, jobs waiting for a file.
    The generated rows are screened as a tick screens them; a clone waits exactly when it has no analysis."""
    with app_db.read_only_engine(loc.db_path).connect() as conn:
        changes = read_changed_jobs(conn, None)
    waiting = {}
    for rowid in sorted(changes.finished_rowids):
        job = changes.rows[rowid]
        if rowid <= generated:
            verdict = screen(job, loc)
            waits = not isinstance(verdict, str) and verdict.reason not in ROW_SKIP_REASONS
        else:
            waits = job.llm_outputs is None and job.analysis_file is None and job.analysis_markdown is None
        if waits:
            waiting[rowid] = watch_signature(job, loc)
    return WatchCursor(changes.cursor, waiting).encode()


def tick(instance, loc: Locations, cursor: str) -> tuple[float, int]:
    resources = {"mondrian_db": MondrianDatabase(app_dir=str(loc.app_dir), home=str(loc.home)),
                 "retrain_settings": RetrainSettings(min_new_examples=5)}  # fmt: skip
    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources)
    started = time.perf_counter()
    result = sensors.retrain_sensor(context)
    return time.perf_counter() - started, len(result.run_requests)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=1_000, help="jobs seen in the small app (default 1000)")
    parser.add_argument("--large", type=int, default=100_000, help="jobs seen in the large app (default 100000)")
    parser.add_argument("--repeats", type=int, default=15, help="ticks timed per app (the median counts)")
    parser.add_argument("--workdir", type=Path, help="where to generate (default: a temp dir)")
    args = parser.parse_args()

    root = args.workdir or Path(tempfile.mkdtemp(prefix="bench-sensor-"))
    generated = generate_demo_app(root / "seed", seed=11, n_jobs=SEED_JOBS, large_images=False).jobs_total
    apps = {}
    for name, total in (("small", args.small), ("large", args.large)):
        shutil.copytree(root / "seed", root / name)
        grow(root / name, total)
        loc = Locations.resolve(app_dir=str(root / name), home=str(root / f"{name}-home"), environ={})
        apps[name] = (loc, seen_cursor(loc, generated))
        append_demo_jobs(loc.app_dir, 10, seed=5, both_eras=True)
    times: dict[str, list[float]] = {name: [] for name in apps}
    requests: dict[str, int] = {}
    with dg.instance_for_test() as instance:
        for name in apps:  # warm imports, the instance and the file cache once
            tick(instance, *apps[name])
        for _ in range(args.repeats):  # alternate, so a change in the machine's load hits both alike
            for name, (loc, cursor) in apps.items():
                seconds, requests[name] = tick(instance, loc, cursor)
                times[name].append(seconds)
    results = {name: (statistics.median(times[name]), requests[name]) for name in apps}
    for name, (seconds, requests_made) in results.items():
        total = args.small if name == "small" else args.large
        print(f"{total:>7} jobs seen, 10 new: tick {seconds * 1000:7.1f} ms (median of {args.repeats}), "
              f"{requests_made} run request(s), cursor {len(apps[name][1])} bytes")
    ratio = results["large"][0] / results["small"][0]
    print(f"ratio tick({args.large} seen) / tick({args.small} seen): {ratio:.2f}x")
    print(json.dumps({"large_over_small": round(ratio, 2)}))


if __name__ == "__main__":
    main()
