"""The one analysis schema, its tolerant parser, the canonical serializer and the prompt builder.

Training, evaluation and serving all go through this module, so the text a model is trained to emit is exactly
the text the evaluator and the server parse.
"""

from __future__ import annotations

import html
import json
import math
import re
from dataclasses import dataclass, field

# Canonical dimension order; the app has produced 6-, 7- and 9-dimension variants of this list.
DIMENSION_NAMES: tuple[str, ...] = (
    "Composition",
    "Lighting",
    "Focus & Sharpness",
    "Color Harmony",
    "Depth & Perspective",
    "Visual Balance",
    "Emotional Impact",
    "Subject Isolation",
    "Subject Matter",
)
SCORE_MIN, SCORE_MAX = 1.0, 10.0
MAX_DIMENSIONS = len(DIMENSION_NAMES)  # the app's largest set; more is a runaway output, not an analysis
MAX_CASE_STUDIES = 3
REQUIRED_FIELDS: tuple[str, ...] = (
    "image_description",
    "dimensions",
    "overall_score",
    "key_strengths",
    "priority_improvements",
    "technical_notes",
)

DEFAULT_INSTRUCTION = (
    "Analyze this photograph. Answer with one JSON object and nothing else, with the keys "
    "image_description (string), dimensions (a list of objects with name, score from 1 to 10, comment and "
    "recommendation, for: " + ", ".join(DIMENSION_NAMES[:7]) + "), overall_score (number from 1 to 10), "
    "key_strengths (list of strings), priority_improvements (list of strings) and technical_notes (string)."
)


@dataclass(frozen=True)
class Dimension:
    name: str
    score: float
    comment: str
    recommendation: str
    case_study_id: str | None = None
    quote_id: str | None = None


@dataclass(frozen=True)
class CaseStudy:
    image_title: str
    year: str
    dimension: str
    explanation: str


@dataclass(frozen=True)
class Analysis:
    image_description: str
    dimensions: tuple[Dimension, ...]
    overall_score: float
    key_strengths: tuple[str, ...]
    priority_improvements: tuple[str, ...]
    technical_notes: str
    case_studies: tuple[CaseStudy, ...] = ()

    def dimension_scores(self) -> dict[str, float]:
        return {d.name: d.score for d in self.dimensions}


@dataclass(frozen=True)
class ParseResult:
    """What came out of one raw model output or stored analysis.

    `error` is a stable code usable as a skip reason (None when `analysis` is set); `field_errors` maps each
    top-level field that failed validation to a message, so evaluation can report per-field compliance.
    """

    analysis: Analysis | None
    error: str | None = None
    detail: str = ""
    field_errors: dict[str, str] = field(default_factory=dict)
    data: dict | None = None

    @property
    def ok(self) -> bool:
        return self.analysis is not None


# --- extraction --------------------------------------------------------------------------------------------

_THINKING = re.compile(r"<(thinking|think)>.*?</\1>", re.DOTALL | re.IGNORECASE)
_CURLY_DOUBLE = str.maketrans({"\u201c": '"', "\u201d": '"', "\u201e": '"', "\u2033": '"'})
_FULL_ANALYSIS = "## Full Analysis"


