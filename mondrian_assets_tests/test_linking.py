import hashlib
import json
import os
import sqlite3
from pathlib import Path

import dagster as dg
import guards
import pandas as pd
import pytest
import sqlalchemy as sa

from mondrian_assets.core.data import app_db, linker
from mondrian_assets.core.data.job_changes import read_changed_jobs
from mondrian_assets.core.data.link_cache import LinkStore
from mondrian_assets.core.locations import Locations, PathRejected
from mondrian_assets.core.state_db import state_engine
from mondrian_assets.defs import linking
from mondrian_assets.defs.partitions import ADVISOR_PARTITIONS_NAME
from mondrian_assets.demo.app import append_demo_jobs, generate_demo_app

# What linking must do with each fault the demo generator plants (None: the job is linked).
EXPECTED = {
    "missing_image": "image_not_found",
    "missing_analysis": "analysis_missing",
    "fenced_json": None,
    "thinking_tags": None,
    "curly_quotes": None,
    "extra_brace": None,
    "truncated_json": "analysis_truncated_json",
    "invalid_json": "analysis_invalid_json",
    "missing_fields": "analysis_missing_fields",
    "score_out_of_range": "analysis_score_out_of_range",
    "six_dimensions": None,
    "nine_dimensions": None,
    "duplicate_image": "duplicate_image",
    "duplicate_job_same_file": "duplicate_image",
    "not_finished": "not_finished",
    "rag_suffix_id": None,
    "advisor_all": "advisor_not_single",
    "tiny_image": "image_too_small",
    "undecodable_image": "image_undecodable",
    "png_alpha": None,
    "exif_rotated": None,
    "path_traversal": "path_outside_roots",
    "absolute_path_outside": "path_outside_roots",
    "html_analysis": "analysis_html_card_incomplete",
    "html_error_card": "analysis_html_error_card",
    "analysis_in_html_card": None,
    "analysis_in_file_path": None,
    "analysis_in_markdown_text": None,
    "analysis_in_llm_outputs": None,
    "analysis_in_fallback_file": None,
    "analysis_file_column": None,
    "legacy_status_done": None,
    "uploads_path": None,
}


def link(loc: Locations, store: LinkStore | None = None, *, full: bool = False) -> linker.LinkResult:
    with app_db.read_only_engine(loc.db_path).connect() as conn:
        return linker.link(conn, loc, store, full=full)


def test_every_planted_fault_has_its_outcome(pristine_demo, tmp_path):
    loc = Locations.resolve(app_dir=str(pristine_demo.app_dir), home=str(tmp_path), environ={})
    result = link(loc)
    linked = set(result.records["job_id"])
    reasons = {s.job_id: s.reason for s in result.skips}
    assert set(EXPECTED) <= set(pristine_demo.planted), "the generator must plant every fault"
    # a storage-form case may also carry a fault; the fault decides its outcome
    faulty = {j for fault, expected in EXPECTED.items() if expected for j in pristine_demo.planted[fault]}
    for fault, expected in EXPECTED.items():
        for job_id in pristine_demo.planted[fault]:
            if expected is None and job_id in faulty:
                continue
            if expected is None:
                assert job_id in linked, f"{fault}: {job_id} should link, got {reasons.get(job_id)}"
            else:
                assert reasons.get(job_id) == expected, f"{fault}: {job_id}"
    # every job is accounted for exactly once
    assert len(linked) + len(result.skips) == pristine_demo.jobs_total
    assert result.advisor_counts()["ansel"] >= 60


def test_linked_analysis_is_the_canonical_form_of_what_the_app_stored(pristine_demo, tmp_path):
    loc = Locations.resolve(app_dir=str(pristine_demo.app_dir), home=str(tmp_path), environ={})
    records = link(loc).records
    truth = [json.loads(line) for line in (pristine_demo.app_dir / "demo_truth.jsonl").read_text().splitlines()]
    intended = {t["job_id"]: t["intended"] for t in truth}
    json_era = records[records["analysis_source"] != linker.HTML_CARD_SOURCE]  # cards: test_html_cards.py
    for job_id, analysis_json in zip(json_era["job_id"], json_era["analysis_json"]):
        assert analysis_json == intended[job_id], job_id
    # every way the app ever stored an analysis was read at least once
    assert {"llm_outputs.response", "analysis_markdown.text", "analysis_markdown.path", "analysis_file",
            "fallback_file", linker.HTML_CARD_SOURCE} <= set(records["analysis_source"])  # fmt: skip


@pytest.mark.parametrize("filename", ["../../etc/passwd", "/etc/hosts", "uploads/../../outside.jpg"])
def test_paths_outside_the_app_are_rejected_not_read(locations, filename):
    with pytest.raises(PathRejected):
        locations.image_path(filename)


def test_symlink_escaping_the_app_is_rejected(locations, tmp_path):
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(b"x")
    (locations.source_dir / "innocent.jpg").symlink_to(outside)
    with pytest.raises(PathRejected):
        locations.image_path("innocent.jpg")


