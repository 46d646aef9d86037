"""The older app's HTML cards: recovered into the canonical schema with the card's own scores and grade, the
missing fields derived by the one documented rule, error and incomplete cards skipped with their own reasons."""

import json
import sqlite3

import dagster as dg
import pytest

from mondrian_assets.core.data import app_db, html_card, linker
from mondrian_assets.core.locations import Locations
from mondrian_assets.core.schema import parse_analysis
from mondrian_assets.defs import linking

# A card written by hand in the app's structure, with what a real page carries around it: a style block with
# braces, entities, a score inside one heading and beside the others, a grade note and reference images.
CARD = """<html><head><style>.card { color: #333 } .score { font-weight: bold }</style></head><body>
<div class="analysis-card"><div class="card-header"><h2>Ansel Adams</h2></div>
<div class="image-analysis"><h3>Image Analysis</h3><p>A dark valley under a pale sky.</p></div>
<div class="dimension"><div class="dimension-header"><h4>Composition</h4><span class="score">7.0/10 (Good)</span></div>
  <p class="comment">The ridge sits on a third.</p>
  <div class="recommendation"><strong>How to Improve:</strong> Keep this placement.</div></div>
<div class="dimension"><h4>Focus &amp; Sharpness <span class="score">4.5/10 (Needs Work)</span></h4>
  <p>Soft everywhere.</p><div class="recommendation"><strong>How to Improve:</strong><p>Use a tripod.</p></div></div>
<div class="dimension"><h4>Lighting</h4><span class="score">8.5/10 (Excellent)</span>
  <p>Light &lt;just&gt; grazing the ridge.</p><p><strong>How to Improve:</strong> Wait for the same hour.</p></div>
<div class="dimension"><h4>Emotional Impact</h4><span class="score">7.0/10 (Good)</span>
  <p>A quiet mood.</p><div><strong>How to Improve:</strong> Push the mood.</div></div>
<div class="overall-grade"><span>Overall Grade</span> <span class="grade">6.8/10</span></div>
<div class="grade-note"><strong>Grade Note:</strong> Weighted towards light.</div>
<div class="reference-images"><h4>Reference Images</h4>
  <figure><img src="/r/1.jpg" alt=""><figcaption>Reference 1: a valley at dawn 9/10</figcaption></figure></div>
</div></body></html>"""


def _dimension(name: str, score: str, comment: str, advice: str) -> str:
    return (f'<div class="dimension"><h4>{name}</h4><span class="score">{score}</span><p>{comment}</p>'
            f"<div><strong>How to Improve:</strong> {advice}</div></div>")  # fmt: skip


def test_card_scores_grade_and_texts_are_the_cards():
    recovery = html_card.recover_card(CARD)
    analysis = recovery.result.analysis
    assert analysis is not None, recovery.result.detail
    assert analysis.dimension_scores() == {"Composition": 7.0, "Focus & Sharpness": 4.5, "Lighting": 8.5, "Emotional Impact": 7.0}
    assert analysis.overall_score == 6.8
    lighting = next(d for d in analysis.dimensions if d.name == "Lighting")
    assert (lighting.comment, lighting.recommendation) == ("Light <just> grazing the ridge.", "Wait for the same hour.")
    assert next(d for d in analysis.dimensions if d.name == "Focus & Sharpness").recommendation == "Use a tripod."
    assert analysis.image_description == "A dark valley under a pale sky."
    assert analysis.technical_notes == "Weighted towards light."


def test_missing_fields_follow_the_json_eras_rule():
    """Top-scored names are the strengths, lowest the improvements (ties: card order); no description: the
    first dimension's comment; no grade note: empty technical notes."""
    recovery = html_card.recover_card(CARD)
    analysis = recovery.result.analysis
    assert analysis.key_strengths == ("Lighting", "Composition")  # 8.5, then 7.0 ties: Composition comes first
    assert analysis.priority_improvements == ("Focus & Sharpness", "Composition")
    assert recovery.derived_fields == ("key_strengths", "priority_improvements")

    bare = "<div>" + _dimension("Lighting", "6/10", "Flat light.", "Wait for sun.") + _dimension(
        "Composition", "8.0/10 (Good)", "Strong diagonal.", "Keep it.") + "<p>Overall Grade: 7/10</p></div>"  # fmt: skip
    recovery = html_card.recover_card(bare)
    analysis = recovery.result.analysis
    assert analysis.image_description == "Flat light." and analysis.technical_notes == ""
    # two dimensions: one name each, so strengths and improvements never overlap
    assert (analysis.key_strengths, analysis.priority_improvements) == (("Composition",), ("Lighting",))
    assert set(recovery.derived_fields) == {"key_strengths", "priority_improvements", "technical_notes", "image_description"}


