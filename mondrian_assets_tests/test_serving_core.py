"""The service's domain pieces without HTTP: A/B routing, the analysis grammar, upload checks, usage summaries."""

from __future__ import annotations

import io
import json
import struct
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mondrian_assets.core import schema
from mondrian_assets.core.inference.constrained import AnalysisConstraint, BudgetTooSmall
from mondrian_assets.core.serving.routing import Model, ServiceMode, arm_draw, job_key_for, route
from mondrian_assets.core.serving.uploads import UploadRejected, prepare_upload
from mondrian_assets.core.serving.usage import UsageRow, record_usage, serving_summary, summary_text
from mondrian_assets.core.state_db import state_engine
from helpers import hub_cache_with

# --- routing --------------------------------------------------------------------------------------------------


def test_ab_arm_is_a_function_of_the_job_and_the_split_holds():
    jobs = [f"job-{i}" for i in range(20_000)]
    first = [route(ServiceMode.AB_TEST, None, j, 0.3).model for j in jobs]
    again = [route(ServiceMode.AB_TEST, "ab_test", j, 0.3).model for j in jobs]
    assert first == again
    share = first.count(Model.FINE_TUNED) / len(jobs)
    assert abs(share - 0.3) < 0.015  # binomial sd ~0.003
    assert all(route(ServiceMode.AB_TEST, None, j, 0.0).model is Model.BASE for j in jobs[:500])
    assert all(route(ServiceMode.AB_TEST, None, j, 1.0).model is Model.FINE_TUNED for j in jobs[:500])
    # a job's arm does not move when the split grows: only jobs near the old boundary change, towards fine-tuned
    moved = [j for j in jobs if route(ServiceMode.AB_TEST, None, j, 0.3).model is not route(ServiceMode.AB_TEST, None, j, 0.4).model]
    assert all(0.3 <= arm_draw(j) < 0.4 for j in moved)


def test_request_modes_override_only_when_they_name_a_model():
    assert route(ServiceMode.FINE_TUNED, "base", "j", 0.5).model is Model.BASE
    assert route(ServiceMode.BASE, "lora", "j", 0.5).model is Model.FINE_TUNED
    assert route(ServiceMode.BASE, "ab_test", "j", 0.5).mode is ServiceMode.AB_TEST
    for app_mode in ("baseline", "rag", "something new", None, ""):
        chosen = route(ServiceMode.FINE_TUNED, app_mode, "j", 0.5)
        assert chosen.model is Model.FINE_TUNED and chosen.arm_draw is None
        assert ("names no model choice" in chosen.note) == bool(app_mode)


def test_a_request_without_a_job_id_is_keyed_by_its_image():
    assert job_key_for(None, "ab" * 32) == job_key_for("  ", "ab" * 32) == "image-" + "ab" * 16
    assert job_key_for("42", "ab" * 32) == "42"


# --- the grammar ----------------------------------------------------------------------------------------------

BUDGET = 1536  # the service's default max_tokens


@pytest.fixture(scope="module")
def constraint(embedded_base) -> AnalysisConstraint:
    from transformers import PreTrainedTokenizerFast

    return AnalysisConstraint.for_processor(PreTrainedTokenizerFast.from_pretrained(str(embedded_base)))


def _analysis(names, score=7.5, **extra) -> schema.Analysis:
    dims = tuple(schema.Dimension(n, score, f"{n} holds.", "Try a lower angle.") for n in names)
    return schema.Analysis("A lake at dawn, \u201cquiet\u201d.", dims, 7.25, ("Light",), ("Focus",), "", **extra)


def test_the_grammar_accepts_every_canonical_analysis(constraint):
    names = schema.DIMENSION_NAMES
    for chosen in (names[:7], names, names[:7][:3] + names[:7][4:], ("Lighting",), ("Composition", "Subject Matter")):
        assert constraint.accepts(schema.canonical_json(_analysis(chosen)), BUDGET)
    with_cases = _analysis(("Lighting",), case_studies=(schema.CaseStudy("Moonrise", "1941", "Lighting", "Dusk."),))
    assert constraint.accepts(schema.canonical_json(with_cases), BUDGET)


