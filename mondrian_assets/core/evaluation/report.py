"""The evaluation's outputs: `comparison_report.json` (the plan's file contract), `review.html` (a self-contained
page to read every example side by side). Writes are atomic."""

from __future__ import annotations

import base64
import html
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from mondrian_assets.core import atomic, schema
from mondrian_assets.core.evaluation.gates import RULES, GateResult
from mondrian_assets.core.evaluation.metrics import Comparison, invalid_fields
from mondrian_assets.core.inference.records import EvalExample, Generation
from mondrian_assets.core.schema import ParseResult

REPORT_NAME = "comparison_report.json"
REVIEW_NAME = "review.html"
OUTPUT_CHAR_CAP = 8000  # per output in the JSON; the full text is in review.html
THUMBNAIL_SIDE = 192


@dataclass(frozen=True)
class ReportPaths:
    report_json: Path
    review_html: Path


# --- JSON ----------------------------------------------------------------------------------------------------


def rounded(value: object, digits: int = 4) -> object:
    """Floats rounded for reading, recursively (metrics keep full precision until written)."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v, digits) for v in value]
    return value


def _reference_summary(example: EvalExample) -> dict:
    parsed = schema.parse_analysis(example.reference)
    if parsed.analysis is None:
        return {"valid": False, "error": parsed.error}
    return {
        "valid": True,
        "overall_score": parsed.analysis.overall_score,
        "dimension_scores": parsed.analysis.dimension_scores(),
    }


def _output_summary(generation: Generation, parsed: ParseResult) -> dict:
    return {
        "output": generation.text[:OUTPUT_CHAR_CAP],
        "output_chars": len(generation.text),
        "output_truncated": len(generation.text) > OUTPUT_CHAR_CAP,
        "valid": parsed.ok,
        "error": parsed.error,
        "field_errors": invalid_fields(parsed),
        "overall_score": parsed.analysis.overall_score if parsed.analysis else None,
        "dimension_scores": parsed.analysis.dimension_scores() if parsed.analysis else {},
        "latency_s": round(generation.latency_s, 4),
        "prompt_tokens": generation.prompt_tokens,
        "generation_tokens": generation.generation_tokens,
        "finish_reason": generation.finish_reason,
    }


def sample_results(
    examples: Sequence[EvalExample], base: Sequence[Generation], fine_tuned: Sequence[Generation]
) -> list[dict]:
    rows = []
    for example, b, f in zip(examples, base, fine_tuned, strict=True):
        rows.append(
            {
                "example_id": example.example_id,
                "image": str(example.image_path),
                "reference": _reference_summary(example),
                "base_model": _output_summary(b, schema.parse_analysis(b.text)),
                "fine_tuned_model": _output_summary(f, schema.parse_analysis(f.text)),
            }
        )
    return rows


MIN_MEANINGFUL_EXAMPLES = 5  # below this a MAE or a correlation says nothing (-1.0 from two points)


def meaningful(comparison: Comparison) -> bool:
    """Whether the metrics rest on enough validation examples to mean anything."""
    return comparison.fine_tuned.examples >= MIN_MEANINGFUL_EXAMPLES


def _not_meaningful_note(comparison: Comparison) -> str:
    n = comparison.fine_tuned.examples
    return f"n={n}<{MIN_MEANINGFUL_EXAMPLES}: metrics on {n} examples are not meaningful; link more jobs."


def build_report(
    *,
    comparison: Comparison,
    gates: Sequence[GateResult],
    verdict: str,
    examples: Sequence[EvalExample],
    base_generations: Sequence[Generation],
    fine_tuned_generations: Sequence[Generation],
    base_model: str,
    lora_path: str | Path | None,
    validation_data: str | Path,
    settings: dict | None = None,
    evaluation_date: str | None = None,
) -> dict:
    """The comparison report as a JSON-ready dict, in the plan's structure."""
    return {
        "evaluation_date": evaluation_date or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base_model": base_model,
        "lora_path": str(lora_path) if lora_path is not None else None,
        "validation_data": str(validation_data),
        "settings": settings or {},
        "metrics": rounded(comparison.as_dict()),
        "meaningful": meaningful(comparison),
        "meaningful_note": "" if meaningful(comparison) else _not_meaningful_note(comparison),
        "gates": [rounded(g.as_dict()) for g in gates],
        "rules": RULES,
        "verdict": verdict,
        "sample_results": sample_results(examples, base_generations, fine_tuned_generations),
    }