@pytest.mark.parametrize(
    ("markup", "code", "detail"),
    [
        ('<div class="analysis-card error"><h3>Analysis Error</h3><p>Timeout after 300 s</p></div>',
         "html_error_card", "Timeout after 300 s"),
        ("<div>" + _dimension("Lighting", "6/10", "Flat.", "Wait.") + "<h4>Composition</h4><p>Busy frame.</p>"
         "<div><strong>How to Improve:</strong> Simplify.</div><p>Overall Grade 6/10</p></div>",
         "html_card_incomplete", "no score for 'Busy frame.'"),
        ("<div>" + _dimension("Lighting", "6/10", "Flat.", "Wait.") + "</div>", "html_card_incomplete", "no Overall Grade"),
        ("<div><h4>Lighting</h4><span>6/10</span><p>Flat.</p><p>Overall Grade 6/10</p></div>",
         "html_card_incomplete", "Lighting: no How to Improve"),
        ("<div>" + _dimension("Lighting", "12/10", "Flat.", "Wait.") + "<p>Overall Grade 6/10</p></div>",
         "score_out_of_range", "outside"),
        ("# Ansel Adams Analysis\n\nNo JSON and no markup.", html_card.NOT_HTML, ""),
    ],
    ids=["error_card", "dimension_without_score", "no_overall_grade", "no_advice", "score_out_of_range", "not_html"],
)
def test_cards_that_cannot_be_recovered_say_why(markup, code, detail):
    result = html_card.recover_card(markup).result
    assert result.analysis is None and result.error == code
    assert detail in result.detail


def _rows(app) -> dict[str, dict]:
    with sqlite3.connect(app / "mondrian.db") as db:
        db.row_factory = sqlite3.Row
        rows = {r["id"]: dict(r) for r in db.execute("SELECT * FROM jobs")}
    db.close()
    return rows


def test_demo_cards_recover_the_scores_and_grade_they_show(pristine_demo):
    """The demo writes its older-era cards from a known analysis; recovery must give back the card's numbers."""
    rows = _rows(pristine_demo.app_dir)
    truth = {t["job_id"]: t for t in map(json.loads, (pristine_demo.app_dir / "demo_truth.jsonl").read_text().splitlines())}
    card_jobs = pristine_demo.planted["analysis_in_html_card"]
    assert len(card_jobs) >= 3
    for job_id in card_jobs:
        markup = rows[job_id]["analysis_markdown"]
        assert parse_analysis(markup).error == "no_json"  # the JSON parser alone loses these jobs
        recovered = html_card.recover_card(markup).result.analysis
        shown = parse_analysis(truth[job_id]["intended"]).analysis
        assert recovered is not None, job_id
        assert recovered.dimension_scores() == shown.dimension_scores(), job_id
        assert recovered.overall_score == shown.overall_score, job_id
        assert [(d.comment, d.recommendation) for d in recovered.dimensions] == [
            (d.comment, d.recommendation) for d in shown.dimensions
        ], job_id


def _link(loc: Locations, **options) -> linker.LinkResult:
    with app_db.read_only_engine(loc.db_path).connect() as conn:
        return linker.link(conn, loc, **options)


def test_linker_marks_recovered_cards_and_the_switch_turns_recovery_off(pristine_demo, tmp_path):
    loc = Locations.resolve(app_dir=str(pristine_demo.app_dir), home=str(tmp_path), environ={})
    result = _link(loc)
    cards = result.records[result.records["analysis_source"] == linker.HTML_CARD_SOURCE]
    assert len(cards) >= 3
    manifest = linker.manifest(result, loc)
    entries = [r for info in manifest["by_advisor"].values() for r in info["records"] if r["analysis_source"] == "html_card"]
    assert len(entries) == len(cards)
    assert all({"key_strengths", "priority_improvements"} <= set(r["derived_fields"]) for r in entries)
    assert manifest["skipped"]["by_reason"]["analysis_html_error_card"] == len(pristine_demo.planted["html_error_card"])

    off = _link(loc, recover_html_cards=False)
    reasons = {s.job_id: s.reason for s in off.skips}
    assert all(reasons[j] == "analysis_html_card_not_recovered" for j in cards["job_id"])
    assert len(off.records) == len(result.records) - len(cards)


def test_recovery_switch_in_the_launchpad(mondrian_db, instance):
    config = {"ops": {"linked_records": {"config": {"recover_html_cards": False}}}}
    result = dg.materialize([linking.linked_records], resources={"mondrian_db": mondrian_db}, instance=instance, run_config=config)
    reasons = result.asset_materializations_for_node("linked_records")[0].metadata["skipped_per_reason"].value.records
    assert "analysis_html_card_not_recovered" in {r.data["reason"] for r in reasons}