def _reordered_dimensions() -> str:
    data = schema.analysis_to_dict(_analysis(("Composition", "Lighting")))
    data["dimensions"].reverse()
    return json.dumps(data, separators=(",", ":"))


@pytest.mark.parametrize(
    "text",
    [
        schema.canonical_json(_analysis(("Lighting", "Lighting"))),  # duplicate names
        _reordered_dimensions(),  # valid, but not the canonical order the model is trained on
        schema.canonical_json(_analysis(("Sharpness",))),  # an unknown dimension
        schema.canonical_json(_analysis(("Lighting",), score=11)),
        schema.canonical_json(_analysis(("Lighting",), score=0.5)),
        schema.canonical_json(_analysis(("Lighting",))).replace('"Light"', '" "'),  # blank text
        schema.canonical_json(_analysis(("Lighting",))).replace(',"technical_notes":""', ""),  # a missing key
        schema.canonical_json(_analysis(("Lighting",))).replace('{"image', '{ "image'),  # whitespace
        schema.canonical_json(_analysis(("Lighting",))) + "}",  # the app's extra brace
        schema.canonical_json(_analysis(("Lighting",))).replace("\u201c", '\\"'),  # an escape: a cut could split it
    ],
)
def test_the_grammar_refuses_what_the_schema_refuses(constraint, text):
    assert not constraint.accepts(text, BUDGET)


def test_a_text_longer_than_its_share_is_refused(constraint):
    share = constraint.bounds(600).tokens["description"]
    words = "lake"
    while len(constraint._tokenizer.tokenize_str(words)) <= share + 1:  # +1: the opening quote's token
        words += " lake"
    assert len(constraint._tokenizer.tokenize_str(words)) < constraint.bounds(BUDGET).tokens["description"]
    long = replace(_analysis(("Lighting",)), image_description=words)
    assert not constraint.accepts(schema.canonical_json(long), 600)
    assert constraint.accepts(schema.canonical_json(long), BUDGET)  # a roomier budget gives it room


def test_a_budget_too_small_for_the_structure_fails_clearly(constraint):
    with pytest.raises(BudgetTooSmall, match=r"max_tokens=100 is too small .* needs \d+ tokens"):
        constraint.processor(100)
    smallest = constraint.smallest_budget()
    assert constraint.processor(smallest) is not None
    with pytest.raises(BudgetTooSmall):
        constraint.processor(smallest - 1)


@pytest.mark.parametrize("budget", [600, BUDGET])
def test_every_sentence_of_the_grammar_is_a_valid_analysis_within_the_budget(constraint, budget):
    """Walks through the mask (random allowed tokens; half of them the most stubborn walker: shortest tokens,
    never closing by choice) all parse and validate, and all end within the budget, end of turn included."""
    tokenizer = constraint._tokenizer
    closing = np.array([any(c in tokenizer.decode_str([t]) for c in '"]},') for t in range(tokenizer.vocab_size)])
    lengths = np.array([len(tokenizer.decode_bytes([t])) for t in range(tokenizer.vocab_size)])
    for seed in range(8):
        rng = np.random.default_rng(seed)
        mask = constraint.processor(budget)
        tokens: list[int] = []
        while not (allowed := mask.allowed())[constraint.end_of_turn_id]:
            pool = np.flatnonzero(allowed)
            if seed % 2 and len(open_ := pool[~closing[pool]]):
                pool = open_[lengths[open_] == lengths[open_].min()]
            tokens.append(int(rng.choice(pool)))
            mask.consume(tokens[-1])
            assert len(tokens) < budget
        result = schema.parse_analysis(tokenizer.decode_str(tokens))
        assert result.ok, (result.error, result.detail)


# --- uploads --------------------------------------------------------------------------------------------------


