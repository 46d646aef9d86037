"""Deterministic demo copy of the Mondrian app: `mondrian.db`, its images and analysis files.

The demo mirrors the real app's data (see DESIGN.md, "The app's real data"): two app eras in one `jobs`
table, every storage form an analysis was ever kept in, and every fault met in the real history, each
planted on purpose and listed in `demo_manifest.json`. Analyses are derived from measurements of the
upright image, so a model that looks at the picture can predict the scores better than the mean.

Ground truth for every job (intended analysis or expected parse error, storage form, scene) is written
to `demo_truth.jsonl` beside the manifest.
"""

from __future__ import annotations

import html
import json
import re
import sqlite3
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

from mondrian_assets.core.atomic import staged_dir, write_json
from mondrian_assets.core.schema import (
    DIMENSION_NAMES,
    Analysis,
    Dimension,
    analysis_to_dict,
    build_prompt,
    canonical_json,
)
from mondrian_assets.demo import images as img

MANIFEST_NAME = "demo_manifest.json"
TRUTH_NAME = "demo_truth.jsonl"
DB_NAME = "mondrian.db"
GENERATOR_TAG = "mondrian-assets demo-data v1"
MIN_JOBS = 60  # below this the planted faults would crowd out the clean jobs
DEFAULT_JOBS = 300  # ansel and weston then have 20+ validation images each (a ratio on 10 is mostly noise)

SEVEN = DIMENSION_NAMES[:7]
SIX = tuple(n for n in SEVEN if n != "Color Harmony")
NINE = DIMENSION_NAMES[:9]

CURRENT_COLUMNS = (
    "id", "filename", "advisor", "status", "analysis_file", "analysis_markdown", "llm_outputs", "created_at",
    "started_at", "completed_at", "mode", "model", "adapter", "enable_rag", "error",
)  # fmt: skip
LEGACY_COLUMNS = ("id", "filename", "advisor", "status", "analysis_markdown", "created_at", "completed_at")

STORAGE_FORMS = (
    "analysis_in_file_path",
    "analysis_in_markdown_text",
    "analysis_in_llm_outputs",
    "analysis_in_fallback_file",
    "analysis_file_column",
    "analysis_in_html_card",
)
OLDER_ERA_FORMS = ("analysis_in_file_path", "analysis_in_html_card")  # forms only the older app wrote
PLANTED_KEYS = (
    "missing_image", "missing_analysis", "fenced_json", "thinking_tags", "curly_quotes", "extra_brace",
    "truncated_json", "invalid_json", "missing_fields", "score_out_of_range", "six_dimensions",
    "nine_dimensions", "duplicate_image", "duplicate_job_same_file", "not_finished", "rag_suffix_id",
    "advisor_all", "tiny_image", "undecodable_image", "png_alpha", "exif_rotated", "path_traversal",
    "absolute_path_outside", "html_analysis", *STORAGE_FORMS, "legacy_status_done", "uploads_path",
    "html_error_card",
)  # fmt: skip
# Raw-output faults and the parse error each must produce.
EXPECTED_ERRORS = {
    "truncated_json": "truncated_json",
    "invalid_json": "invalid_json",
    "missing_fields": "missing_fields",
    "score_out_of_range": "score_out_of_range",
    "html_analysis": "no_json",
    "html_error_card": "no_json",
    "missing_analysis": "empty",
}
UNFINISHED_STATUSES = ("pending", "queued", "processing", "analyzing", "finalizing", "failed", "error")


# --- advisors ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Advisor:
    id: str
    name: str
    category: str
    bio: str
    prompt: str
    noun: str  # what the advisor calls a picture: a small per-advisor flavour in the wording
    tip: str  # closing advice in technical_notes, a lower-case clause


ADVISORS: dict[str, Advisor] = {
    a.id: a
    for a in (
        Advisor(
            "ansel", "Ansel Adams", "photographer",
            "Landscape photographer of the American West, known for large-format black-and-white prints "
            "and for the Zone System of exposure.",
            "You are Ansel Adams. Judge the photograph as a finished print: the range of tones from deep "
            "shadow to clean highlight, the structure of the land, and whether the picture was seen in the "
            "mind before the shutter fired. Be exact about exposure and concrete about what would improve it.",
            "print", "expose for the shadows",
        ),
        Advisor(
            "watkins", "Carleton Watkins", "photographer",
            "Nineteenth-century photographer whose mammoth-plate views of Yosemite helped persuade Congress "
            "to protect the valley.",
            "You are Carleton Watkins. Look for the grand, orderly view: a steady vantage point, a clear "
            "recession into distance and a frame that holds the whole place. Comment plainly, as a surveyor "
            "of landscapes would.",
            "view", "keep the camera level",
        ),
        Advisor(
            "weston", "Edward Weston", "photographer",
            "Modernist photographer of peppers, shells, nudes and dunes, printed with uncompromising "
            "sharpness.",
            "You are Edward Weston. Care about form, texture and crisp detail, and strip each subject to "
            "its essential shape. Praise simplicity and name the clutter or softness that weakens the form.",
            "study", "simplify to the form",
        ),
        Advisor(
            "cunningham", "Imogen Cunningham", "photographer",
            "Portrait and botanical photographer and a founding member of Group f/64.",
            "You are Imogen Cunningham. Look closely at people and plants alike, favouring honest light and "
            "clean lines. Be warm but direct about what the picture reveals.",
            "study", "trust the natural light",
        ),
        Advisor(
            "gilpin", "Laura Gilpin", "photographer",
            "Photographer of the American Southwest and its peoples, working for six decades in platinum "
            "and silver.",
            "You are Laura Gilpin. Consider how land and the people who live on it are shown together, and "
            "how light shapes a place. Speak patiently and with respect for the subject.",
            "photograph", "wait for the low sun",
        ),
        Advisor(
            "okeefe", "Georgia O'Keeffe", "painter",
            "Painter of enlarged flowers, bleached bones and the hills of northern New Mexico.",
            "You are Georgia O'Keeffe. Look at shape, colour and scale before subject, and ask whether the "
            "frame is filled with something worth seeing closely. Be brief and unsentimental.",
            "picture", "move in closer",
        ),
        Advisor(
            "mondrian", "Piet Mondrian", "painter",
            "Dutch painter who reduced pictures to lines, rectangles and primary colour.",
            "You are Piet Mondrian. Judge balance, proportion and the tension between horizontal and "
            "vertical. Prefer clarity and equilibrium to description.",
            "composition", "seek clearer proportion",
        ),
        Advisor(
            "vangogh", "Vincent van Gogh", "painter",
            "Post-Impressionist painter of vivid colour and restless brushwork.",
            "You are Vincent van Gogh. Respond to colour and feeling first: does the picture vibrate, does "
            "its light move you? Say so honestly and with warmth.",
            "scene", "let the colour sing",
        ),
        Advisor(
            "gehry", "Frank Gehry", "architect",
            "Architect of curving, sculptural buildings in titanium, steel and glass.",
            "You are Frank Gehry. Look at structure, rhythm and how forms meet the sky; reward bold geometry "
            "and question timid framing. Keep the critique lively and practical.",
            "image", "look for bolder angles",
        ),
    )
}  # fmt: skip