# --- HTML ----------------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:0.5em 0}
th,td{border:1px solid #ccc;padding:4px 6px;vertical-align:top;text-align:left}
#examples td{width:25%;max-width:30em}
.fields td,.fields th{font-size:0.85em}
.invalid{background:#fde2e2}
.valid-badge{color:#126b12;font-weight:bold}
.invalid-badge{color:#a11;font-weight:bold}
.gate-pass{color:#126b12}.gate-fail{color:#a11;font-weight:bold}
pre{white-space:pre-wrap;word-break:break-word;max-height:24em;overflow:auto;background:#f6f6f6;padding:4px}
.not-meaningful{color:#a11;font-weight:bold}
.verdict{font-size:1.1em;padding:0.5em;border-left:4px solid #888;background:#f4f4f4}
"""

_e = html.escape

_HEADLINE = (
    ("format_compliance", "format compliance"),
    ("valid_outputs", "valid outputs"),
    ("avg_score", "mean overall score"),
    ("overall_score_mae", "overall-score MAE (valid outputs only)"),
    ("dimension_score_mae_mean", "dimension-score MAE"),
    ("score_correlation", "score correlation"),
    ("example_score_copy_rate", "copied the prompt's example score"),
    ("repetition_rate", "repetition rate"),
    ("latency_mean_s", "mean latency (s)"),
    ("latency_p95_s", "p95 latency (s)"),
    ("prefill_tokens_per_s", "prefill tokens/s"),
    ("decode_tokens_per_s", "decode tokens/s"),
    ("output_tokens_mean", "output tokens (mean)"),
)


def _cell(value: object) -> str:
    if value is None:
        return "<td>n/a</td>"
    if isinstance(value, float):
        return f"<td>{value:.3f}</td>"
    return f"<td>{_e(str(value))}</td>"


def _headline_table(comparison: Comparison) -> str:
    base, ft, mean = comparison.base.as_dict(), comparison.fine_tuned.as_dict(), comparison.mean_baseline.as_dict()
    paired = (comparison.vs_base.mae_a, comparison.vs_base.mae_b, comparison.vs_mean_baseline.mae_a)
    rows = [f"<tr><th>overall-score MAE, paired (invalid = {comparison.vs_base.invalid_error:g})</th>"
            + "".join(_cell(v) for v in paired) + "</tr>"]
    rows += [
        f"<tr><th>{_e(label)}</th>{_cell(base.get(key))}{_cell(ft.get(key))}{_cell(mean.get(key))}</tr>"
        for key, label in _HEADLINE
    ]
    head = "<tr><th>metric</th><th>base</th><th>fine-tuned</th><th>always the training mean</th></tr>"
    return f'<table id="headline">{head}{"".join(rows)}</table>'


def _constrained_note(comparison: Comparison) -> str:
    c = comparison.constrained
    if c is None:
        return ""
    speed = c.decode_speed_ratio
    cost = (f"; decode tokens/s under the mask {speed:.2f}x unconstrained (timing noise {c.timing.noise:.0%})"
            if speed is not None and c.timing is not None else "")  # fmt: skip
    return (
        f'<p id="constrained">Fine-tuned format compliance: {c.valid_unconstrained}/{c.examples} on its own (what '
        f"the model learned, the gates use this), {c.valid_constrained}/{c.examples} under the service's grammar "
        f"mask (what users get; {c.redecoded} decoded again, {c.cut_off} ran out of tokens){_e(cost)}.</p>"
    )


def _gates_list(gates: Sequence[GateResult]) -> str:
    items = [
        f'<li class="{"gate-pass" if g.passed else "gate-fail"}" data-gate="{_e(g.name)}">'
        f"{'PASS' if g.passed else 'FAIL'} {_e(g.name)}: {_e(g.message)}</li>"
        for g in gates
    ]
    return f'<ul id="gates">{"".join(items)}</ul>'


def _rules_list() -> str:
    items = "".join(f"<li>{_e(text)}</li>" for text in RULES.values())
    return f'<ul id="rules">{items}</ul>'


def _thumbnail_src(image: Path, out_dir: Path) -> str | None:
    """A small embedded JPEG so the page stands alone; the relative path if the image cannot be read."""
    from PIL import Image, ImageOps

    try:
        with Image.open(image) as img:
            thumb = ImageOps.exif_transpose(img).convert("RGB")
            thumb.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
            buffer = io.BytesIO()
            thumb.save(buffer, format="JPEG", quality=80)
    except (OSError, ValueError):
        return os.path.relpath(image, out_dir) if image.exists() else None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _image_cell(example: EvalExample, out_dir: Path) -> str:
    src = _thumbnail_src(example.image_path, out_dir)
    caption = f"<div>{_e(example.example_id)}</div>"
    if src is None:
        return f'<td class="image missing">{caption}image missing: {_e(str(example.image_path))}</td>'
    return f'<td class="image">{caption}<img src="{_e(src)}" alt="{_e(example.image_path.name)}"></td>'


def _short(value: object, limit: int = 300) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit] + "…"


def _fields_table(parsed: ParseResult) -> str:
    data = parsed.data or {}
    errors = invalid_fields(parsed)
    names = list(schema.REQUIRED_FIELDS) + [f for f in errors if f not in schema.REQUIRED_FIELDS]
    rows = []
    for name in names:
        error = errors.get(name)
        css = "field invalid" if error else "field"
        value = _short(data[name]) if name in data else ""
        message = f'<td class="error">{_e(error)}</td>' if error else "<td></td>"
        rows.append(f'<tr class="{css}" data-field="{_e(name)}"><th>{_e(name)}</th><td>{_e(value)}</td>{message}</tr>')
    return f'<table class="fields">{"".join(rows)}</table>'


def _output_cell(generation: Generation, css: str) -> str:
    parsed = schema.parse_analysis(generation.text)
    badge = (
        '<div class="valid-badge">valid</div>'
        if parsed.ok
        else f'<div class="invalid-badge">invalid: {_e(parsed.error or "")}</div>'
    )
    facts = (
        f"<div>{generation.generation_tokens} tokens, {generation.latency_s:.2f} s, "
        f"stopped by {_e(generation.finish_reason)}</div>"
    )
    raw = (
        f"<details><summary>raw output ({len(generation.text)} chars)</summary>"
        f"<pre>{_e(generation.text)}</pre></details>"
    )
    return f'<td class="{css}">{badge}{facts}{_fields_table(parsed)}{raw}</td>'


def _reference_cell(example: EvalExample) -> str:
    parsed = schema.parse_analysis(example.reference)
    if parsed.analysis is None:
        return f'<td class="reference invalid">reference does not parse: {_e(parsed.error or "")}</td>'
    dims = "".join(f"<li>{_e(n)}: {s:g}</li>" for n, s in parsed.analysis.dimension_scores().items())
    return (
        f'<td class="reference"><div>overall {parsed.analysis.overall_score:g}</div><ul>{dims}</ul>'
        f"<div>{_e(_short(parsed.analysis.image_description))}</div></td>"
    )


def _examples_table(
    examples: Sequence[EvalExample], base: Sequence[Generation], fine_tuned: Sequence[Generation], out_dir: Path
) -> str:
    head = "<tr><th>image</th><th>reference</th><th>base</th><th>fine-tuned</th></tr>"
    rows = [
        f'<tr class="example" data-example-id="{_e(ex.example_id)}">{_image_cell(ex, out_dir)}{_reference_cell(ex)}'
        f'{_output_cell(b, "output base")}{_output_cell(f, "output fine-tuned")}</tr>'
        for ex, b, f in zip(examples, base, fine_tuned, strict=True)
    ]
    return f'<table id="examples">{head}{"".join(rows)}</table>'


def review_html(
    report: dict,
    comparison: Comparison,
    gates: Sequence[GateResult],
    examples: Sequence[EvalExample],
    base: Sequence[Generation],
    fine_tuned: Sequence[Generation],
    out_dir: Path,
    chart_png: bytes | None = None,
) -> str:
    title = f"Evaluation: {report['base_model']} + {report['lora_path']}"
    chart = (
        f'<img id="chart" alt="comparison chart" src="data:image/png;base64,{base64.b64encode(chart_png).decode()}">'
        if chart_png
        else ""
    )
    warning = "" if report["meaningful"] else f'<p class="not-meaningful" id="not-meaningful">{_e(report["meaningful_note"])}</p>'
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
        f"<style>{_CSS}</style></head><body>"
        f"<h1>{_e(title)}</h1>"
        f"<p>Evaluated {_e(report['evaluation_date'])} on {_e(report['validation_data'])}, "
        f"{len(examples)} examples.</p>"
        f'<p class="verdict" id="verdict">{_e(report["verdict"])}</p>{warning}'
        f"{_gates_list(gates)}{_rules_list()}{_headline_table(comparison)}{_constrained_note(comparison)}{chart}"
        f"<h2>Examples</h2>{_examples_table(examples, base, fine_tuned, out_dir)}"
        "</body></html>\n"
    )


# --- writing -------------------------------------------------------------------------------------------------


def write_comparison_report(
    out_dir: Path,
    *,
    comparison: Comparison,
    gates: Sequence[GateResult],
    verdict: str,
    examples: Sequence[EvalExample],
    base_generations: Sequence[Generation],
    fine_tuned_generations: Sequence[Generation],
    base_model: str,
    lora_path: str | Path | None,
    validation_data: str | Path,
    settings: dict | None = None,
    evaluation_date: str | None = None,
    chart_png: bytes | None = None,
) -> ReportPaths:
    """Write `comparison_report.json` and `review.html` into `out_dir` (each atomically)."""
    out_dir = Path(out_dir)
    report = build_report(
        comparison=comparison,
        gates=gates,
        verdict=verdict,
        examples=examples,
        base_generations=base_generations,
        fine_tuned_generations=fine_tuned_generations,
        base_model=base_model,
        lora_path=lora_path,
        validation_data=validation_data,
        settings=settings,
        evaluation_date=evaluation_date,
    )
    paths = ReportPaths(out_dir / REPORT_NAME, out_dir / REVIEW_NAME)
    atomic.write_json(paths.report_json, report)
    page = review_html(
        report, comparison, gates, examples, base_generations, fine_tuned_generations, out_dir, chart_png
    )
    atomic.write_text(paths.review_html, page)
    return paths
