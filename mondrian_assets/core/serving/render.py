"""The app shows `analysis_html` and `summary_html` as they come, so the service renders them: our own small
template over the canonical analysis, every text escaped."""

from __future__ import annotations

from html import escape

from mondrian_assets.core.schema import Analysis


def _score(value: float) -> str:
    return f"{value:.1f}/10"


def summary_text(analysis: Analysis) -> str:
    strengths = "; ".join(analysis.key_strengths)
    improvements = "; ".join(analysis.priority_improvements)
    return f"Overall {_score(analysis.overall_score)}. Strengths: {strengths}. Improve: {improvements}."


def analysis_html(analysis: Analysis, advisor_name: str) -> str:
    rows = "".join(
        f'<div class="dimension"><h3>{escape(d.name)} <span class="score">{_score(d.score)}</span></h3>'
        f"<p>{escape(d.comment)}</p><p><strong>How to improve:</strong> {escape(d.recommendation)}</p></div>"
        for d in analysis.dimensions
    )
    notes = f"<h2>Technical notes</h2><p>{escape(analysis.technical_notes)}</p>" if analysis.technical_notes else ""
    return (
        f'<div class="analysis"><h1>{escape(advisor_name)} Analysis</h1>'
        f'<p class="overall">Overall Grade {_score(analysis.overall_score)}</p>'
        f"<h2>Image Analysis</h2><p>{escape(analysis.image_description)}</p>{rows}"
        f"<h2>Key strengths</h2>{_list(analysis.key_strengths)}"
        f"<h2>Priority improvements</h2>{_list(analysis.priority_improvements)}{notes}</div>"
    )


def summary_html(analysis: Analysis, advisor_name: str) -> str:
    return (
        f'<div class="summary"><h2>{escape(advisor_name)}: {_score(analysis.overall_score)}</h2>'
        f"<h3>Strengths</h3>{_list(analysis.key_strengths)}"
        f"<h3>Improve first</h3>{_list(analysis.priority_improvements)}</div>"
    )


def failure_html(advisor_name: str, reason: str) -> str:
    return (
        f'<div class="analysis error"><h1>{escape(advisor_name)} Analysis</h1>'
        f"<p>The model's answer could not be read as an analysis ({escape(reason)}).</p></div>"
    )


def bio_html(bio: str) -> str:
    return "".join(f"<p>{escape(p.strip())}</p>" for p in bio.split("\n\n") if p.strip())


def _list(items: tuple[str, ...]) -> str:
    return "<ul>" + "".join(f"<li>{escape(i)}</li>" for i in items) + "</ul>"