SYSTEM_PROMPT = (
    "You are a photography critic speaking in the voice of the advisor described below. Look at the image "
    "itself, score each dimension from 1 to 10 on its own evidence, and explain every score in one short "
    "sentence with one concrete recommendation. Reply with a single JSON object and no other text."
)
_GENERIC = Advisor("", "Guest Critic", "photographer", "", "", "photograph", "shoot it again")


def _advisor(advisor_id: str) -> Advisor:
    return ADVISORS.get(advisor_id, _GENERIC)


# --- scores from measurements --------------------------------------------------------------------------------


def _clip01(x: float) -> float:
    return min(1.0, max(0.0, x))


def _to_score(quality: float) -> float:
    """Quality 0..1 -> score 3..10 in half points (the range real analyses mostly use)."""
    return round((3.0 + 7.0 * _clip01(quality)) * 2.0) / 2.0


def _third_offset(x: float) -> float:
    """Distance from the nearest third line, 0 (on it) .. about 1/6 (centred)."""
    return min(abs(x - 1 / 3), abs(x - 2 / 3))


def _lighting_quality(f: img.ImageFeatures) -> float:
    # Rises with exposure up to a well-filled frame, falls gently once highlights wash out.
    b = f.brightness
    exposure = b / 0.62 if b < 0.62 else 1.0 - (b - 0.62) / 0.45
    return 0.75 * _clip01(exposure) + 0.25 * _clip01(f.contrast / 0.2)


def _colour_quality(f: img.ImageFeatures) -> float:
    return _clip01(1.0 - abs(f.saturation - 0.45) / 0.45)


def _focus_quality(f: img.ImageFeatures) -> float:
    return _clip01((f.sharpness - 0.1) / 0.3)


def _placement(f: img.ImageFeatures, scene: str) -> float:
    """Where the main line or subject sits: the horizon row for landscapes, the edge centre otherwise."""
    return f.horizon if scene == "landscape" else f.subject_x


def dimension_scores(f: img.ImageFeatures, scene: str) -> dict[str, float]:
    """All nine dimension scores, each a fixed function of measured image properties."""
    light, colour, focus = _lighting_quality(f), _colour_quality(f), _focus_quality(f)
    contrast = _clip01(f.contrast / 0.22)
    subject_base = {"portrait": 0.7, "landscape": 0.6, "architecture": 0.5}.get(scene, 0.5)
    return {
        "Composition": _to_score(1.0 - _third_offset(_placement(f, scene)) / 0.17),
        "Lighting": _to_score(light),
        "Focus & Sharpness": _to_score(focus),
        "Color Harmony": _to_score(colour),
        "Depth & Perspective": _to_score(0.6 * _clip01(f.depth_gradient / 0.25) + 0.4 * focus),
        "Visual Balance": _to_score(1.0 - abs(f.imbalance) / 0.25),
        "Emotional Impact": _to_score((contrast + colour + light) / 3.0),
        "Subject Isolation": _to_score(0.7 * _clip01(f.isolation / 0.1) + 0.3 * focus),
        "Subject Matter": _to_score(subject_base + 0.4 * colour + 0.3 * contrast - 0.35),
    }


# --- wording -------------------------------------------------------------------------------------------------

_FOCUS_WORD = {"landscape": "horizon", "portrait": "figure", "architecture": "building"}

# (low, mid, high) bands of (comment, recommendation); {focus}, {side} and {mood} are filled in.
_TEMPLATES: dict[str, tuple[tuple[str, str], ...]] = {
    "Composition": (
        ("The {focus} is centred.", "Move it to a third."),
        ("The {focus} is near a third.", "Nudge it onto a third."),
        ("The {focus} sits on a third.", "Keep this placement."),
    ),
    "Focus & Sharpness": (
        ("Badly blurred.", "Steady the camera."),
        ("Slightly soft detail.", "Use a faster shutter."),
        ("Crisp edges throughout.", "Keep this sharpness."),
    ),
    "Depth & Perspective": (
        ("The scene reads flat.", "Layer near and far."),
        ("Some depth, a bit shallow.", "Add a foreground."),
        ("Tonal layers give depth.", "Keep the foreground."),
    ),
    "Visual Balance": (
        ("The {side} side dominates.", "Lighten the {side}."),
        ("A little heavy on the {side}.", "Counter the {side}."),
        ("Evenly spread weight.", "Keep it even."),
    ),
    "Emotional Impact": (
        ("Little emotional pull.", "Find a clearer story."),
        ("A quiet, {mood} feeling.", "Push the mood."),
        ("A strong, {mood} mood.", "Trust this mood."),
    ),
    "Subject Isolation": (
        ("The subject merges in.", "Separate it by tone."),
        ("The subject half stands out.", "Simplify the ground."),
        ("The subject stands clear.", "Keep the clean ground."),
    ),
    "Subject Matter": (
        ("A slight subject.", "Choose a stronger one."),
        ("A fair, familiar subject.", "Find a fresher angle."),
        ("A compelling subject.", "Explore it in a series."),
    ),
}
_STRENGTH = {
    "Composition": "Thirds placement",
    "Lighting": "Well-judged light",
    "Focus & Sharpness": "Crisp detail",
    "Color Harmony": "Cohesive palette",
    "Depth & Perspective": "Layered depth",
    "Visual Balance": "Even visual weight",
    "Emotional Impact": "Clear mood",
    "Subject Isolation": "Clean separation",
    "Subject Matter": "Engaging subject",
}
_IMPROVEMENT = {
    "Composition": "Place the {focus} on a third",
    "Lighting": "Fix the exposure",
    "Focus & Sharpness": "Sharpen the focus",
    "Color Harmony": "Refine the palette",
    "Depth & Perspective": "Add depth cues",
    "Visual Balance": "Rebalance the frame",
    "Emotional Impact": "Build a stronger mood",
    "Subject Isolation": "Isolate the subject",
    "Subject Matter": "Pick a stronger subject",
}


def _band(score: float) -> int:
    return 0 if score < 5.5 else (1 if score < 7.5 else 2)


# Lighting and colour can fail in two directions, so their wording also depends on which side they miss.
_LIGHTING_TEXT = {
    "dark": (("Underexposed.", "Open up two stops."), ("Adequate but dim light.", "Add half a stop.")),
    "bright": (("Highlights wash out.", "Expose for highlights."), ("Bright but flat light.", "Pull exposure back.")),
}
_COLOUR_TEXT = {
    "muted": (("Muted, greyish colour.", "Add a colour accent."), ("Plain colour.", "Find a stronger accent.")),
    "hot": (("Oversaturated colour.", "Pull saturation back."), ("Colour runs a little hot.", "Ease the saturation.")),
}


def _lighting_text(f: img.ImageFeatures, score: float) -> tuple[str, str]:
    if _band(score) == 2:
        return "Bright, well-judged light.", "Keep this metering."
    return _LIGHTING_TEXT["dark" if f.brightness < 0.5 else "bright"][_band(score)]


def _colour_text(f: img.ImageFeatures, score: float) -> tuple[str, str]:
    if _band(score) == 2:
        return "Colours sit well together.", "Keep the palette."
    return _COLOUR_TEXT["muted" if f.saturation < 0.45 else "hot"][_band(score)]


def _mood(f: img.ImageFeatures) -> str:
    if f.brightness < 0.35:
        return "brooding"
    warm = bool(set(f.hues) & {"red", "orange", "yellow", "pink"})
    return "warm" if warm else ("calm" if f.brightness < 0.6 else "airy")


