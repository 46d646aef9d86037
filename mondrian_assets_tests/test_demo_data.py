"""The demo-data generator: determinism, counts, every planted fault, storage forms, images, learnability."""

from __future__ import annotations

import io
import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps, UnidentifiedImageError

from mondrian_assets.core.data.html_card import looks_like_html, recover_card
from mondrian_assets.core.schema import SCORE_MAX, SCORE_MIN, canonical_json, example_scores_in_prompt, parse_analysis
from mondrian_assets.demo import app as dd
from mondrian_assets.demo import images as di

FINISHED = ("completed", "done")


# --- helpers -------------------------------------------------------------------------------------------------


def _rows(app: Path) -> list[dict]:
    with sqlite3.connect(app / dd.DB_NAME) as db:
        db.row_factory = sqlite3.Row
        rows = [dict(r) for r in db.execute("SELECT * FROM jobs ORDER BY id")]
    db.close()
    return rows


def _columns(app: Path, table: str = "jobs") -> list[str]:
    with sqlite3.connect(app / dd.DB_NAME) as db:
        cols = [r[1] for r in db.execute(f"PRAGMA table_info({table})")]
    db.close()
    return cols


def _stored_text(app: Path, row: dict) -> str | None:
    """A minimal reader of every storage form (the real one lives in the pipeline, not here)."""
    if row.get("analysis_file"):
        return (app / row["analysis_file"]).read_text(encoding="utf-8")
    markdown = row.get("analysis_markdown")
    if markdown and markdown.startswith("analysis_md/"):
        return (app / markdown).read_text(encoding="utf-8")
    if markdown and markdown.startswith("#"):
        return markdown
    if row.get("llm_outputs"):
        outputs = json.loads(row["llm_outputs"])
        if isinstance(outputs.get("response"), str):
            return outputs["response"]
    fallback = app / "analysis_md" / f"analysis-{row['advisor']}-{row['id']}.md"
    if fallback.is_file():
        return fallback.read_text(encoding="utf-8")
    return markdown  # HTML or nothing


def _files(app: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(app)): p.read_bytes()
        for sub in ("source", "uploads", "analysis_md")
        for p in sorted((app / sub).rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dd.DemoSummary]:
    app = tmp_path_factory.mktemp("demo") / "app"
    return app, dd.generate_demo_app(app)


@pytest.fixture(scope="module")
def truth(demo: tuple[Path, dd.DemoSummary]) -> dict[str, dict]:
    return {t["job_id"]: t for t in dd.load_truth(demo[0])}


@pytest.fixture(scope="module")
def rows(demo: tuple[Path, dd.DemoSummary]) -> dict[str, dict]:
    return {r["id"]: r for r in _rows(demo[0])}


# --- layout, determinism, counts -----------------------------------------------------------------------------


def test_layout_and_manifest(demo: tuple[Path, dd.DemoSummary]) -> None:
    app, summary = demo
    for name in (dd.DB_NAME, "source", "uploads", "analysis_md", dd.MANIFEST_NAME, dd.TRUTH_NAME):
        assert (app / name).exists(), name
    manifest = json.loads((app / dd.MANIFEST_NAME).read_text())
    assert manifest["jobs_total"] == summary.jobs_total == len(_rows(app))
    assert manifest["completed_by_advisor"] == summary.completed_by_advisor
    assert manifest["planted"] == summary.planted
    assert summary.db_path == app.absolute() / dd.DB_NAME


def test_same_seed_gives_identical_rows_and_bytes(demo: tuple[Path, dd.DemoSummary], tmp_path: Path) -> None:
    app, summary = demo
    again = dd.generate_demo_app(tmp_path / "again")
    assert _rows(app) == _rows(tmp_path / "again")
    assert _files(app) == _files(tmp_path / "again")
    assert again.planted == summary.planted and again.completed_by_advisor == summary.completed_by_advisor
    assert dd.load_truth(app) == dd.load_truth(tmp_path / "again")


def test_other_seed_differs(tmp_path: Path) -> None:
    a = dd.generate_demo_app(tmp_path / "a", seed=1, n_jobs=60, large_images=False)
    b = dd.generate_demo_app(tmp_path / "b", seed=2, n_jobs=60, large_images=False)
    assert {r["id"] for r in _rows(a.app_dir)}.isdisjoint({r["id"] for r in _rows(b.app_dir)})