def _jpeg(size=(640, 480), **save) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(buffer, "JPEG", **save)
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height (a bomb's header) with one tiny compressed row."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_a_good_upload_becomes_the_apps_view_of_it():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: the upright image is portrait
    prepared = prepare_upload(_jpeg((2000, 1000), exif=exif.tobytes()))
    view = Image.open(io.BytesIO(prepared.jpeg))
    assert (prepared.width, prepared.height) == (2000, 1000)
    assert view.size == (400, 800) and view.mode == "RGB"


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (b"", 400, "empty_image"),
        (b"GIF89a not really", 415, "not_an_image"),
        (b"%PDF-1.7\n" + b"x" * 100, 415, "not_an_image"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", 415, "not_an_image"),  # never handed to Ghostscript
        (_jpeg()[:1500], 400, "corrupt_image"),
        (_png_header_only(11_000, 11_000), 413, "too_many_pixels"),  # our limit, below PIL's
        (_png_header_only(20_000, 20_000), 413, "too_many_pixels"),  # PIL's own bomb guard
        (_png_header_only(300, 300), 400, "corrupt_image"),
    ],
)
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL's note; the 413 is what counts
def test_bad_uploads_are_refused_with_a_reason(data, status, code):
    with pytest.raises(UploadRejected) as caught:
        prepare_upload(data)
    assert (caught.value.status, caught.value.code) == (status, code)


# --- usage ----------------------------------------------------------------------------------------------------


def test_serving_summary_counts_rows_per_advisor_model_and_arm(tmp_path: Path):
    engine = state_engine(tmp_path / "state.db")
    rows = [
        UsageRow("j1", "ansel", None, "ab_test", "ab_test", 0.1, "fine_tuned", 2, constrained=True, http_status=200,
                 latency_s=1.0, parse_ok=True, grammar_corrections=0),
        UsageRow("j2", "ansel", None, "ab_test", "ab_test", 0.2, "fine_tuned", 2, constrained=True, http_status=200,
                 latency_s=3.0, parse_ok=True, grammar_corrections=4),
        UsageRow("j3", "ansel", None, "ab_test", "ab_test", 0.9, "base", constrained=False, http_status=200,
                 latency_s=2.0, parse_ok=False),
        UsageRow("j4", "ansel", "base", "ab_test", http_status=400, error="corrupt_image: ..."),
        UsageRow("j5", "ansel", None, "ab_test", "ab_test", 0.95, "base", http_status=500, error="worker_died: ..."),
    ]  # fmt: skip
    for row in rows:
        record_usage(engine, row)
    summary = serving_summary(engine)
    assert summary.total.requests == 5 and summary.total.rejected == 1 and summary.total.errors == 1
    tuned = summary.ab_arms["fine_tuned"]
    assert (tuned.served, tuned.valid_json, tuned.unaided_valid_json) == (2, 1.0, 0.5)
    assert summary.ab_arms["base"].served == 1 and summary.ab_arms["base"].valid_json == 0.0
    assert summary.by_version == {("ansel", 2): 2}
    assert summary.by_advisor_model[("ansel", "-")].rejected == 1
    assert "fine_tuned" in summary_text(summary) and "ansel-v2: 2" in summary_text(summary)


def test_a_version_trained_on_a_hub_id_matches_a_service_on_its_cached_folder(embedded_base, tmp_path, monkeypatch):
    """Training records the resolved snapshot folder; a service started with the hub id (or the folder written
    another way) runs the same base, and a different base is still told apart."""
    from mondrian_assets.core.base_model import same_base

    snapshot = hub_cache_with(embedded_base, tmp_path, monkeypatch)
    assert same_base(str(snapshot), "Org/Name")
    assert same_base(str(snapshot.parent / ".." / "snapshots" / snapshot.name), "Org/Name")
    assert not same_base(str(snapshot), str(embedded_base))  # another folder, even with the same files
    assert not same_base("Org/Name", "Org/Other") and same_base("Org/Other", "Org/Other")