def _dimension(name: str, score: float, f: img.ImageFeatures, scene: str) -> Dimension:
    if name == "Lighting":
        comment, recommendation = _lighting_text(f, score)
    elif name == "Color Harmony":
        comment, recommendation = _colour_text(f, score)
    else:
        comment, recommendation = _TEMPLATES[name][_band(score)]
    side = "left" if f.imbalance > 0 else "right"
    fill = {"focus": _FOCUS_WORD.get(scene, "subject"), "side": side, "mood": _mood(f)}
    return Dimension(name, score, comment.format(**fill), recommendation.format(**fill))


def _brightness_word(b: float) -> str:
    return "dark" if b < 0.3 else "dim" if b < 0.45 else "balanced" if b < 0.65 else "bright"


def _where(f: img.ImageFeatures, scene: str) -> str:
    if scene == "landscape":
        pos = f.horizon
        return "horizon high" if pos < 0.42 else "horizon low" if pos > 0.58 else "horizon centred"
    label = "figure" if scene == "portrait" else "main building"
    pos = f.subject_x
    return f"{label} left" if pos < 0.42 else f"{label} right" if pos > 0.58 else f"{label} centred"


def _description(f: img.ImageFeatures, scene: str, adv: Advisor) -> str:
    colours = " and ".join(f.hues)
    article = "An" if _brightness_word(f.brightness)[0] in "aeiou" else "A"
    return f"{article} {_brightness_word(f.brightness)} {scene} {adv.noun}, {colours}, {_where(f, scene)}."


def _technical_notes(f: img.ImageFeatures, adv: Advisor) -> str:
    # Same bands as the Focus & Sharpness score, so the note never contradicts it.
    detail = ("blurred", "slightly soft", "crisp")[_band(_to_score(_focus_quality(f)))]
    return f"Mean level {round(f.brightness * 100)}% with {detail} detail: {adv.tip}."


# The overall grade weighs what the eye takes in first: the light, the tonal depth and the mood they make. All three
# rest on tone and colour (exposure, contrast, the top-to-bottom gradient, saturation), which a model sees even at the
# embedded model's 24 image tokens; a mean of all seven also weighed placement on the thirds and left-right balance,
# finer detail than 4 x 6 tokens carry, and no model that small could read it from the photo.
OVERALL_FROM = ("Lighting", "Depth & Perspective", "Emotional Impact")


def overall_score(dims: tuple[Dimension, ...]) -> float:
    """The mean of the OVERALL_FROM dimensions (every dimension set has them), to the nearest half point."""
    scores = [d.score for d in dims if d.name in OVERALL_FROM]
    return round(2.0 * sum(scores) / len(scores)) / 2.0


def compose_analysis(
    f: img.ImageFeatures, scene: str, advisor: str, names: tuple[str, ...] = SEVEN
) -> Analysis:
    """The analysis the demo app 'produced' for an image with features `f`: a pure function of its inputs."""
    adv = _advisor(advisor)
    scores = dimension_scores(f, scene)
    dims = tuple(_dimension(n, scores[n], f, scene) for n in names)
    # Best and worst first; ties keep the canonical order so the choice is stable.
    ranked = sorted(range(len(dims)), key=lambda i: (-dims[i].score, i))
    focus = _FOCUS_WORD.get(scene, "subject")
    return Analysis(
        image_description=_description(f, scene, adv),
        dimensions=dims,
        overall_score=overall_score(dims),
        key_strengths=tuple(_STRENGTH[dims[i].name] for i in ranked[:2]),
        priority_improvements=tuple(_IMPROVEMENT[dims[i].name].format(focus=focus) for i in ranked[::-1][:2]),
        technical_notes=_technical_notes(f, adv),
    )


# --- raw model outputs ---------------------------------------------------------------------------------------


def _curly(text: str) -> str:
    """Every straight double quote becomes an alternating curly one (the demo's strings contain none)."""
    parts = text.split('"')
    out = [parts[0]]
    for i, part in enumerate(parts[1:]):
        out.append(("\u201c" if i % 2 == 0 else "\u201d") + part)
    return "".join(out)


_COMPACT_STYLES = ("compact", "extra_brace", "curly", "trailing_commas", "unquoted_keys")


def raw_output(data: dict, style: str, f: img.ImageFeatures | None = None) -> str:
    """Model output text for `data` in one of the shapes the app has stored."""
    text = json.dumps(data, ensure_ascii=False, indent=None if style in _COMPACT_STYLES else 2)
    if style in ("compact", "pretty"):
        return text
    if style == "fenced":
        return f"Here is my analysis.\n\n```json\n{text}\n```"
    if style == "thinking":
        look = _brightness_word(f.brightness) if f else "plain"
        thought = f"The frame looks {look}. I will weigh the light first, then the structure."
        return f"<thinking>\n{thought}\n</thinking>\n{text}"
    if style == "extra_brace":
        return text + "\n}"
    if style == "curly":
        return _curly(text)
    if style == "truncated":
        return text[: int(len(text) * 0.55)]
    if style == "trailing_commas":  # every object and list gets a dangling comma, so no inner object parses
        return text.replace("}", ",}").replace("]", ",]")
    if style == "unquoted_keys":
        return re.sub(r'"(\w+)":', r"\1:", text)
    raise ValueError(f"unknown raw output style {style!r}")


def _broken_data(data: dict, fault: str, variant: int) -> dict:
    """A copy of a valid analysis dict with one schema fault."""
    broken = json.loads(json.dumps(data))
    if fault == "missing_fields":
        del broken["overall_score" if variant % 2 == 0 else "technical_notes"]
    elif fault == "score_out_of_range":
        broken["dimensions"][variant % len(broken["dimensions"])]["score"] = 12 if variant % 2 == 0 else 0
    return broken


def _summary_line(analysis: Analysis) -> str:
    scores = analysis.dimension_scores()
    best, worst = max(scores, key=scores.__getitem__), min(scores, key=scores.__getitem__)
    return f"Overall {analysis.overall_score:g} of 10; strongest in {best}, weakest in {worst}."


def markdown_document(advisor: str, analysis: Analysis, raw: str) -> str:
    """The app's markdown form: title, one-sentence summary, then the raw output verbatim."""
    return f"# {_advisor(advisor).name} Analysis\n\n## Summary\n{_summary_line(analysis)}\n\n## Full Analysis\n{raw}"


def html_document(advisor: str, analysis: Analysis) -> str:
    """A bare HTML rendering with no JSON left in it and no "How to Improve" advice: not a card that can be
    recovered (compare `html_card`)."""
    items = "".join(
        f"<li><strong>{html.escape(d.name)}</strong> {d.score:g}/10: {html.escape(d.comment)}</li>"
        for d in analysis.dimensions
    )
    name = html.escape(_advisor(advisor).name)
    return (
        f'<div class="advisor-analysis"><h2>{name}</h2><p>{html.escape(analysis.image_description)}</p>'
        f"<ul>{items}</ul><p>Overall: {analysis.overall_score:g}/10</p></div>"
    )


_RATINGS = ((8.5, "Excellent"), (7.0, "Good"), (5.0, "Fair"), (0.0, "Needs Work"))