def _balanced_object(text: str, start: int) -> str | None:
    """The substring from text[start] == '{' to its matching '}', string-aware; None when it never closes."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        ch = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start : i + 1]
    return None


def extract_json_object(raw: str) -> tuple[dict | None, str | None, str]:
    """Find the analysis object in raw model output: fences, thinking blocks, curly quotes, HTML escapes and
    trailing junk (an extra `}`) are tolerated. Returns (object, error_code, detail)."""
    text = _THINKING.sub("", raw)
    if "&quot;" in text or "&#34;" in text:
        text = html.unescape(text)
    if _FULL_ANALYSIS in text:
        text = text[text.index(_FULL_ANALYSIS) + len(_FULL_ANALYSIS) :]
    if "{" not in text:
        return None, "no_json", "no '{' in the text"
    last_error = ""
    saw_unclosed = False
    for variant in (text, text.translate(_CURLY_DOUBLE)):
        pos = variant.find("{")
        while pos != -1:
            candidate = _balanced_object(variant, pos)
            if candidate is None:
                saw_unclosed = True
                break  # every later '{' sits inside this unclosed object
            try:
                value = json.loads(candidate)
            except json.JSONDecodeError as exc:
                last_error = f"{exc.msg} at char {exc.pos}"
            except RecursionError:  # thousands of nested brackets: garbage, and must not crash the caller
                last_error = "nested too deeply"
            else:
                if isinstance(value, dict):
                    return value, None, ""
            # objects nested in a broken one are fragments of it, not answers: resume after it
            pos = variant.find("{", pos + len(candidate))
    if saw_unclosed and not last_error:
        return None, "truncated_json", "the JSON object never closes (output cut off?)"
    return None, "invalid_json", last_error or "no JSON object found"


# --- validation --------------------------------------------------------------------------------------------


def _as_score(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if isinstance(value, (int, float)) and math.isfinite(value):
        return round(float(value), 2)
    return None


def _text(value: object) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def _text_list(value: object) -> tuple[str, ...] | None:
    if not isinstance(value, list) or not value:
        return None
    items = tuple(s.strip() for s in value if isinstance(s, str) and s.strip())
    return items if len(items) == len(value) else None


def _dimension(raw: object, index: int) -> tuple[Dimension | None, str]:
    if not isinstance(raw, dict):
        return None, f"dimension {index} is not an object"
    name, comment, recommendation = _text(raw.get("name")), _text(raw.get("comment")), _text(raw.get("recommendation"))
    score = _as_score(raw.get("score"))
    if name is None:
        return None, f"dimension {index} has no name"
    if score is None:
        return None, f"{name}: score missing or not a number"
    if not SCORE_MIN <= score <= SCORE_MAX:
        return None, f"{name}: score {score:g} outside {SCORE_MIN:g}-{SCORE_MAX:g}"
    if comment is None or recommendation is None:
        return None, f"{name}: comment or recommendation missing"
    optional = {k: str(raw[k]) for k in ("case_study_id", "quote_id") if raw.get(k) not in (None, "")}
    return Dimension(name, score, comment, recommendation, **optional), ""


def _case_study(raw: object) -> CaseStudy | None:
    if not isinstance(raw, dict):
        return None
    values = [raw.get(k) for k in ("image_title", "year", "dimension", "explanation")]
    if any(v in (None, "") for v in values):
        return None
    return CaseStudy(*(str(v).strip() for v in values))


def validate_analysis(data: dict) -> ParseResult:
    """Check a decoded object against the canonical schema, collecting every field's problem."""
    errors: dict[str, str] = {}
    missing = [f for f in REQUIRED_FIELDS if f not in data]
    for f in missing:
        errors[f] = "missing"

    description = _text(data.get("image_description"))
    if "image_description" not in errors and description is None:
        errors["image_description"] = "must be a non-empty string"

    dimensions: list[Dimension] = []
    raw_dims = data.get("dimensions")
    if "dimensions" not in errors:
        if not isinstance(raw_dims, list) or not raw_dims:
            errors["dimensions"] = "must be a non-empty list"
        elif len(raw_dims) > MAX_DIMENSIONS:
            errors["dimensions"] = f"{len(raw_dims)} dimensions, at most {MAX_DIMENSIONS}"
        else:
            problems = []
            for i, raw in enumerate(raw_dims):
                dim, problem = _dimension(raw, i)
                if dim is None:
                    problems.append(problem)
                else:
                    dimensions.append(dim)
            names = [d.name for d in dimensions]
            if len(set(names)) != len(names):
                problems.append("duplicate dimension names")
            if problems:
                errors["dimensions"] = "; ".join(problems)

    overall = _as_score(data.get("overall_score"))
    if "overall_score" not in errors:
        if overall is None:
            errors["overall_score"] = "must be a number"
        elif not SCORE_MIN <= overall <= SCORE_MAX:
            errors["overall_score"] = f"{overall:g} outside {SCORE_MIN:g}-{SCORE_MAX:g}"

    lists = {}
    for key in ("key_strengths", "priority_improvements"):
        lists[key] = _text_list(data.get(key))
        if key not in errors and lists[key] is None:
            errors[key] = "must be a non-empty list of strings"

    notes = data.get("technical_notes")
    if "technical_notes" not in errors and not isinstance(notes, str):
        errors["technical_notes"] = "must be a string"

    case_studies: list[CaseStudy] = []
    raw_cases = data.get("case_studies")
    if raw_cases not in (None, []):
        parsed = [_case_study(c) for c in raw_cases] if isinstance(raw_cases, list) else [None]
        if None in parsed or len(parsed) > MAX_CASE_STUDIES:
            errors["case_studies"] = f"must be at most {MAX_CASE_STUDIES} complete case studies"
        else:
            case_studies = [c for c in parsed if c is not None]

    if errors:
        out_of_range = any("outside" in msg for msg in errors.values())
        code = "missing_fields" if missing else ("score_out_of_range" if out_of_range else "schema_invalid")
        detail = "; ".join(f"{k}: {v}" for k, v in errors.items())
        return ParseResult(None, code, detail, errors, data)
    analysis = Analysis(
        image_description=description or "",
        dimensions=tuple(dimensions),
        overall_score=overall or 0.0,
        key_strengths=lists["key_strengths"] or (),
        priority_improvements=lists["priority_improvements"] or (),
        technical_notes=str(notes).strip(),
        case_studies=tuple(case_studies),
    )
    return ParseResult(analysis, data=data)