def test_filename_forms_resolve_like_the_app(locations):
    assert locations.image_path("photo.jpg") == locations.source_dir / "photo.jpg"
    assert locations.image_path("uploads/a_b.jpg") == locations.app_dir / "uploads" / "a_b.jpg"


def test_read_only_engine_cannot_write(locations):
    with app_db.read_only_engine(locations.db_path).connect() as conn:
        with pytest.raises(sa.exc.OperationalError, match="readonly"):
            conn.exec_driver_sql("DELETE FROM jobs")


def test_missing_database_is_a_clear_error(tmp_path):
    with pytest.raises(app_db.AppDatabaseError, match="MONDRIAN_APP_DIR"):
        app_db.read_only_engine(tmp_path / "nope.db")


def test_legacy_era_database_links(tmp_path):
    demo = generate_demo_app(tmp_path / "legacy", seed=3, n_jobs=60, schema="legacy", large_images=False)
    loc = Locations.resolve(app_dir=str(demo.app_dir), home=str(tmp_path / "home"), environ={})
    with app_db.read_only_engine(loc.db_path).connect() as conn:
        assert "llm_outputs" not in app_db.table_columns(conn, "jobs")
    result = link(loc)
    assert len(result.records) > 20
    assert set(result.records["analysis_source"]) <= {"analysis_markdown.path", "analysis_markdown.text", "fallback_file", "html_card"}


def test_relink_after_new_jobs_opens_only_the_new_files(locations, tmp_path):
    store = LinkStore(state_engine(locations.state_db))
    first = link(locations, store)
    new_ids = append_demo_jobs(locations.app_dir, 10, seed=99)
    with guards.guarded(tmp_path / "opens.jsonl", watch=(locations.app_dir,)) as events:
        second = link(locations, store)
    assert set(new_ids) <= set(second.records["job_id"])
    assert len(second.records) == len(first.records) + 10

    opened = {e["open"] for e in events if "open" in e}
    old_files = {os.path.abspath(p) for column in ("image_path", "analysis_path")
                 for p in first.records[column].dropna()}  # fmt: skip
    assert old_files, "the first link must have linked files"
    assert not old_files & opened, "an unchanged file was opened again"
    new_records = second.records[second.records["job_id"].isin(new_ids)]
    assert {os.path.abspath(p) for p in new_records["image_path"]} <= opened  # and the new ones were read


def assert_same_link(a: linker.LinkResult, b: linker.LinkResult) -> None:
    pd.testing.assert_frame_equal(a.records, b.records)
    assert a.skips == b.skips


def test_relink_after_new_jobs_reads_only_the_new_rows_and_files(locations):
    store = LinkStore(state_engine(locations.state_db))
    first = link(locations, store)
    assert first.jobs_read > 100
    new_ids = append_demo_jobs(locations.app_dir, 10, seed=99)
    second = link(locations, store)
    assert set(new_ids) <= set(second.records["job_id"])
    assert len(second.records) == len(first.records) + 10
    unfinished = sum(s.reason == "not_finished" for s in first.skips)
    assert second.jobs_read == 10 + unfinished  # the new rows, and the rows that were not finished yet
    assert second.files_changed == 0  # appending touched no file an older job depends on
    # the new images, and at most one analysis file each, are all that was read
    assert 10 <= second.cache_misses <= 20
    assert_same_link(second, link(locations))