def html_card(
    advisor: str, analysis: Analysis, *, description: bool, grade_note: bool, references: bool, inline_scores: bool
) -> str:
    """The older app's analysis card: per dimension a heading, a score written `7.0/10 (Good)`, the comment and
    a "How to Improve:" line, then "Overall Grade x/10"; optionally the image description ("Image Analysis"), a
    "Grade Note" (here the technical notes) and reference-image blocks. `inline_scores` puts each score inside
    its heading instead of beside it, as some card versions did."""
    esc = html.escape
    parts = [f'<div class="analysis-card" data-advisor="{esc(advisor)}">',
             f'<div class="card-header"><h2>{esc(_advisor(advisor).name)}</h2></div>']  # fmt: skip
    if description:
        parts.append(f'<div class="image-analysis"><h3>Image Analysis</h3><p>{esc(analysis.image_description)}</p></div>')
    for d in analysis.dimensions:
        rating = next(word for floor, word in _RATINGS if d.score >= floor)
        score = f'<span class="score">{d.score:.1f}/10 ({rating})</span>'
        header = f"<h4>{esc(d.name)} {score}</h4>" if inline_scores else f"<h4>{esc(d.name)}</h4>{score}"
        parts.append(
            f'<div class="dimension"><div class="dimension-header">{header}</div><p class="comment">{esc(d.comment)}</p>'
            f'<div class="recommendation"><strong>How to Improve:</strong> {esc(d.recommendation)}</div></div>'
        )
    parts.append(f'<div class="overall-grade"><span>Overall Grade</span> <span class="grade">{analysis.overall_score:.1f}/10</span></div>')
    if grade_note:
        parts.append(f'<div class="grade-note"><strong>Grade Note:</strong> {esc(analysis.technical_notes)}</div>')
    if references:
        figures = "".join(
            f'<figure><img src="/static/references/{esc(advisor)}-{k}.jpg" alt=""><figcaption>Reference {k}: '
            f"{esc(_advisor(advisor).name)}, study of {esc(d.name.lower())}</figcaption></figure>"
            for k, d in enumerate(analysis.dimensions[:2], start=1)
        )
        parts.append(f'<div class="reference-images"><h4>Reference Images</h4>{figures}</div>')
    return "\n".join([*parts, "</div>"])


def error_card(message: str) -> str:
    """The older app's card for a failed analysis: a title and the error, no scores."""
    return f'<div class="analysis-card error"><h3>Analysis Error</h3><p>{html.escape(message)}</p></div>'


# --- the job plan ----------------------------------------------------------------------------------------------


@dataclass
class _Job:
    """One row to write, with everything needed to draw its image and store its analysis."""

    job_id: str
    advisor: str
    era: str  # "old" (status done, bare names in source/) or "new" (status completed, uploads/ paths)
    status: str = "completed"
    scene: str = "landscape"
    image: str = "jpeg"  # jpeg | exif | png_alpha | tiny_png | garbage | absent | copy | same_file
    filename: str = ""
    storage: str = "analysis_in_llm_outputs"  # a STORAGE_FORMS entry, "html", "html_error" or "none"
    style: str = "compact"
    fault: str = ""  # the raw-output fault, if any (EXPECTED_ERRORS key)
    names: tuple[str, ...] = SEVEN
    source: _Job | None = None  # the earlier job a duplicate copies
    planted: list[str] = field(default_factory=list)
    model: str | None = None  # the newer app records which model answered


@dataclass(frozen=True)
class DemoSummary:
    app_dir: Path
    db_path: Path
    jobs_total: int
    completed_by_advisor: dict[str, int]  # completed jobs per advisor id
    planted: dict[str, list[str]]  # fault/case name -> job ids that carry it


def _count(n: int, minimum: int, rate: float) -> int:
    """How many jobs carry a fault: at least `minimum`, growing slowly with the size of the demo."""
    return max(minimum, round(n * rate))


def _uuid(rng: np.random.Generator) -> str:
    return str(uuid.UUID(bytes=rng.bytes(16), version=4))


def _advisor_mix(n: int) -> list[str]:
    """Completed single-advisor jobs: okeefe exactly 3 and watkins ~4% (small advisors, to show what little data
    does), weston ~38% and ansel the rest (each enough for a validation set worth reading)."""
    watkins, weston = round(n * 0.04), round(n * 0.38)
    return ["okeefe"] * 3 + ["watkins"] * watkins + ["weston"] * weston + ["ansel"] * (n - 3 - watkins - weston)


# Exclusive faults: each lands on its own job(s). (name, minimum, rate, preferred era or "")
_EXCLUSIVE_FAULTS: tuple[tuple[str, int, float, str], ...] = (
    ("missing_image", 1, 0.002, ""),
    ("missing_analysis", 1, 0.002, ""),
    ("truncated_json", 1, 0.002, "new"),
    ("invalid_json", 2, 0.002, ""),
    ("missing_fields", 1, 0.002, ""),
    ("score_out_of_range", 1, 0.002, ""),
    ("six_dimensions", 2, 0.003, "old"),
    ("nine_dimensions", 2, 0.003, "new"),
    ("duplicate_image", 1, 0.002, "new"),
    ("duplicate_job_same_file", 1, 0.002, "new"),
    ("rag_suffix_id", 2, 0.003, "new"),
    ("tiny_image", 1, 0.0005, "new"),
    ("undecodable_image", 1, 0.001, ""),
    ("png_alpha", 1, 0.001, "new"),
    ("path_traversal", 1, 0.0005, ""),
    ("absolute_path_outside", 1, 0.0005, ""),
    ("html_analysis", 1, 0.002, "old"),
    ("curly_quotes", 1, 0.0005, "new"),
    ("html_error_card", 1, 0.002, "old"),
)
# Frequent, harmless output shapes: (style, share of the remaining valid jobs).
_STYLE_SHARES = (("fenced", 0.09), ("thinking", 0.05), ("extra_brace", 0.03), ("pretty", 0.25))


def _pick(rng: np.random.Generator, pool: list[int], jobs: list[_Job], k: int, era: str) -> list[int]:
    """Take k jobs out of `pool`, preferring the given era; deterministic given rng."""
    preferred = [i for i in pool if not era or jobs[i].era == era]
    candidates = preferred if len(preferred) >= k else pool
    chosen = sorted(rng.choice(len(candidates), size=min(k, len(candidates)), replace=False).tolist())
    picked = [candidates[c] for c in chosen]
    taken = set(picked)
    pool[:] = [i for i in pool if i not in taken]
    return picked


def _scene_for(advisor: str, rng: np.random.Generator) -> str:
    # Landscape advisors see mostly landscapes, the others a mix.
    weights = {"ansel": (0.6, 0.15, 0.25), "watkins": (0.7, 0.1, 0.2), "weston": (0.35, 0.4, 0.25)}
    return str(rng.choice(img.SCENES, p=weights.get(advisor, (0.34, 0.33, 0.33))))


def _plan(rng: np.random.Generator, n: int, legacy: bool, large_images: bool) -> list[_Job]:
    advisors = _advisor_mix(n)
    rng.shuffle(advisors)
    n_unfinished, n_multi = _count(n, 7, 0.01), _count(n, 3, 0.001)
    old_cut = n if legacy else int(n * 0.45)
    # The older app marked finished jobs "done", the newer one "completed".
    jobs = [
        _Job(_uuid(rng), a, "old", status="done") if i < old_cut else _Job(_uuid(rng), a, "new")
        for i, a in enumerate(advisors)
    ]
    for j in jobs:
        j.scene = _scene_for(j.advisor, rng)
    _assign_faults(rng, jobs, n, large_images)
    extras = _extras(rng, n_unfinished, n_multi, legacy)
    # Extras slot in among the completed jobs; older-era extras only among older jobs.
    for extra in extras:
        lo, hi = (0, old_cut) if extra.era == "old" else (old_cut, len(jobs))
        jobs.insert(int(rng.integers(lo, hi + 1)), extra)
        old_cut += extra.era == "old"
    _assign_storage(rng, jobs, legacy)
    return jobs