def test_advisor_counts(demo: tuple[Path, dd.DemoSummary], rows: dict[str, dict], truth: dict[str, dict]) -> None:
    counts = demo[1].completed_by_advisor
    assert counts["ansel"] >= 150 and counts["weston"] >= 100
    assert 8 <= counts["watkins"] <= 14
    assert counts["okeefe"] == 3
    assert "cunningham" not in counts
    okeefe = [t for t in truth.values() if t["advisor"] == "okeefe"]
    assert all(not t["planted"] and t["intended"] and t["image"] for t in okeefe)
    finished = [r for r in rows.values() if r["status"] in FINISHED]
    assert 290 <= len(finished) <= 320


def test_advisors_and_config_tables(demo: tuple[Path, dd.DemoSummary]) -> None:
    app = demo[0]
    assert _columns(app, "advisors") == ["id", "name", "bio", "prompt", "category"]
    with sqlite3.connect(app / dd.DB_NAME) as db:
        advisors = {r[0]: r for r in db.execute("SELECT * FROM advisors")}
        system_prompt = db.execute("SELECT value FROM config WHERE key = 'system_prompt'").fetchone()[0]
    db.close()
    expected = {"ansel", "watkins", "weston", "cunningham", "gilpin", "okeefe", "mondrian", "vangogh", "gehry"}
    assert set(advisors) == expected
    assert all(r[1] and r[2] and r[3] and r[4] for r in advisors.values())
    # No example score for a model to copy (the app's old prompt showed 7.4).
    assert not example_scores_in_prompt(system_prompt)
    assert "{" not in system_prompt