def test_incremental_link_equals_a_full_link_after_every_kind_of_change(locations, pristine_demo):
    """Rows appended, updated to finished, deleted, an earlier duplicate inserted; files written, replaced,
    changed in place and deleted: the incremental result must be the full link's, row for row, skip for skip."""
    store = LinkStore(state_engine(locations.state_db))
    first = link(locations, store)
    records = first.records.set_index("job_id")
    skipped = {s.job_id: s for s in first.skips}
    db = sqlite3.connect(locations.db_path)

    append_demo_jobs(locations.app_dir, 6, seed=5)
    # an analysis_md fallback file appears for a job that had none
    missing = pristine_demo.planted["missing_analysis"][0]
    advisor = skipped[missing].advisor
    (locations.analysis_dir / f"analysis-{advisor}-{missing}.md").write_text(records["analysis_json"].iloc[0])
    # a job that was still running finishes, with its analysis text in the row
    running = next(j for j, s in skipped.items() if s.reason == "not_finished" and s.advisor in ("ansel", "weston"))
    db.execute("UPDATE jobs SET status = 'completed', analysis_markdown = ? WHERE id = ?",
               (records["analysis_json"].iloc[1], running))  # fmt: skip
    # a linked job's row is deleted; another's image is deleted; a third's image is rewritten in place
    linked = list(records.index)
    db.execute("DELETE FROM jobs WHERE id = ?", (linked[2],))
    os.remove(records.loc[linked[3], "image_path"])
    Path(records.loc[linked[4], "image_path"]).write_bytes(b"not an image any more")
    # a linked job's analysis file is replaced by a broken one (a new inode, as an atomic save makes)
    with_file = records[records["analysis_path"].notna()].drop(linked[:5], errors="ignore")  # not a job changed above
    victim = Path(with_file["analysis_path"].iloc[0])
    (victim.parent / "tmp.md").write_text("{ broken")
    os.replace(victim.parent / "tmp.md", victim)
    # an earlier job with the same picture as a linked one: it wins the deduplication in a full link
    untouched = records.drop([*linked[:5], with_file.index[0]], errors="ignore")
    winner = untouched[untouched["image_path"].str.contains("/uploads/")].iloc[5]
    row = dict(db.execute("SELECT * FROM jobs WHERE id = ?", (winner.name,)).fetchone() and
               zip([c[0] for c in db.execute("SELECT * FROM jobs").description],
                   db.execute("SELECT * FROM jobs WHERE id = ?", (winner.name,)).fetchone()))  # fmt: skip
    row.update(id="earlier-twin", created_at="2000-01-01T00:00:00")
    db.execute(f"INSERT INTO jobs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", tuple(row.values()))
    db.commit()
    db.close()

    second = link(locations, store)
    full = link(locations)
    assert_same_link(second, full)
    reasons = {s.job_id: s.reason for s in second.skips}
    assert missing in set(second.records["job_id"]) and running in set(second.records["job_id"])
    assert linked[2] not in reasons and linked[2] not in set(second.records["job_id"])
    assert reasons[linked[3]] == "image_not_found" and reasons[linked[4]] == "image_undecodable"
    assert reasons[with_file.index[0]].startswith("analysis_")
    assert reasons[winner.name] == "duplicate_image" and "earlier-twin" in set(second.records["job_id"])
    assert second.jobs_read < 40 and second.files_changed >= 4
    # and a link with nothing new reads nothing but the unfinished rows
    third = link(locations, store)
    assert_same_link(third, full)
    assert third.files_changed == 0 and third.cache_misses == 0


def test_state_of_another_app_is_not_reused(locations, tmp_path, pristine_demo):
    store = LinkStore(state_engine(locations.state_db))
    link(locations, store)
    other = Locations.resolve(app_dir=str(pristine_demo.app_dir), home=str(locations.home), environ={})
    assert link(other, store).jobs_read == pristine_demo.jobs_total


def test_regenerated_app_database_is_linked_in_full(locations, tmp_path):
    store = LinkStore(state_engine(locations.state_db))
    link(locations, store)
    regenerated = generate_demo_app(locations.app_dir, seed=8, n_jobs=70, large_images=False)
    again = link(locations, store)
    assert again.jobs_read == regenerated.jobs_total
    assert_same_link(again, link(locations))


def test_changed_file_is_reread(locations):
    store = LinkStore(state_engine(locations.state_db))
    first = link(locations, store)
    victim = Path(first.records["image_path"].iloc[0])
    victim.write_bytes(b"not an image any more")
    second = link(locations, store)
    reasons = {s.job_id: s.reason for s in second.skips}
    assert reasons[first.records["job_id"].iloc[0]] == "image_undecodable"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_materialize_links_adds_partitions_and_leaves_the_app_untouched(locations, mondrian_db, instance):
    before = {p: sha256(p) for p in locations.app_dir.rglob("*") if p.is_file()}
    result = dg.materialize(
        [linking.linked_records, linking.enough_examples_per_advisor, linking.no_duplicate_images,
         linking.linked_paths_exist],
        resources={"mondrian_db": mondrian_db},
        instance=instance,
    )  # fmt: skip
    assert result.success
    after = {p: sha256(p) for p in locations.app_dir.rglob("*") if p.is_file()}
    assert after == before, "the app's DB and files must be byte-identical after a run"

    metadata = result.asset_materializations_for_node("linked_records")[0].metadata
    assert metadata["linked"].value > 80 and metadata["skipped"].value > 10
    assert {"linked_per_advisor", "skipped_per_reason", "preview", "manifest"} <= set(metadata)
    assert set(instance.get_dynamic_partitions(ADVISOR_PARTITIONS_NAME)) == {"ansel", "weston", "watkins", "okeefe"}

    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert checks["no_duplicate_images"].passed and checks["linked_paths_exist"].passed
    assert not checks["enough_examples_per_advisor"].passed  # weston, watkins, okeefe are below the plan's 60

    manifest = json.loads(locations.manifest_path.read_text())
    assert manifest["total_records"] == metadata["linked"].value
    record = manifest["by_advisor"]["ansel"]["records"][0]
    assert {"job_id", "image_path", "analysis_path", "completed_at", "json_size", "overall_score"} <= set(record)
    assert manifest["skipped"]["by_reason"]["not_finished"] >= 1


def test_app_database_busy_with_a_writer_is_waited_for(locations):
    writer = sqlite3.connect(locations.db_path)
    writer.execute("BEGIN IMMEDIATE")  # the app holds a write lock; readers still read in rollback-journal mode
    try:
        with app_db.read_only_engine(locations.db_path, busy_timeout_s=2).connect() as conn:
            assert len(read_changed_jobs(conn, None).rows) > 100
    finally:
        writer.rollback()
        writer.close()