def _assign_faults(rng: np.random.Generator, jobs: list[_Job], n: int, large_images: bool) -> None:
    pool = [i for i, j in enumerate(jobs) if j.advisor != "okeefe"]  # okeefe stays 3 clean jobs
    for name, minimum, rate, era in _EXCLUSIVE_FAULTS:
        for k, i in enumerate(_pick(rng, pool, jobs, _count(n, minimum, rate), era)):
            _apply_fault(rng, jobs, i, name, k, pool)
    exif = _pick(rng, pool, jobs, 2 if large_images else 1, "old")
    for i in exif:
        jobs[i].image, jobs[i].scene = "exif", "landscape"
        jobs[i].planted.append("exif_rotated")
    for style, share in _STYLE_SHARES:
        for i in _pick(rng, pool, jobs, max(1, round(len(pool) * share)), ""):
            jobs[i].style = style
            if style != "pretty":
                jobs[i].planted.append({"fenced": "fenced_json", "thinking": "thinking_tags"}.get(style, style))


def _apply_fault(rng: np.random.Generator, jobs: list[_Job], i: int, name: str, k: int, pool: list[int]) -> None:
    job = jobs[i]
    job.planted.append(name)
    if name in ("truncated_json", "missing_fields", "score_out_of_range"):
        job.fault = name
    elif name == "invalid_json":
        job.fault, job.style = name, ("trailing_commas", "unquoted_keys")[k % 2]
    elif name == "curly_quotes":
        job.style = "curly"
    elif name == "six_dimensions":
        job.names = SIX
    elif name == "nine_dimensions":
        job.names = NINE
    elif name in ("duplicate_image", "duplicate_job_same_file"):
        earlier = [s for s in pool if s < i and jobs[s].advisor == job.advisor and jobs[s].era == job.era]
        if not earlier:  # no clean earlier job of this advisor: fall back to a plain clean job
            job.planted.remove(name)
            return
        source = earlier[int(rng.integers(len(earlier)))]
        pool.remove(source)  # the original must stay a plain, readable image
        job.source = jobs[source]
        job.image = "copy" if name == "duplicate_image" else "same_file"
        job.scene = job.source.scene
    elif name == "rag_suffix_id":
        job.job_id += " (rag)"
    elif name == "tiny_image":
        job.image = "tiny_png"
    elif name == "png_alpha":
        job.image = "png_alpha"
    elif name == "undecodable_image":
        job.image = "garbage"
    elif name in ("missing_image", "path_traversal", "absolute_path_outside"):
        job.image = "absent"
        job.filename = {"path_traversal": "../../etc/passwd", "absolute_path_outside": "/etc/hosts"}.get(name, "")
    elif name == "html_analysis":
        job.storage = "html"
    elif name == "html_error_card":
        job.storage = "html_error"
    elif name == "missing_analysis":
        job.storage = "none"


def _extras(rng: np.random.Generator, n_unfinished: int, n_multi: int, legacy: bool) -> list[_Job]:
    """Rows that are not completed single-advisor jobs: unfinished work and multi-advisor requests."""
    extras = []
    statuses = ("pending", "processing", "failed", "error") if legacy else UNFINISHED_STATUSES
    for k in range(n_unfinished):
        status = statuses[k % len(statuses)]
        era = "old" if legacy or status in ("failed", "error") and k % 2 else "new"
        job = _Job(_uuid(rng), str(rng.choice(["ansel", "weston", "watkins"])), era, status=status)
        job.scene, job.storage, job.planted = _scene_for(job.advisor, rng), "none", ["not_finished"]
        extras.append(job)
    for k in range(n_multi):
        advisor = ("all", "random", "ansel,weston")[k % 3]
        job = _Job(_uuid(rng), advisor, "old", status="done")
        job.scene, job.storage, job.planted = _scene_for("ansel", rng), "analysis_in_markdown_text", ["advisor_all"]
        extras.append(job)
    return extras


def _assign_storage(rng: np.random.Generator, jobs: list[_Job], legacy: bool) -> None:
    old_forms = (
        ("analysis_in_file_path", 0.35),
        ("analysis_in_markdown_text", 0.55),
        ("analysis_in_fallback_file", 0.10),
        ("analysis_in_html_card", 0.35),
    )
    new_forms = (
        ("analysis_in_llm_outputs", 0.45),
        ("analysis_in_markdown_text", 0.25),
        ("analysis_file_column", 0.20),
        ("analysis_in_fallback_file", 0.10),
    )
    for job in jobs:
        if job.status not in ("completed", "done"):
            continue
        if job.storage in ("html", "html_error", "none") or "advisor_all" in job.planted:
            continue
        forms = old_forms if job.era == "old" else new_forms
        if job.fault or job.style not in ("compact", "pretty"):  # a card keeps no raw output to carry these
            forms = tuple(f for f in forms if f[0] != "analysis_in_html_card")
        if job.job_id.endswith(" (rag)"):  # keep odd ids out of file names
            forms = (("analysis_in_markdown_text" if legacy else "analysis_in_llm_outputs", 1.0),)
        names, weights = zip(*forms)
        job.storage = str(rng.choice(names, p=np.array(weights) / sum(weights)))
    _ensure_every_form(jobs, legacy)


def _ensure_every_form(jobs: list[_Job], legacy: bool) -> None:
    """Small demos could miss a storage form by chance; convert a clean job so each form appears."""
    legacy_forms = ("analysis_in_file_path", "analysis_in_markdown_text", "analysis_in_fallback_file", "analysis_in_html_card")
    wanted = legacy_forms if legacy else STORAGE_FORMS
    for form in wanted:
        counts = Counter(j.storage for j in jobs if _is_plain(j))
        if counts[form]:
            continue
        era = "old" if form in OLDER_ERA_FORMS or legacy else "new"
        for j in jobs:
            if _is_plain(j) and j.era == era and counts[j.storage] > 1:
                j.storage = form
                break


def _is_plain(job: _Job) -> bool:
    """A finished single-advisor job with no planted case at all."""
    return job.status in ("completed", "done") and not job.planted and job.advisor in ADVISORS


# --- images, rows and files ------------------------------------------------------------------------------------

_SMALL_SIZES = ((320, 240), (320, 240), (400, 300), (480, 360))
# large_images=False: thumbnails drawn at their final size, for big benchmark demos.
_COMPACT_SIZES = ((64, 48),)
_PHONE_UPRIGHT = (3024, 4032)  # stored as 4032x3024 with Orientation=6
_UPLOAD_NAMES = ("IMG_4821", "DSC01234", "PXL_20250312", "sunset", "street", "portrait", "trip", "photo")
_MODELS = ("Qwen/Qwen3-VL-4B-Instruct", "Qwen/Qwen3-VL-8B-Instruct")
_ERRORS = ("[metal::malloc] Resource limit exceeded", "Unable to parse response", "Timeout after 300 s")
_START = datetime(2025, 1, 6, 8, 0, 0)
_SPAN = timedelta(days=300)


