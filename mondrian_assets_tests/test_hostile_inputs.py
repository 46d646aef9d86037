"""Hostile inputs from the app's side. Each case states its expected outcome: linked, skipped with a specific
reason, or a clear error; never a crash and never a partial write."""

import hashlib
import io
import json
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa
from PIL import Image

from mondrian_assets.core.data import app_db, linker
from mondrian_assets.core.data.job_changes import read_changed_jobs
from mondrian_assets.core.data.link_cache import LinkStore
from mondrian_assets.core.locations import Locations
from mondrian_assets.core.state_db import state_engine
from mondrian_assets.defs import linking
from mondrian_assets.defs.resources import MondrianDatabase

NAMES = ("Composition", "Lighting", "Focus & Sharpness", "Color Harmony", "Depth & Perspective", "Visual Balance",
         "Emotional Impact")  # fmt: skip


def read_jobs(conn) -> list:
    return list(read_changed_jobs(conn, None).rows.values())


def analysis(**changes) -> dict:
    data = {
        "image_description": "A grey test card.",
        "dimensions": [{"name": n, "score": 6.5, "comment": "Plain.", "recommendation": "Vary it."} for n in NAMES],
        "overall_score": 6.5,
        "key_strengths": ["Even tone"],
        "priority_improvements": ["More contrast"],
        "technical_notes": "Flat light.",
    }
    return data | changes


def jpeg(seed: int, size: tuple[int, int] = (64, 48), fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, ((seed * 37) % 256, (seed * 91) % 256, (seed * 53) % 256)).save(buffer, format=fmt)
    return buffer.getvalue()


class TinyApp:
    """A minimal app folder written row by row: the real jobs table shape, real image files."""

    def __init__(self, root: Path, *, primary_key: bool = True):
        self.root = root
        for folder in ("source", "uploads", "analysis_md"):
            (root / folder).mkdir(parents=True, exist_ok=True)
        self.db = root / "mondrian.db"
        key = "PRIMARY KEY" if primary_key else ""
        with sqlite3.connect(self.db) as db:
            db.execute(f"CREATE TABLE jobs (id TEXT {key}, filename TEXT, advisor TEXT, status TEXT, analysis_file TEXT, "
                       "analysis_markdown TEXT, llm_outputs TEXT, created_at TEXT, completed_at TEXT)")  # fmt: skip
        db.close()
        self._seed = 0

    def job(self, job_id, *, image: bytes | None = b"auto", filename: str | None = None, text=None, **columns) -> str:
        """A finished ansel job; by default a fresh image in source/ and a valid analysis in llm_outputs."""
        self._seed += 1
        filename = filename if filename is not None else f"photo-{self._seed}.jpg"
        if image is not None and filename:
            path = self.root / ("source" if "/" not in filename else "") / filename
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(jpeg(self._seed) if image == b"auto" else image)
        if text is None:
            text = json.dumps(analysis())
        row = {"id": job_id, "filename": filename, "advisor": "ansel", "status": "done",
               "llm_outputs": json.dumps({"response": text}) if isinstance(text, str) else None,
               "created_at": f"2025-01-01 00:00:{self._seed:02d}"} | columns  # fmt: skip
        with sqlite3.connect(self.db) as db:
            db.execute(f"INSERT INTO jobs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", list(row.values()))
        db.close()
        return job_id

    def link(self, home: Path) -> dict[str, str]:
        return link_outcomes(self.root, home)


def link_outcomes(app_dir: Path, home: Path) -> dict[str, str]:
    """job id -> 'linked' or its skip reason."""
    loc = Locations.resolve(app_dir=str(app_dir), home=str(home), environ={})
    with app_db.read_only_engine(loc.db_path, busy_timeout_s=0.5).connect() as conn:
        result = linker.link(conn, loc)
    outcome = {j: "linked" for j in result.records["job_id"]}
    for skip in result.skips:
        outcome.setdefault(skip.job_id, skip.reason)
    return outcome


@pytest.fixture
def app(tmp_path) -> TinyApp:
    return TinyApp(tmp_path / "app")


# --- the database ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"", b"\x00" * 4096, b"SQLite format 3\x00" + b"\xff" * 4000], ids=["empty", "zeros", "bad_header"])
def test_corrupt_database_is_a_clear_error(tmp_path, content):
    db = tmp_path / "mondrian.db"
    db.write_bytes(content)
    with pytest.raises(app_db.AppDatabaseError, match="not a readable SQLite database|no `jobs` table"):
        with app_db.read_only_engine(db).connect() as conn:
            read_jobs(conn)