def split_thinking(raw: str) -> tuple[str, str]:
    """(the `<thinking>` blocks' text, the answer without them): the app stores them in separate columns."""
    thoughts = [m.group(0)[len(m.group(1)) + 2 : -(len(m.group(1)) + 3)].strip() for m in _THINKING.finditer(raw)]
    return "\n\n".join(thoughts), _THINKING.sub("", raw).strip()


def parse_analysis(raw: str | None) -> ParseResult:
    """Raw model output (or a stored analysis) -> validated Analysis, or a coded reason why not."""
    if raw is None or not raw.strip():
        return ParseResult(None, "empty", "no analysis text", {f: "empty" for f in REQUIRED_FIELDS})
    data, error, detail = extract_json_object(raw)
    if data is None:
        return ParseResult(None, error, detail, {f: error or "" for f in REQUIRED_FIELDS})
    return validate_analysis(data)


# --- canonical form ----------------------------------------------------------------------------------------


def _number(value: float) -> int | float:
    rounded = round(value, 1)
    return int(rounded) if rounded == int(rounded) else rounded


def analysis_to_dict(analysis: Analysis) -> dict:
    """The canonical dict: fixed key order, known dimensions in canonical order, numbers as numbers."""
    order = {name: i for i, name in enumerate(DIMENSION_NAMES)}
    dims = sorted(analysis.dimensions, key=lambda d: order.get(d.name, len(order)))
    out: dict = {
        "image_description": analysis.image_description,
        "dimensions": [
            {
                "name": d.name,
                "score": _number(d.score),
                "comment": d.comment,
                "recommendation": d.recommendation,
                **({"case_study_id": d.case_study_id} if d.case_study_id else {}),
                **({"quote_id": d.quote_id} if d.quote_id else {}),
            }
            for d in dims
        ],
        "overall_score": _number(analysis.overall_score),
        "key_strengths": list(analysis.key_strengths),
        "priority_improvements": list(analysis.priority_improvements),
        "technical_notes": analysis.technical_notes,
    }
    if analysis.case_studies:
        out["case_studies"] = [c.__dict__ for c in analysis.case_studies]
    return out


def canonical_json(analysis: Analysis) -> str:
    """The exact response text a model is trained to produce. Compact separators keep sequences short."""
    return json.dumps(analysis_to_dict(analysis), ensure_ascii=False, separators=(",", ":"))


# --- prompt ------------------------------------------------------------------------------------------------


def build_prompt(system_prompt: str | None, advisor_prompt: str | None, instruction: str | None = None) -> str:
    """The user text the app's service sends with the image: system prompt, advisor prompt, instruction."""
    parts = [p.strip() for p in (system_prompt, advisor_prompt, instruction or DEFAULT_INSTRUCTION) if p and p.strip()]
    return "\n\n".join(parts)


def chat_messages(prompt: str, response: str | None = None) -> list[dict]:
    """One user turn, image first then text (as the app sends it), optionally followed by the answer."""
    messages: list[dict] = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]},
    ]
    if response is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": response}]})
    return messages


_EXAMPLE_SCORE = re.compile(r'"(?:overall_)?score"\s*:\s*(\d+(?:\.\d+)?)')


def example_scores_in_prompt(prompt: str) -> set[float]:
    """Scores a prompt shows as examples (the app's old prompt had 7.4, which its model then copied)."""
    return {float(m) for m in _EXAMPLE_SCORE.findall(prompt)}