@dataclass
class _Made:
    """One job's picture: the bytes to store (None: nothing written), the bytes whose decoded, upright
    picture the analysis describes, and the features measured from them (filled in per batch)."""

    data: bytes | None
    measured: bytes | None
    filename: str
    twin: _Made | None = None  # duplicates share the measurements of the job they copy
    features: img.ImageFeatures | None = None

    def resolved(self) -> img.ImageFeatures:
        features = self.twin.resolved() if self.twin is not None else self.features
        assert features is not None, "measure_batch runs before any analysis is composed"
        return features


def _size(rng: np.random.Generator, scene: str, large_images: bool) -> tuple[int, int]:
    sizes = _SMALL_SIZES if large_images else _COMPACT_SIZES
    w, h = sizes[int(rng.integers(len(sizes)))]
    upright = scene == "portrait" and rng.random() < 0.7 or rng.random() < 0.15
    return (h, w) if upright else (w, h)


def _filename(rng: np.random.Generator, job: _Job, ext: str) -> str:
    """App-style name: older jobs a bare name in source/, newer ones uploads/<uuid4>_<name>."""
    tag = rng.bytes(4).hex()
    if job.era == "old":
        if ext == "png":
            return f"screenshot-{tag}.png"
        if job.image == "exif" or rng.random() < 0.8:
            return f"photo-{_uuid(rng).upper()}-{tag}.jpg"
        return f"mike-shrub-{tag}.jpg"
    return f"uploads/{_uuid(rng)}_{_UPLOAD_NAMES[int(rng.integers(len(_UPLOAD_NAMES)))]}.{ext}"


def _image_path(filename: str) -> str:
    """Where the app keeps a file named in `jobs.filename`, relative to the app dir."""
    return filename if filename.startswith("uploads/") else f"source/{filename}"