def test_refuses_foreign_non_empty_dir(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a previous demo app"):
        dd.generate_demo_app(tmp_path, n_jobs=60)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_regenerating_replaces_previous_demo(tmp_path: Path) -> None:
    app = tmp_path / "app"
    first = dd.generate_demo_app(app, seed=1, n_jobs=60, large_images=False)
    (app / "uploads" / "stray.jpg").write_bytes(b"x")
    second = dd.generate_demo_app(app, seed=2, n_jobs=60, large_images=False)
    assert not (app / "uploads" / "stray.jpg").exists()
    assert {r["id"] for r in _rows(app)} == {t["job_id"] for t in dd.load_truth(app)}
    assert first.planted != second.planted


def test_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        dd.generate_demo_app(tmp_path / "x", schema="v3")
    with pytest.raises(ValueError):
        dd.generate_demo_app(tmp_path / "y", n_jobs=10)


# --- planted faults and storage forms -------------------------------------------------------------------------


def test_every_planted_key_present(demo: tuple[Path, dd.DemoSummary], rows: dict[str, dict]) -> None:
    planted = demo[1].planted
    assert set(planted) == set(dd.PLANTED_KEYS)
    for key in dd.PLANTED_KEYS:
        assert planted[key], key
        assert all(job_id in rows for job_id in planted[key]), key


def test_valid_analyses_parse_to_the_intended_one(
    demo: tuple[Path, dd.DemoSummary], rows: dict[str, dict], truth: dict[str, dict]
) -> None:
    app = demo[0]
    valid = [t for t in truth.values() if t["intended"] and t["storage"] != "analysis_in_html_card"]
    assert len(valid) >= 100
    for t in valid:
        result = parse_analysis(_stored_text(app, rows[t["job_id"]]))
        assert result.ok, (t["job_id"], t["storage"], t["style"], result.error, result.detail)
        assert canonical_json(result.analysis) == t["intended"], t["job_id"]


@pytest.mark.parametrize("key", dd.STORAGE_FORMS)
def test_storage_forms_are_stored_as_named(
    key: str, demo: tuple[Path, dd.DemoSummary], rows: dict[str, dict], truth: dict[str, dict]
) -> None:
    app = demo[0]
    for job_id in demo[1].planted[key]:
        row, t = rows[job_id], truth[job_id]
        assert t["intended"] is not None
        fallback = app / "analysis_md" / f"analysis-{row['advisor']}-{job_id}.md"
        if key == "analysis_in_file_path":
            assert row["analysis_markdown"].startswith("analysis_md/")
            assert (app / row["analysis_markdown"]).is_file()
        elif key == "analysis_in_markdown_text":
            assert row["analysis_markdown"].startswith(f"# {dd.ADVISORS.get(row['advisor'], dd._GENERIC).name}")
            assert "\n## Summary\n" in row["analysis_markdown"] and "\n## Full Analysis\n" in row["analysis_markdown"]
        elif key == "analysis_in_llm_outputs":
            outputs = json.loads(row["llm_outputs"])
            assert set(outputs) == {"prompt", "response", "summary", "model", "timestamp"}
            assert row["analysis_markdown"] is None and row["analysis_file"] is None
        elif key == "analysis_in_fallback_file":
            assert fallback.is_file()
            assert row["analysis_markdown"] is None and row["llm_outputs"] is None and row["analysis_file"] is None
        elif key == "analysis_file_column":
            assert (app / row["analysis_file"]).is_file() and row["analysis_markdown"] is None
        elif key == "analysis_in_html_card":
            assert row["status"] == "done" and row["analysis_markdown"].startswith('<div class="analysis-card"')
            assert "How to Improve:" in row["analysis_markdown"] and "Overall Grade" in row["analysis_markdown"]


def test_older_llm_outputs_hold_html_only(rows: dict[str, dict]) -> None:
    older = [r for r in rows.values() if r["status"] == "done" and r["llm_outputs"]]
    assert older
    shapes = set()
    for row in older:
        outputs = json.loads(row["llm_outputs"])
        for value in outputs.values():
            page = value if isinstance(value, str) else value["html"]
            shapes.add(type(value).__name__)
            assert page.startswith("<div") and "{" not in page
    assert shapes == {"str", "dict"}


@pytest.mark.parametrize(
    ("key", "code"),
    [
        ("truncated_json", "truncated_json"),
        ("invalid_json", "invalid_json"),
        ("missing_fields", "missing_fields"),
        ("score_out_of_range", "score_out_of_range"),
        ("html_analysis", "no_json"),
        ("html_error_card", "no_json"),
    ],
)
def test_broken_analyses_fail_with_their_code(
    key: str, code: str, demo: tuple[Path, dd.DemoSummary], rows: dict[str, dict], truth: dict[str, dict]
) -> None:
    for job_id in demo[1].planted[key]:
        result = parse_analysis(_stored_text(demo[0], rows[job_id]))
        assert not result.ok and result.error == code, (job_id, result.error, result.detail)
        assert truth[job_id]["expected_error"] == code and truth[job_id]["intended"] is None


def test_missing_analysis_is_nowhere(demo: tuple[Path, dd.DemoSummary], rows: dict[str, dict]) -> None:
    app = demo[0]
    for job_id in demo[1].planted["missing_analysis"]:
        row = rows[job_id]
        assert row["status"] in FINISHED
        assert row["analysis_markdown"] is None and row["llm_outputs"] is None and row["analysis_file"] is None
        assert not (app / "analysis_md" / f"analysis-{row['advisor']}-{job_id}.md").exists()
        assert parse_analysis(_stored_text(app, row)).error == "empty"


@pytest.mark.parametrize(
    ("key", "marker"),
    [("fenced_json", "```json"), ("thinking_tags", "<thinking>"), ("curly_quotes", "\u201c"), ("extra_brace", "}\n}")],
)
def test_raw_output_shapes_are_present_and_parse(
    key: str, marker: str, demo: tuple[Path, dd.DemoSummary], rows: dict[str, dict], truth: dict[str, dict]
) -> None:
    for job_id in demo[1].planted[key]:
        text = _stored_text(demo[0], rows[job_id])
        assert text is not None and marker in text
        result = parse_analysis(text)
        assert result.ok and canonical_json(result.analysis) == truth[job_id]["intended"]


def test_pretty_and_compact_outputs_both_occur(demo: tuple[Path, dd.DemoSummary], truth: dict[str, dict]) -> None:
    styles = {t["style"] for t in truth.values() if t["intended"]}
    assert {"compact", "pretty"} <= styles


@pytest.mark.parametrize(("key", "count"), [("six_dimensions", 6), ("nine_dimensions", 9)])
def test_six_and_nine_dimension_analyses_are_valid(
    key: str, count: int, demo: tuple[Path, dd.DemoSummary], rows: dict[str, dict]
) -> None:
    for job_id in demo[1].planted[key]:
        text = _stored_text(demo[0], rows[job_id])
        parsed = recover_card(text).result if looks_like_html(text) else parse_analysis(text)  # the older app's cards
        analysis = parsed.analysis
        assert analysis is not None and len(analysis.dimensions) == count
        names = {d.name for d in analysis.dimensions}
        assert ("Color Harmony" in names) == (count == 9)
        assert ({"Subject Isolation", "Subject Matter"} <= names) == (count == 9)


def test_scores_and_overall(truth: dict[str, dict]) -> None:
    for t in truth.values():
        if not t["intended"]:
            continue
        data = json.loads(t["intended"])
        scores = [d["score"] for d in data["dimensions"]]
        assert all(3 <= s <= 10 and s * 2 == int(s * 2) for s in scores)
        assert SCORE_MIN <= data["overall_score"] <= SCORE_MAX
        # the overall grade: the mean of the tonal dimensions (every dimension set has them), in half points
        tonal = [d["score"] for d in data["dimensions"] if d["name"] in ("Lighting", "Depth & Perspective", "Emotional Impact")]
        assert len(tonal) == 3 and data["overall_score"] == round(2 * sum(tonal) / 3) / 2
        assert len(data["key_strengths"]) == 2 and len(data["priority_improvements"]) == 2


def test_canonical_length_stays_short(truth: dict[str, dict]) -> None:
    lengths = [len(t["intended"]) for t in truth.values() if t["intended"]]
    assert 700 <= float(np.mean(lengths)) <= 1150
    assert max(lengths) <= 1400


def test_row_shapes_of_both_eras(demo: tuple[Path, dd.DemoSummary], rows: dict[str, dict]) -> None:
    planted = demo[1].planted
    assert _columns(demo[0]) == list(dd.CURRENT_COLUMNS)
    for job_id in planted["legacy_status_done"]:
        name = rows[job_id]["filename"]
        assert rows[job_id]["status"] == "done"
        if job_id not in planted["path_traversal"] + planted["absolute_path_outside"]:
            assert "/" not in name and (name.startswith(("photo-", "mike-shrub-", "screenshot-")))
    for job_id in planted["uploads_path"]:
        assert rows[job_id]["filename"].startswith("uploads/")
    statuses = {rows[j]["status"] for j in planted["not_finished"]}
    assert statuses == set(dd.UNFINISHED_STATUSES)
    assert all(rows[j]["error"] for j in planted["not_finished"] if rows[j]["status"] in ("failed", "error"))
    assert all(j.endswith(" (rag)") and rows[j]["enable_rag"] == 1 for j in planted["rag_suffix_id"])
    assert {rows[j]["advisor"] for j in planted["advisor_all"]} == {"all", "random", "ansel,weston"}
    assert any(r["completed_at"] is None for r in rows.values() if r["status"] in FINISHED)
    assert any(r["completed_at"] for r in rows.values() if r["status"] in FINISHED)


# --- images ----------------------------------------------------------------------------------------------------


def test_image_faults(demo: tuple[Path, dd.DemoSummary], rows: dict[str, dict], truth: dict[str, dict]) -> None:
    app, planted = demo[0], demo[1].planted
    for job_id in planted["missing_image"]:
        name = rows[job_id]["filename"]
        assert not (app / name).exists() and not (app / "source" / name).exists()
    assert {rows[j]["filename"] for j in planted["path_traversal"]} == {"../../etc/passwd"}
    assert {rows[j]["filename"] for j in planted["absolute_path_outside"]} == {"/etc/hosts"}
    for job_id in planted["undecodable_image"]:
        with pytest.raises(UnidentifiedImageError):
            Image.open(app / truth[job_id]["image"])
    for job_id in planted["tiny_image"]:
        with Image.open(app / truth[job_id]["image"]) as im:
            assert im.format == "PNG" and im.size == (1, 1)
        assert truth[job_id]["intended"]
    for job_id in planted["png_alpha"]:
        with Image.open(app / truth[job_id]["image"]) as im:
            assert im.format == "PNG" and im.mode == "RGBA"
            assert im.getchannel("A").getextrema()[0] < 255
        assert truth[job_id]["intended"]


def test_duplicates(demo: tuple[Path, dd.DemoSummary], rows: dict[str, dict], truth: dict[str, dict]) -> None:
    app, planted = demo[0], demo[1].planted
    order = [t["job_id"] for t in dd.load_truth(app)]  # creation order
    for job_id in planted["duplicate_image"]:
        later = rows[job_id]
        content = (app / truth[job_id]["image"]).read_bytes()
        twins = [
            j for j in order[: order.index(job_id)]
            if truth[j]["image"] and rows[j]["advisor"] == later["advisor"] and rows[j]["status"] in FINISHED
            and (app / truth[j]["image"]).read_bytes() == content
        ]  # fmt: skip
        assert twins and all(rows[j]["filename"] != later["filename"] for j in twins)
        assert later["status"] in FINISHED and truth[job_id]["intended"]
    for job_id in planted["duplicate_job_same_file"]:
        earlier = [j for j in order[: order.index(job_id)] if rows[j]["filename"] == rows[job_id]["filename"]]
        assert earlier and rows[earlier[0]]["advisor"] == rows[job_id]["advisor"]
        assert (app / truth[job_id]["image"]).is_file()


def test_image_sizes(demo: tuple[Path, dd.DemoSummary], truth: dict[str, dict]) -> None:
    sizes = set()
    for t in truth.values():
        if t["image"] and t["image"].endswith(".jpg") and "undecodable_image" not in t["planted"]:
            with Image.open(demo[0] / t["image"]) as im:
                sizes.add(im.size)
    assert (4032, 3024) in sizes
    assert {(320, 240), (240, 320)} <= sizes


def test_exif_image_is_upright_and_analysed_upright(
    demo: tuple[Path, dd.DemoSummary], truth: dict[str, dict]
) -> None:
    for job_id in demo[1].planted["exif_rotated"]:
        t = truth[job_id]
        data = (demo[0] / t["image"]).read_bytes()
        with Image.open(io.BytesIO(data)) as stored:
            assert stored.size == (4032, 3024)
            assert stored.getexif().get(di.EXIF_ORIENTATION_TAG) == 6
            upright = ImageOps.exif_transpose(stored)
            sideways = stored.convert("RGB")
        assert upright.size == (3024, 4032)
        # A landscape: sky on top once upright, so the top band is bluer than the bottom band.
        arr = np.asarray(upright.convert("RGB").resize((30, 40)), dtype=float)
        assert arr[:8, :, 2].mean() > arr[-8:, :, 2].mean()
        upright_analysis = dd.compose_analysis(di.measure(di.load_upright(data)), t["scene"], t["advisor"])
        assert canonical_json(upright_analysis) == t["intended"]
        sideways_analysis = dd.compose_analysis(di.measure(sideways), t["scene"], t["advisor"])
        assert canonical_json(sideways_analysis) != t["intended"]


def test_images_are_deterministic_and_measured_consistently() -> None:
    params = di.random_params(np.random.default_rng(4), "portrait", (240, 320))
    a, b = di.encode_jpeg(di.render(params)), di.encode_jpeg(di.render(params))
    assert a == b
    pictures = [di.load_upright(a), di.load_upright(di.encode_png(di.render(params)))]
    assert di.measure_many(pictures) == [di.measure(p) for p in pictures]


# --- learnability ----------------------------------------------------------------------------------------------


def test_brighter_images_score_higher_lighting(truth: dict[str, dict]) -> None:
    pairs = [
        (t["features"]["brightness"], json.loads(t["intended"])["dimensions"][1]["score"])
        for t in truth.values()
        if t["intended"]
    ]
    median = float(np.median([b for b, _ in pairs]))
    bright = np.mean([s for b, s in pairs if b > median])
    dark = np.mean([s for b, s in pairs if b <= median])
    assert bright > dark + 0.5


def _pixel_descriptors(path: Path) -> list[float]:
    """What a very small 'model' sees: tone, contrast, colour and edge energy of a thumbnail."""
    with Image.open(path) as im:
        small = ImageOps.exif_transpose(im).convert("RGB").resize((32, 24))
    lum = np.asarray(small.convert("L"), dtype=float) / 255
    sat = np.asarray(small.convert("HSV"), dtype=float)[..., 1] / 255
    edges = np.abs(np.diff(lum, axis=0)).mean() + np.abs(np.diff(lum, axis=1)).mean()
    return [1.0, lum.mean(), lum.mean() ** 2, lum.std(), sat.mean(), sat.mean() ** 2, edges]


def test_scores_are_predictable_from_pixels(demo: tuple[Path, dd.DemoSummary], truth: dict[str, dict]) -> None:
    usable = [
        t for t in truth.values()
        if t["intended"] and t["image"] and not {"undecodable_image", "duplicate_image"} & set(t["planted"])
    ]  # fmt: skip
    x = np.array([_pixel_descriptors(demo[0] / t["image"]) for t in usable])
    cut = int(len(usable) * 0.6)
    for target in ("Lighting", "overall"):
        y = np.array(
            [
                json.loads(t["intended"])["overall_score"]
                if target == "overall"
                else {d["name"]: d["score"] for d in json.loads(t["intended"])["dimensions"]}[target]
                for t in usable
            ]
        )
        weights, *_ = np.linalg.lstsq(x[:cut], y[:cut], rcond=None)
        model_mae = np.abs(x[cut:] @ weights - y[cut:]).mean()
        mean_mae = np.abs(y[:cut].mean() - y[cut:]).mean()
        assert model_mae < 0.85 * mean_mae, (target, model_mae, mean_mae)


# --- legacy schema and appending ---------------------------------------------------------------------------------


def test_legacy_schema(tmp_path: Path) -> None:
    summary = dd.generate_demo_app(tmp_path / "legacy", n_jobs=60, schema="legacy", large_images=False)
    app = summary.app_dir
    assert _columns(app) == list(dd.LEGACY_COLUMNS)
    rows = {r["id"]: r for r in _rows(app)}
    assert {r["status"] for r in rows.values()} <= {"done", "pending", "processing", "failed", "error"}
    for key in ("analysis_in_llm_outputs", "analysis_file_column", "uploads_path"):
        assert summary.planted[key] == []
    for key in ("analysis_in_file_path", "analysis_in_markdown_text", "analysis_in_fallback_file",
                "analysis_in_html_card", "exif_rotated"):  # fmt: skip
        assert summary.planted[key], key
    for t in dd.load_truth(app):
        if t["intended"] and t["storage"] != "analysis_in_html_card":  # cards: test_html_cards.py
            result = parse_analysis(_stored_text(app, rows[t["job_id"]]))
            assert result.ok and canonical_json(result.analysis) == t["intended"]


def test_append_adds_new_completed_clean_jobs(tmp_path: Path) -> None:
    app = tmp_path / "app"
    dd.generate_demo_app(app, n_jobs=60, large_images=False)
    before = {r["id"]: r for r in _rows(app)}
    images_before = {p.read_bytes() for p in (app / "uploads").iterdir()} | {
        p.read_bytes() for p in (app / "source").iterdir()
    }
    first = dd.append_demo_jobs(app, 4, seed=11)
    second = dd.append_demo_jobs(app, 3, seed=11, advisor="gilpin")
    assert len(first) == 4 and len(second) == 3
    assert not set(first) & set(before) and not set(first) & set(second)
    rows = {r["id"]: r for r in _rows(app)}
    truth = {t["job_id"]: t for t in dd.load_truth(app)}
    new_images = []
    for job_id in first + second:
        row, t = rows[job_id], truth[job_id]
        assert row["status"] == "completed" and row["filename"].startswith("uploads/")
        assert row["analysis_markdown"] is None and json.loads(row["llm_outputs"])["response"]
        result = parse_analysis(_stored_text(app, row))
        assert result.ok and canonical_json(result.analysis) == t["intended"]
        new_images.append((app / row["filename"]).read_bytes())
        assert row["created_at"] > max(r["created_at"] for r in before.values())
    assert len(set(new_images)) == len(new_images) and not set(new_images) & images_before
    assert {rows[j]["advisor"] for j in second} == {"gilpin"}
    manifest = json.loads((app / dd.MANIFEST_NAME).read_text())
    assert manifest["jobs_total"] == len(rows)
    assert manifest["completed_by_advisor"]["gilpin"] == 3


def test_append_needs_a_demo(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        dd.append_demo_jobs(tmp_path, 1, seed=1)


def test_append_to_legacy_uses_legacy_forms(tmp_path: Path) -> None:
    app = tmp_path / "legacy"
    dd.generate_demo_app(app, n_jobs=60, schema="legacy", large_images=False)
    (job_id,) = dd.append_demo_jobs(app, 1, seed=3)
    row = {r["id"]: r for r in _rows(app)}[job_id]
    assert row["status"] == "done" and "/" not in row["filename"]
    assert parse_analysis(row["analysis_markdown"]).ok


# --- scale -------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_twenty_thousand_jobs_small_images(tmp_path: Path) -> None:
    summary = dd.generate_demo_app(tmp_path / "big", n_jobs=20_000, large_images=False)
    assert summary.jobs_total >= 20_000
    assert summary.completed_by_advisor["ansel"] > 10_000 and summary.completed_by_advisor["okeefe"] == 3
    assert all(summary.planted[k] for k in dd.PLANTED_KEYS)
    # Faults stay a small share of the data.
    exclusive = {k for k, *_ in dd._EXCLUSIVE_FAULTS}
    faulty = {j for k in exclusive for j in summary.planted[k]}
    assert len(faulty) < 0.06 * summary.jobs_total
    biggest = max(p.stat().st_size for p in (tmp_path / "big" / "source").iterdir())
    assert biggest < 200_000  # no phone-sized pictures
    shutil.rmtree(tmp_path / "big")