def test_truncated_database_is_a_clear_error(app, tmp_path):
    for k in range(30):
        app.job(f"job-{k}", text=json.dumps(analysis()) + " " * 2000)  # enough rows for several pages
    truncated = tmp_path / "truncated.db"
    truncated.write_bytes(app.db.read_bytes()[: app.db.stat().st_size // 2])
    with pytest.raises(app_db.AppDatabaseError, match="malformed.*restore it from a backup"):
        with app_db.read_only_engine(truncated).connect() as conn:
            read_jobs(conn)


def test_database_locked_longer_than_the_timeout_is_a_clear_error(app):
    app.job("a")
    writer = sqlite3.connect(app.db, isolation_level=None)
    writer.execute("BEGIN EXCLUSIVE")
    writer.execute("UPDATE jobs SET status = 'processing'")
    try:
        with pytest.raises(app_db.AppDatabaseError, match=r"locked by another writer for more than 0.3 s.*busy_timeout_s"):
            with app_db.read_only_engine(app.db, busy_timeout_s=0.3).connect() as conn:
                read_jobs(conn)
    finally:
        writer.execute("ROLLBACK")
        writer.close()


def test_writer_releasing_within_the_timeout_is_waited_for(app):
    app.job("a")
    writer = sqlite3.connect(app.db, isolation_level=None, check_same_thread=False)
    writer.execute("BEGIN EXCLUSIVE")
    writer.execute("UPDATE jobs SET status = 'processing'")
    threading.Timer(0.3, lambda: (writer.execute("COMMIT"), writer.close())).start()
    with app_db.read_only_engine(app.db, busy_timeout_s=10).connect() as conn:
        assert [j.status for j in read_jobs(conn)] == ["processing"]  # the committed state, whole


def test_a_link_reads_one_committed_state_while_the_app_commits(app, tmp_path):
    """The app commits in the middle of a link (WAL mode: its writes never wait for our reads): the link's
    statements after that commit still see the state before it, so the result is a state the app really had."""
    with sqlite3.connect(app.db) as db:
        db.execute("PRAGMA journal_mode=WAL")
    db.close()
    app.job("done-1")
    app.job("running-2", status="processing")
    (app.root / "source" / "late.jpg").write_bytes(jpeg(99))
    loc = Locations.resolve(app_dir=str(app.root), home=str(tmp_path / "home"), environ={})
    store = LinkStore(state_engine(loc.state_db))
    engine = app_db.read_only_engine(loc.db_path)

    def linked() -> list[str]:
        with engine.connect() as conn:
            return sorted(linker.link(conn, loc, store).records["job_id"])

    assert linked() == ["done-1"]  # running-2 is held open: the next link reads it again
    writer = sqlite3.connect(app.db, isolation_level=None, check_same_thread=False)
    commits: list[str] = []

    def app_commits_once(_conn, _cursor, statement, *_args) -> None:
        if "rowid >" in statement and not commits:  # after the link's first read of new rows, before the rest
            writer.execute("BEGIN")  # one transaction: job 2 finishes as job 3 arrives finished
            writer.execute("UPDATE jobs SET status = 'done' WHERE id = 'running-2'")
            writer.execute("INSERT INTO jobs (id, filename, advisor, status, llm_outputs) VALUES (?, ?, ?, ?, ?)",
                           ("late-3", "late.jpg", "ansel", "done", json.dumps({"response": json.dumps(analysis())})))
            writer.execute("COMMIT")
            commits.append(statement)

    sa.event.listen(engine, "after_cursor_execute", app_commits_once)
    try:
        assert linked() == ["done-1"]  # before the commit: neither job 2 finished nor job 3 (never one of them)
    finally:
        sa.event.remove(engine, "after_cursor_execute", app_commits_once)
        writer.close()
    assert commits, "the app's commit must have come in the middle of the link"
    assert linked() == ["done-1", "late-3", "running-2"]  # the next link: the state after it, whole


# The app at work: job i arrives (processing) as job i-1 finishes, one transaction each.
_APP_AT_WORK = """import json, sqlite3, sys, time
db, count, analysis = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30), int(sys.argv[2]), sys.argv[3]
print("started", flush=True)
for i in range(count + 1):
    db.execute("BEGIN IMMEDIATE")
    db.execute("UPDATE jobs SET status = 'done' WHERE id = ?", (f"job-{i - 1:04d}",))
    if i < count:
        db.execute("INSERT INTO jobs (id, filename, advisor, status, llm_outputs) VALUES (?, ?, 'ansel', 'processing', ?)",
                   (f"job-{i:04d}", f"s{i}.jpg", analysis))
    db.execute("COMMIT")
    time.sleep(0.005)
"""


@pytest.mark.parametrize("journal", ["wal", "delete"])
def test_links_while_the_app_works_each_see_a_prefix_of_its_history(app, tmp_path, journal):
    """Incremental links, one after another while the app commits: each links exactly the jobs finished by
    some commit (a prefix of the app's history, never a later job without an earlier one), never fewer than the
    link before, and the last link, after the app stopped, all of them."""
    with sqlite3.connect(app.db) as db:
        db.execute(f"PRAGMA journal_mode={journal}")
    db.close()
    count = 150
    for i in range(count):
        (app.root / "source" / f"s{i}.jpg").write_bytes(jpeg(i))
    loc = Locations.resolve(app_dir=str(app.root), home=str(tmp_path / "home"), environ={})
    store = LinkStore(state_engine(loc.state_db))
    engine = app_db.read_only_engine(loc.db_path)

    def linked() -> list[str]:
        with engine.connect() as conn:
            return sorted(linker.link(conn, loc, store, workers=1).records["job_id"])

    text = json.dumps({"response": json.dumps(analysis())})
    writer = subprocess.Popen([sys.executable, "-c", _APP_AT_WORK, str(app.db), str(count), text],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert writer.stdout.readline().strip() == "started"
    sizes = []
    while writer.poll() is None:
        ids = linked()
        assert ids == [f"job-{i:04d}" for i in range(len(ids))]
        sizes.append(len(ids))
    assert writer.returncode == 0
    assert sizes == sorted(sizes) and len(set(sizes)) >= 3, sizes  # several links saw the app mid-way
    assert linked() == [f"job-{i:04d}" for i in range(count)]


def test_missing_jobs_table_is_a_clear_error(tmp_path):
    db = tmp_path / "mondrian.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE advisors (id TEXT)")
    conn.close()
    with pytest.raises(app_db.AppDatabaseError, match="no `jobs` table"):
        with app_db.read_only_engine(db).connect() as conn:
            read_jobs(conn)


def test_missing_columns_and_nulls_are_skip_reasons(app, tmp_path):
    sparse = tmp_path / "sparse"
    (sparse / "source").mkdir(parents=True)
    with sqlite3.connect(sparse / "mondrian.db") as db:
        db.execute("CREATE TABLE jobs (id TEXT, status TEXT)")  # every other column missing
        db.executemany("INSERT INTO jobs VALUES (?, ?)", [("s1", "done"), ("s2", None)])
    db.close()
    assert link_outcomes(sparse, tmp_path / "h1") == {"s1": "advisor_not_single", "s2": "not_finished"}

    with sqlite3.connect(app.db) as db:
        db.execute("INSERT INTO jobs DEFAULT VALUES")  # NULL in every column, the id too
        db.execute("INSERT INTO jobs (id, status) VALUES ('only-status', 'done')")
        db.execute("INSERT INTO jobs (id, status, advisor) VALUES ('no-file', 'completed', 'ansel')")
        db.execute("INSERT INTO jobs (id, status, advisor, filename) VALUES ('no-analysis', 'done', 'ansel', 'x.jpg')")
    db.close()
    (app.root / "source" / "x.jpg").write_bytes(jpeg(99))
    assert app.link(tmp_path / "h2") == {None: "job_id_missing", "only-status": "advisor_not_single",
                                         "no-file": "image_not_recorded", "no-analysis": "analysis_missing"}  # fmt: skip


def test_bytes_that_are_not_utf8_cost_only_their_row(app, tmp_path):
    good = app.job("good")
    text = json.dumps(analysis(image_description="Caf\u00e9 at dusk.")).encode().replace("\u00e9".encode(), b"\xe9")
    with sqlite3.connect(app.db) as db:
        db.execute("INSERT INTO jobs (id, status, advisor, filename, analysis_markdown) VALUES ('latin1', 'done', 'ansel', "
                   "'y.jpg', CAST(? AS TEXT))", (text,))  # fmt: skip
        db.execute("INSERT INTO jobs (id, status, advisor, filename) VALUES ('bad-name', 'done', 'ansel', CAST(? AS TEXT))",
                   (b"caf\xe9.jpg",))  # fmt: skip
    db.close()
    (app.root / "source" / "y.jpg").write_bytes(jpeg(98))
    outcome = app.link(tmp_path / "h")
    assert outcome == {good: "linked", "latin1": "linked", "bad-name": "image_not_found"}


# --- analyses ----------------------------------------------------------------------------------------------


def test_hostile_analyses_are_skipped_with_their_reason(app, tmp_path):
    nested = "[" * 100_000 + "]" * 100_000
    cases = {
        "several_mb_of_junk": ("x" * 5_000_000, "analysis_too_large"),
        "several_mb_of_braces": ("{" * 3_000_000, "analysis_too_large"),
        "large_but_valid": ("word " * 150_000 + json.dumps(analysis()), "linked"),
        "nan_score": (json.dumps(analysis(overall_score=float("nan"))), "analysis_schema_invalid"),
        "infinite_score": (json.dumps(analysis(dimensions=[{"name": "Lighting", "score": float("inf"), "comment": "c",
                                                            "recommendation": "r"}])), "analysis_schema_invalid"),  # fmt: skip
        "thousand_dimensions": (json.dumps(analysis(dimensions=[{"name": f"D{k}", "score": 5, "comment": "c",
                                                                  "recommendation": "r"} for k in range(1000)])),
                                "analysis_schema_invalid"),  # fmt: skip
        "deeply_nested": ('{"dimensions": ' + nested + "}", "analysis_invalid_json"),
        "nested_garbage": (json.dumps(analysis(dimensions=[{"name": {"x": [1, {"y": None}]}, "score": [7]}],
                                               key_strengths=[[["a"]]])), "analysis_schema_invalid"),  # fmt: skip
        "object_inside_a_list": (json.dumps([analysis()]), "linked"),  # the tolerant parser finds the one object
    }
    for job_id, (text, _) in cases.items():
        app.job(job_id, text=text)
    outcome = app.link(tmp_path / "h")
    assert outcome == {job_id: expected for job_id, (_, expected) in cases.items()}


def test_large_analysis_file_is_not_read(app, tmp_path):
    (app.root / "analysis_md" / "huge.json").write_bytes(b" " * (linker.MAX_ANALYSIS_CHARS + 1))
    app.job("huge-file", text=False, analysis_file="analysis_md/huge.json")
    assert app.link(tmp_path / "h") == {"huge-file": "analysis_too_large"}


# --- paths -------------------------------------------------------------------------------------------------


def test_paths_escaping_the_roots_are_skipped(app, tmp_path):
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "photo.jpg").write_bytes(jpeg(50))
    (secret / "analysis.json").write_text(json.dumps(analysis()))
    (app.root / "source" / "link.jpg").symlink_to(secret / "photo.jpg")
    (app.root / "analysis_md" / "link.json").symlink_to(secret / "analysis.json")
    app.job("dotdot_image", image=None, filename="../../secret/photo.jpg")
    app.job("absolute_image", image=None, filename=str(secret / "photo.jpg"))
    app.job("symlink_image", image=None, filename="link.jpg")
    app.job("dotdot_analysis", text=False, analysis_file="../secret/analysis.json")
    app.job("absolute_analysis", text=False, analysis_markdown=str(secret / "analysis.json"))
    app.job("symlink_analysis", text=False, analysis_file="analysis_md/link.json")
    assert app.link(tmp_path / "h") == {
        "dotdot_image": "path_outside_roots", "absolute_image": "path_outside_roots", "symlink_image": "path_outside_roots",
        "dotdot_analysis": "analysis_path_outside_roots", "absolute_analysis": "analysis_path_outside_roots",
        "symlink_analysis": "analysis_path_outside_roots",
    }  # fmt: skip


# --- images ------------------------------------------------------------------------------------------------


def _bomb() -> bytes:
    """A 12000x12000 PNG (144 megapixels) that compresses to a few hundred kilobytes."""
    buffer = io.BytesIO()
    Image.new("1", (12_000, 12_000)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_hostile_images_are_skipped_with_their_reason(app, tmp_path):
    whole = jpeg(7, size=(320, 240))
    cases = {
        "zero_bytes": (b"", "image_undecodable"),
        "truncated_jpeg": (whole[: len(whole) // 2], "image_undecodable"),
        "decompression_bomb": (_bomb(), "image_too_large"),
        "postscript": (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nshowpage\n", "image_undecodable"),
        "svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"/>', "image_undecodable"),
        "heic": (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64, "image_undecodable"),
        "gif": (jpeg(8, fmt="GIF"), "linked"),
        "webp": (jpeg(9, fmt="WEBP"), "linked"),
    }
    for job_id, (data, _) in cases.items():
        app.job(job_id, image=data, filename=f"{job_id}.img")
    outcome = app.link(tmp_path / "h")
    assert outcome == {job_id: expected for job_id, (_, expected) in cases.items()}


# --- ids and names -----------------------------------------------------------------------------------------


def test_duplicate_and_suffixed_job_ids(tmp_path):
    app = TinyApp(tmp_path / "app", primary_key=False)  # a copied table may have lost its primary key
    uuid = "3f2c9a4e-8d1b-4c6e-9f0a-2b7d5e1c8a90"
    app.job(uuid, filename="first.jpg")
    app.job(uuid, filename="second.jpg")  # the same id again, another image
    app.job(f"{uuid} (rag)", filename="rag.jpg")  # the app's suffixed id: its own job
    (app.root / "source" / "again.jpg").write_bytes((app.root / "source" / "first.jpg").read_bytes())
    app.job("other", image=None, filename="again.jpg")  # the first job's picture under another name
    loc = Locations.resolve(app_dir=str(app.root), home=str(tmp_path / "h"), environ={})
    with app_db.read_only_engine(loc.db_path).connect() as conn:
        result = linker.link(conn, loc)
    assert sorted(result.records["job_id"]) == [uuid, f"{uuid} (rag)"]
    assert result.records.set_index("job_id").loc[uuid, "image_path"].endswith("first.jpg")
    assert sorted((s.job_id, s.reason) for s in result.skips) == [(uuid, "duplicate_job_id"), ("other", "duplicate_image")]


def test_unicode_file_names_link(app, tmp_path):
    names = ["F\u00eate \u00e0 Montr\u00e9al \U0001f305.jpg", "uploads/9b1d7c1e_\u65e5\u672c\u8a9e \u0627\u0644\u0635\u0648\u0631\u0629.jpg"]
    ids = [app.job(f"u{k}", filename=name) for k, name in enumerate(names)]
    (app.root / "analysis_md" / "analysis-ansel-\u00e9t\u00e9.md").write_text(json.dumps(analysis()))
    ids.append(app.job("\u00e9t\u00e9", text=False))  # the fallback file's name carries the unicode id
    assert app.link(tmp_path / "h") == dict.fromkeys(ids, "linked")


# --- no partial writes -------------------------------------------------------------------------------------


def test_a_failed_link_leaves_the_previous_manifest_intact(pristine_demo, tmp_path, instance):
    app = tmp_path / "app"
    app.mkdir()
    (app / "mondrian.db").write_bytes(pristine_demo.app_dir.joinpath("mondrian.db").read_bytes())
    for folder in ("source", "uploads", "analysis_md"):
        (app / folder).symlink_to(pristine_demo.app_dir / folder)
    resource = MondrianDatabase(app_dir=str(app), home=str(tmp_path / "home"), busy_timeout_s=0.5)
    assert dg.materialize([linking.linked_records], resources={"mondrian_db": resource}, instance=instance).success
    manifest = resource.locations().manifest_path
    before = hashlib.sha256(manifest.read_bytes()).hexdigest()

    (app / "mondrian.db").write_bytes(b"SQLite format 3\x00" + b"\xff" * 4000)
    result = dg.materialize([linking.linked_records], resources={"mondrian_db": resource}, instance=instance, raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "not a readable SQLite database" in failure.event_specific_data.error.to_string()
    assert hashlib.sha256(manifest.read_bytes()).hexdigest() == before
    assert [p.name for p in manifest.parent.iterdir() if p.name.startswith(".")] == []  # no temp file left behind