def _make_image(rng: np.random.Generator, job: _Job, large_images: bool, made: dict[int, _Made]) -> _Made:
    if job.source is not None:
        src = made[id(job.source)]
        if job.image == "same_file":
            return _Made(None, None, src.filename, twin=src)
        return _Made(src.data, None, _filename(rng, job, "jpg"), twin=src)
    if job.image == "exif":
        size = _PHONE_UPRIGHT if large_images else (360, 480)
        params = img.random_params(rng, job.scene, (size[0] // 8, size[1] // 8))
        data = img.encode_exif_rotated_jpeg(img.render(params, size))
        return _Made(data, data, _filename(rng, job, "jpg"))
    if job.image == "tiny_png":
        data = img.encode_png(img.render(img.random_params(rng, job.scene, (1, 1))))
        return _Made(data, data, _filename(rng, job, "png"))
    params = img.random_params(rng, job.scene, _size(rng, job.scene, large_images))
    picture = img.render(params)
    if job.image == "png_alpha":
        data = img.encode_png(img.with_alpha(picture, rng))
        return _Made(data, data, _filename(rng, job, "png"))
    data = img.encode_jpeg(picture)
    filename = job.filename or _filename(rng, job, "jpg")
    if job.image == "garbage":  # the analysis still describes the picture the user meant to upload
        return _Made(img.garbage_bytes(rng), data, filename)
    if job.image == "absent":
        return _Made(None, data, filename)
    return _Made(data, data, filename)


def _measure_batch(batch: list[_Made]) -> None:
    todo = [m for m in batch if m.measured is not None]
    for m, features in zip(todo, img.measure_many([img.load_upright(m.measured) for m in todo]), strict=True):
        m.features = features


def _stamp(moment: datetime, era: str) -> str:
    # The older app wrote str(datetime) without fractions; the newer one isoformat() with microseconds.
    return moment.strftime("%Y-%m-%d %H:%M:%S") if era == "old" else moment.isoformat(timespec="microseconds")


@dataclass
class _Stored:
    """The analysis-bearing columns of one row plus any analysis file to write beside the DB."""

    analysis_file: str | None = None
    analysis_markdown: str | None = None
    llm_outputs: str | None = None
    files: dict[str, str] = field(default_factory=dict)


def _store(job: _Job, analysis: Analysis, raw: str, rng: np.random.Generator, legacy: bool, when: str) -> _Stored:
    """Put one analysis where the app of the job's era would have put it."""
    if job.storage == "none":
        return _Stored()
    if job.storage == "html":
        page = html_document(job.advisor, analysis)
        return _Stored(analysis_markdown=page, llm_outputs=None if legacy else json.dumps({job.advisor: page}))
    if job.storage == "html_error":
        return _Stored(analysis_markdown=error_card(_ERRORS[int(rng.integers(len(_ERRORS)))]))
    if job.storage == "analysis_in_html_card":
        draws = rng.random(4)
        card = html_card(job.advisor, analysis, description=draws[0] < 0.5, grade_note=draws[1] < 0.6,
                         references=draws[2] < 0.4, inline_scores=draws[3] < 0.3)  # fmt: skip
        return _Stored(analysis_markdown=card, llm_outputs=None if legacy else json.dumps({job.advisor: card}))
    doc = markdown_document(job.advisor, analysis, raw)
    if job.storage == "analysis_in_fallback_file":
        return _Stored(files={f"analysis_md/analysis-{job.advisor}-{job.job_id}.md": doc})
    if job.storage == "analysis_in_file_path":
        path = f"analysis_md/{job.advisor}_{job.job_id[:8]}.md"
        return _Stored(analysis_markdown=path, files={path: doc if rng.random() < 0.5 else raw})
    if job.storage == "analysis_file_column":
        path = f"analysis_md/{job.job_id}.json"
        return _Stored(analysis_file=path, files={path: raw})
    newer = json.dumps(
        {
            "prompt": build_prompt(SYSTEM_PROMPT, _advisor(job.advisor).prompt),
            "response": raw,
            "summary": _summary_line(analysis),
            "model": job.model,
            "timestamp": when,
        },
        ensure_ascii=False,
    )
    if job.storage == "analysis_in_llm_outputs":
        return _Stored(llm_outputs=newer)
    # analysis_in_markdown_text: the newer app also kept llm_outputs; the older one kept rendered HTML.
    if legacy:
        return _Stored(analysis_markdown=doc)
    if job.era == "new":
        return _Stored(analysis_markdown=doc, llm_outputs=newer)
    if job.fault:  # the older app rendered HTML only from an output it could parse
        return _Stored(analysis_markdown=doc)
    page = html_document(job.advisor, analysis)
    older = {adv: page for adv in job.advisor.split(",")} if rng.random() < 0.5 else {
        job.advisor: {"html": page, "mode_used": "base", "metadata": {}}
    }
    return _Stored(analysis_markdown=doc, llm_outputs=json.dumps(older))


def _raw_for(job: _Job, analysis: Analysis, f: img.ImageFeatures, variant: int) -> tuple[str, str | None]:
    """(raw model output, expected parse error or None)."""
    data = analysis_to_dict(analysis)
    if job.fault in ("missing_fields", "score_out_of_range"):
        return raw_output(_broken_data(data, job.fault, variant), job.style, f), job.fault
    if job.fault == "truncated_json":
        return raw_output(data, "truncated", f), job.fault
    if job.fault == "invalid_json":
        return raw_output(data, job.style, f), job.fault
    storage_fault = {"html": "html_analysis", "html_error": "html_error_card", "none": "missing_analysis"}.get(job.storage, "")
    return raw_output(data, job.style, f), EXPECTED_ERRORS.get(storage_fault)


def _row(job: _Job, stored: _Stored, rng: np.random.Generator, when: datetime) -> dict:
    finished = job.status in ("completed", "done")
    started = when + timedelta(seconds=float(rng.uniform(0.5, 5.0)))
    completed = started + timedelta(seconds=float(rng.uniform(20, 90))) if finished and rng.random() < 0.6 else None
    new = job.era == "new"
    rag = job.job_id.endswith(" (rag)")
    mode = "rag" if rag else str(rng.choice(["base", "base", "fine_tuned"])) if new else None
    return {
        "id": job.job_id,
        "filename": job.filename,
        "advisor": job.advisor,
        "status": job.status,
        "analysis_file": stored.analysis_file,
        "analysis_markdown": stored.analysis_markdown,
        "llm_outputs": stored.llm_outputs,
        "created_at": _stamp(when, job.era),
        "started_at": _stamp(started, job.era) if new else None,
        "completed_at": _stamp(completed, job.era) if completed else None,
        "mode": mode,
        "model": job.model,
        # The app recorded an adapter for fine_tuned jobs even when it never loaded one.
        "adapter": f"adapters/{job.advisor}" if mode == "fine_tuned" else None,
        "enable_rag": (1 if rag else 0) if new else None,
        "error": _ERRORS[int(rng.integers(len(_ERRORS)))] if job.status in ("failed", "error") else None,
    }


@dataclass
class _Output:
    rows: list[dict] = field(default_factory=list)
    truth: list[dict] = field(default_factory=list)


_CHUNK = 256  # jobs drawn, then measured together


def _produce(
    jobs: list[_Job], app: Path, seed: int, stream: int, large_images: bool, legacy: bool, start: datetime,
    step: timedelta,
) -> _Output:
    """Draw every image, write image and analysis files under `app`, and return rows and ground truth."""
    out, made = _Output(), {}
    originals = {id(j.source) for j in jobs if j.source is not None}
    for first in range(0, len(jobs), _CHUNK):
        chunk = jobs[first : first + _CHUNK]
        rngs = [np.random.default_rng([seed, stream, first + k]) for k in range(len(chunk))]
        for job, rng in zip(chunk, rngs, strict=True):
            made[id(job)] = _make_image(rng, job, large_images, made)
        _measure_batch([made[id(job)] for job in chunk])
        for k, (job, rng) in enumerate(zip(chunk, rngs, strict=True)):
            when = start + step * (first + k) + timedelta(seconds=float(rng.uniform(0, step.total_seconds() / 2)))
            _finish(job, made[id(job)], rng, app, legacy, when, first + k, out)
        for job in chunk:  # only duplicates' originals need their bytes later
            if id(job) not in originals:
                made[id(job)].data = made[id(job)].measured = None
    return out


def _inside(app: Path, rel: str) -> Path:
    """app/rel, refusing anything that would land outside the app dir (the demo plants such names)."""
    if Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise ValueError(f"refusing to write outside the demo app: {rel!r}")
    return app / rel


def _finish(
    job: _Job, m: _Made, rng: np.random.Generator, app: Path, legacy: bool, when: datetime, k: int, out: _Output
) -> None:
    """Write the job's files and append its row and ground truth."""
    job.filename = m.filename
    if m.data is not None:
        _inside(app, _image_path(m.filename)).write_bytes(m.data)
    features = m.resolved()
    job.model = _MODELS[int(rng.integers(len(_MODELS)))] if job.era == "new" else None
    finished = job.status in ("completed", "done")
    analysis = compose_analysis(features, job.scene, job.advisor, job.names) if finished else None
    raw, expected = _raw_for(job, analysis, features, k) if analysis else ("", None)
    stored = _store(job, analysis, raw, rng, legacy, _stamp(when, "new")) if analysis else _Stored()
    for rel, text in stored.files.items():
        _inside(app, rel).write_text(text, encoding="utf-8")
    out.rows.append(_row(job, stored, rng, when))
    out.truth.append(_truth(job, m, features, analysis, expected))


def _rounded(f: img.ImageFeatures) -> dict:
    values = {name: getattr(f, name) for name in img.ImageFeatures.__dataclass_fields__}
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in values.items()}


def _truth(job: _Job, m: _Made, features: img.ImageFeatures, analysis: Analysis | None, expected: str | None) -> dict:
    on_disk = m.data is not None or job.image == "same_file"
    return {
        "job_id": job.job_id,
        "advisor": job.advisor,
        "status": job.status,
        "scene": job.scene,
        "image": _image_path(m.filename) if on_disk and job.image not in ("absent",) else None,
        "storage": job.storage if analysis else None,
        "style": job.style,
        "planted": job.planted,
        "expected_error": expected,
        "intended": canonical_json(analysis) if analysis and expected is None else None,
        "features": _rounded(features),
    }


# --- database ----------------------------------------------------------------------------------------------------


def _create_db(path: Path, legacy: bool) -> None:
    columns = LEGACY_COLUMNS if legacy else CURRENT_COLUMNS
    types = {"enable_rag": "INTEGER"}
    defs = ", ".join(f"{c} {types.get(c, 'TEXT')}" + (" PRIMARY KEY" if c == "id" else "") for c in columns)
    with sqlite3.connect(path) as db:
        db.execute(f"CREATE TABLE jobs ({defs})")
        db.execute("CREATE TABLE advisors (id TEXT PRIMARY KEY, name TEXT, bio TEXT, prompt TEXT, category TEXT)")
        db.execute("CREATE TABLE config (key TEXT PRIMARY KEY, value TEXT)")
        db.executemany(
            "INSERT INTO advisors VALUES (?, ?, ?, ?, ?)",
            [(a.id, a.name, a.bio, a.prompt, a.category) for a in ADVISORS.values()],
        )
        db.execute("INSERT INTO config VALUES ('system_prompt', ?)", (SYSTEM_PROMPT,))
    db.close()


def _job_columns(db: sqlite3.Connection) -> tuple[str, ...]:
    return tuple(r[1] for r in db.execute("PRAGMA table_info(jobs)"))


def _insert_rows(path: Path, rows: list[dict]) -> None:
    with sqlite3.connect(path) as db:
        columns = _job_columns(db)
        sql = f"INSERT INTO jobs ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
        db.executemany(sql, [tuple(r.get(c) for c in columns) for r in rows])
    db.close()


# --- manifest ----------------------------------------------------------------------------------------------------


def _planted(jobs_truth: list[dict], rows: list[dict]) -> dict[str, list[str]]:
    planted: dict[str, list[str]] = {key: [] for key in PLANTED_KEYS}
    for t, row in zip(jobs_truth, rows, strict=True):
        for key in t["planted"]:
            planted[key].append(t["job_id"])
        if t["intended"] is not None and t["storage"] in STORAGE_FORMS:
            planted[t["storage"]].append(t["job_id"])
        if row["status"] == "done":
            planted["legacy_status_done"].append(t["job_id"])
        if str(row["filename"]).startswith("uploads/"):
            planted["uploads_path"].append(t["job_id"])
    return planted


def _completed_by_advisor(rows: list[dict]) -> dict[str, int]:
    counts = Counter(r["advisor"] for r in rows if r["status"] in ("completed", "done"))
    return dict(sorted(counts.items()))


def _manifest(summary: DemoSummary, settings: dict) -> dict:
    return {
        "generator": GENERATOR_TAG,
        **settings,
        "app_dir": str(summary.app_dir),
        "db_path": str(summary.db_path),
        "jobs_total": summary.jobs_total,
        "completed_by_advisor": summary.completed_by_advisor,
        "planted": summary.planted,
        "truth_file": TRUTH_NAME,
    }


def _write_truth(path: Path, truth: list[dict], *, append: bool = False) -> None:
    with path.open("a" if append else "w", encoding="utf-8") as fh:
        for t in truth:
            fh.write(json.dumps(t, ensure_ascii=False) + "\n")


def load_truth(app_dir: Path) -> list[dict]:
    """Per-job ground truth of a demo app: scene, storage form, intended canonical JSON or expected error."""
    with (Path(app_dir) / TRUTH_NAME).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def read_manifest(app_dir: Path) -> dict | None:
    """The demo manifest, or None when `app_dir` is not a demo app made by this generator."""
    path = Path(app_dir) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("generator") == GENERATOR_TAG else None


# --- public API --------------------------------------------------------------------------------------------------


def _check_target(app_dir: Path) -> None:
    if app_dir.exists() and not app_dir.is_dir():
        raise ValueError(f"{app_dir} exists and is not a directory")
    if app_dir.is_dir() and any(app_dir.iterdir()) and read_manifest(app_dir) is None:
        raise ValueError(
            f"{app_dir} is not empty and is not a previous demo app (no {MANIFEST_NAME} from this generator); "
            "refusing to write demo data into it. Pick an empty or new directory."
        )


def generate_demo_app(
    app_dir: Path, *, seed: int = 7, n_jobs: int = DEFAULT_JOBS, schema: str = "current", large_images: bool = True
) -> DemoSummary:
    """Write a complete demo app (DB, images, analysis files, manifest, truth) into `app_dir`.

    Same arguments, same bytes. A previous demo app in `app_dir` is replaced as a whole (atomically);
    any other non-empty directory is refused.
    """
    if schema not in ("current", "legacy"):
        raise ValueError(f"schema must be 'current' or 'legacy', not {schema!r}")
    if n_jobs < MIN_JOBS:
        raise ValueError(f"n_jobs must be at least {MIN_JOBS} so every planted fault fits, got {n_jobs}")
    app_dir = Path(app_dir).absolute()
    _check_target(app_dir)
    legacy = schema == "legacy"
    jobs = _plan(np.random.default_rng([seed, 0]), n_jobs, legacy, large_images)
    with staged_dir(app_dir) as stage:
        stage.chmod(0o755)  # a normal, readable app dir (the staging dir starts private)
        for sub in ("source", "uploads", "analysis_md"):
            (stage / sub).mkdir()
        out = _produce(jobs, stage, seed, 1, large_images, legacy, _START, _SPAN / len(jobs))
        _create_db(stage / DB_NAME, legacy)
        _insert_rows(stage / DB_NAME, out.rows)
        summary = DemoSummary(
            app_dir=app_dir,
            db_path=app_dir / DB_NAME,
            jobs_total=len(out.rows),
            completed_by_advisor=_completed_by_advisor(out.rows),
            planted=_planted(out.truth, out.rows),
        )
        settings = {"seed": seed, "n_jobs": n_jobs, "schema": schema, "large_images": large_images}
        _write_truth(stage / TRUTH_NAME, out.truth)
        write_json(stage / MANIFEST_NAME, _manifest(summary, settings))
        (stage / MANIFEST_NAME).chmod(0o644)
    return summary


# Where appended jobs keep their analyses when both eras are asked for, in turn: each era's file forms included.
_APPEND_FORMS = {
    "old": ("analysis_in_file_path", "analysis_in_fallback_file", "analysis_in_markdown_text"),
    "new": ("analysis_in_llm_outputs", "analysis_file_column", "analysis_in_fallback_file"),
}


def append_demo_jobs(
    app_dir: Path, n: int, *, seed: int, advisor: str | Sequence[str] = "ansel", both_eras: bool = False
) -> list[str]:
    """Simulate the app finishing `n` more jobs: clean, finished, new images; advisors take turns. Stored the DB's
    era's way; with `both_eras` (a current-era DB) every other job is an older app's (status done, a bare name in
    source/, the analysis in a referenced file, a fallback file or the row), and the newer ones vary their forms.

    Randomness comes from (seed, rows already in the DB), so repeated calls add different jobs.
    Returns the new job ids.
    """
    advisors = (advisor,) if isinstance(advisor, str) else tuple(advisor)
    app_dir = Path(app_dir)
    db_path = app_dir / DB_NAME
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not db_path.is_file():
        raise ValueError(f"no {DB_NAME} in {app_dir}; generate a demo app first")
    with sqlite3.connect(db_path) as db:
        existing = {r[0] for r in db.execute("SELECT id FROM jobs")}
        stamps = [r[0] for r in db.execute("SELECT created_at FROM jobs WHERE created_at IS NOT NULL")]
        legacy = "llm_outputs" not in _job_columns(db)
    db.close()
    manifest = read_manifest(app_dir) or {}
    rng = np.random.default_rng([seed, len(existing), 2])
    eras = ("old", "new") if both_eras and not legacy else ("old",) if legacy else ("new",)
    jobs = []
    for i in range(n):
        era = eras[i % len(eras)]
        job = _Job(_uuid(rng), advisors[i % len(advisors)], era)
        while job.job_id in existing:
            job.job_id = _uuid(rng)
        job.status = "done" if era == "old" else "completed"
        job.scene = _scene_for(job.advisor, rng)
        if both_eras:
            forms = _APPEND_FORMS[era]
            job.storage = forms[(i // len(eras)) % len(forms)]
        else:
            job.storage = "analysis_in_markdown_text" if legacy else "analysis_in_llm_outputs"
        jobs.append(job)
    # Both eras' formats parse with fromisoformat; new jobs start a little after the newest one.
    start = max((datetime.fromisoformat(v) for v in stamps), default=_START) + timedelta(minutes=5)
    large = bool(manifest.get("large_images", True))
    out = _produce(jobs, app_dir, seed, 100_000 + len(existing), large, legacy, start, timedelta(minutes=7))
    _insert_rows(db_path, out.rows)
    if manifest:
        _update_manifest(app_dir, manifest, out)
    return [j.job_id for j in jobs]


def _update_manifest(app_dir: Path, manifest: dict, out: _Output) -> None:
    counts = Counter(manifest.get("completed_by_advisor", {}))
    counts.update(r["advisor"] for r in out.rows)
    manifest["completed_by_advisor"] = dict(sorted(counts.items()))
    manifest["jobs_total"] = int(manifest.get("jobs_total", 0)) + len(out.rows)
    planted = manifest.setdefault("planted", {})
    for t, row in zip(out.truth, out.rows, strict=True):
        planted.setdefault(t["storage"], []).append(t["job_id"])
        key = "legacy_status_done" if row["status"] == "done" else "uploads_path"
        planted.setdefault(key, []).append(t["job_id"])
    manifest["appended"] = int(manifest.get("appended", 0)) + len(out.rows)
    _write_truth(app_dir / TRUTH_NAME, out.truth, append=True)
    write_json(app_dir / MANIFEST_NAME, manifest)
    (app_dir / MANIFEST_NAME).chmod(0o644)
