import json

import pytest

from mondrian_assets.core.schema import (
    DEFAULT_INSTRUCTION,
    analysis_to_dict,
    build_prompt,
    canonical_json,
    example_scores_in_prompt,
    parse_analysis,
)

SEVEN = ["Composition", "Lighting", "Focus & Sharpness", "Color Harmony", "Depth & Perspective", "Visual Balance",
         "Emotional Impact"]  # fmt: skip


def analysis_dict(**overrides) -> dict:
    data = {
        "image_description": "A quiet lake under a pale sky.",
        "dimensions": [
            {"name": n, "score": 6 + i % 3, "comment": f"{n} is fine.", "recommendation": f"Improve {n}."}
            for i, n in enumerate(SEVEN)
        ],
        "overall_score": 7.1,
        "key_strengths": ["Calm mood", "Soft light"],
        "priority_improvements": ["Lower the horizon"],
        "technical_notes": "Slightly underexposed.",
    }
    data.update(overrides)
    return data


def test_round_trip_is_a_fixed_point():
    parsed = parse_analysis(json.dumps(analysis_dict()))
    assert parsed.ok
    text = canonical_json(parsed.analysis)
    again = parse_analysis(text)
    assert again.analysis == parsed.analysis
    assert canonical_json(again.analysis) == text


@pytest.mark.parametrize(
    "wrap",
    [
        lambda s: f"```json\n{s}\n```",
        lambda s: f"<thinking>the score is {{maybe}} 7</thinking>\n{s}",
        lambda s: s + "\n}",
        lambda s: "# Ansel Adams Analysis\n\n## Summary\nGood {work}.\n\n## Full Analysis\n" + s,
        lambda s: s.replace('"', "\u201c", 1).replace('"', "\u201d", 1),
        lambda s: s.replace('"', "&quot;"),
    ],
    ids=["fenced", "thinking", "extra_brace", "markdown", "curly_quotes", "html_escaped"],
)
def test_tolerant_extraction_recovers_the_same_analysis(wrap):
    expected = parse_analysis(json.dumps(analysis_dict())).analysis
    parsed = parse_analysis(wrap(json.dumps(analysis_dict(), indent=2)))
    assert parsed.ok, parsed.detail
    assert parsed.analysis == expected


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (json.dumps(analysis_dict())[:400], "truncated_json"),
        ('{"image_description": "x", "dimensions": [,]}', "invalid_json"),
        ("<p>A lovely photo</p>", "no_json"),
        ("", "empty"),
        (json.dumps({k: v for k, v in analysis_dict().items() if k != "overall_score"}), "missing_fields"),
        (json.dumps(analysis_dict(overall_score=12)), "score_out_of_range"),
        (json.dumps(analysis_dict(key_strengths="not a list")), "schema_invalid"),
    ],
)
def test_failures_carry_stable_codes(raw, code):
    parsed = parse_analysis(raw)
    assert not parsed.ok
    assert parsed.error == code


def test_field_errors_name_each_bad_field():
    bad = analysis_dict(overall_score="high", technical_notes=3)
    bad["dimensions"][0]["score"] = 0
    parsed = parse_analysis(json.dumps(bad))
    assert set(parsed.field_errors) == {"overall_score", "technical_notes", "dimensions"}
    assert "outside" in parsed.field_errors["dimensions"]


def test_canonical_form_orders_dimensions_and_normalizes_numbers():
    data = analysis_dict()
    data["dimensions"] = list(reversed(data["dimensions"]))
    data["dimensions"][0]["score"] = "8"  # numbers as strings happen in raw output
    data["overall_score"] = 7.0
    canon = analysis_to_dict(parse_analysis(json.dumps(data)).analysis)
    assert [d["name"] for d in canon["dimensions"]] == SEVEN
    assert canon["overall_score"] == 7 and isinstance(canon["overall_score"], int)
    assert canon["dimensions"][-1]["score"] == 8
    assert list(canon) == ["image_description", "dimensions", "overall_score", "key_strengths",
                           "priority_improvements", "technical_notes"]  # fmt: skip


def test_prompt_is_system_then_advisor_then_instruction():
    prompt = build_prompt("You are Mondrian.", "Speak as Ansel Adams.")
    assert prompt == f"You are Mondrian.\n\nSpeak as Ansel Adams.\n\n{DEFAULT_INSTRUCTION}"
    assert build_prompt(None, "  ") == DEFAULT_INSTRUCTION
    assert example_scores_in_prompt(DEFAULT_INSTRUCTION) == set()
    assert example_scores_in_prompt('like {"overall_score": 7.4}') == {7.4}
