"""comparison_report.json keys, review.html structure and escaping, the chart."""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from mondrian_assets.core import schema
from mondrian_assets.core.evaluation import charts, report
from mondrian_assets.core.evaluation import gates as gt
from mondrian_assets.core.evaluation import metrics as m
from mondrian_assets.core.inference.records import EvalExample, Generation
from helpers import analysis_dict

SCRIPT = '<script>alert("x")</script>'


def gen(text: str, latency: float = 1.0) -> Generation:
    return Generation(text, latency, 120, 300.0, 40, 20.0, "stop")


@pytest.fixture
def evaluation(tmp_path):
    images = []
    for i, size in enumerate([(64, 48), (40, 60), (30, 30)]):
        path = tmp_path / "images" / f"img{i}.jpg"
        path.parent.mkdir(exist_ok=True)
        Image.new("RGB", size, (40 * i, 90, 160)).save(path)
        images.append(path)
    examples = [
        EvalExample(f"job-{i}", images[i], schema.build_prompt(None, "Be Ansel."), json.dumps(analysis_dict(s)))
        for i, s in enumerate((8, 6, 7))
    ]
    out_of_range = analysis_dict(7) | {"overall_score": 14}
    fenced = "```json\n" + json.dumps(analysis_dict(5)) + "\n```"
    base = [gen("I cannot " + SCRIPT), gen(json.dumps(out_of_range)), gen(fenced)]
    with_script = analysis_dict(6) | {"technical_notes": SCRIPT}
    tuned = [gen(json.dumps(analysis_dict(8))), gen(json.dumps(with_script)), gen('{"image_desc')]
    train = [schema.parse_analysis(json.dumps(analysis_dict(s))).analysis for s in (6, 8)]
    comparison = m.compare(examples, base, tuned, train)
    gates = gt.evaluate_gates(comparison)
    return examples, base, tuned, comparison, gates, tmp_path / "evaluation" / "ansel"


def write(evaluation, chart: bool = False) -> report.ReportPaths:
    examples, base, tuned, comparison, gates, out_dir = evaluation
    return report.write_comparison_report(
        out_dir,
        comparison=comparison,
        gates=gates,
        verdict=gt.verdict(comparison, gates),
        examples=examples,
        base_generations=base,
        fine_tuned_generations=tuned,
        base_model="models/base/tiny",
        lora_path=Path("models/versions/ansel-v1"),
        validation_data="training_data/training_data_ansel_val.json",
        settings={"max_tokens": 128, "seed": 0},
        chart_png=charts.comparison_chart_png(comparison) if chart else None,
    )


def test_report_json_has_the_plan_structure(evaluation):
    paths = write(evaluation)
    data = json.loads(paths.report_json.read_text())
    top = {"evaluation_date", "base_model", "lora_path", "validation_data", "metrics", "gates", "verdict"}
    top |= {"sample_results"}
    assert top <= set(data)
    assert set(data["metrics"]) == {"base_model", "fine_tuned_model", "mean_baseline", "improvements", "paired",
                                    "inference_overhead", "constrained_decoding"}  # fmt: skip
    paired = data["metrics"]["paired"]["fine_tuned_vs_base"]
    assert paired["examples"] == 3 and paired["invalid_error"] == 9.0
    assert "error of 9" in data["rules"]["score_comparison"] and "noise" in data["rules"]["inference_overhead"]
    for side in ("base_model", "fine_tuned_model"):
        keys = {"format_compliance", "avg_score", "overall_score_mae", "field_compliance", "latency_mean_s"}
        assert keys <= set(data["metrics"][side])
    assert data["metrics"]["fine_tuned_model"]["format_compliance"] == pytest.approx(0.6667)
    assert data["lora_path"] == "models/versions/ansel-v1"
    assert [g["name"] for g in data["gates"]] == ["format_compliance", "score_mae_vs_base", "inference_overhead"]
    assert all({"name", "passed", "value", "threshold", "message"} <= set(g) for g in data["gates"])
    sample = data["sample_results"][0]
    assert sample["image"].endswith("img0.jpg")
    assert sample["base_model"]["output"].startswith("I cannot")  # the workbook reads sample[...]["output"]
    assert sample["fine_tuned_model"]["valid"] is True and sample["reference"]["overall_score"] == 8
    assert data["sample_results"][1]["base_model"]["field_errors"] == {"overall_score": "14 outside 1-10"}
    assert not list(paths.report_json.parent.glob(".*tmp"))  # atomic writes leave no scratch files


class PageParser(HTMLParser):
    """Collects tags, the classes of table rows, and the text, to check structure without a browser."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.examples: list[str] = []
        self.invalid_fields: list[tuple[str, str]] = []
        self.images: list[str] = []
        self.text: list[str] = []
        self._cell_stack: list[str] = []
        self._example = ""

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        css = (a.get("class") or "").split()
        if tag == "tr" and "example" in css:
            self._example = a["data-example-id"]
            self.examples.append(self._example)
        if tag == "td" and "output" in css:
            self._cell_stack = css
        if tag == "tr" and "invalid" in css and "field" in css:
            side = "fine-tuned" if "fine-tuned" in self._cell_stack else "base"
            self.invalid_fields.append((f"{self._example}/{side}", a["data-field"]))
        if tag == "img":
            self.images.append(a.get("src", ""))

    def handle_data(self, data):
        self.text.append(data)


def test_review_html_structure_and_escaping(evaluation):
    paths = write(evaluation, chart=True)
    page = paths.review_html.read_text()
    parser = PageParser()
    parser.feed(page)
    assert parser.examples == ["job-0", "job-1", "job-2"]  # one row per example
    example_images = [src for src in parser.images if src.startswith("data:image/jpeg;base64,")]
    assert len(example_images) == 3  # embedded thumbnails: the page stands alone
    assert any(src.startswith("data:image/png;base64,") for src in parser.images)  # the chart
    assert "script" not in parser.tags  # model text never becomes markup
    assert SCRIPT in "".join(parser.text)  # ...but is shown, escaped
    assert "http://" not in page and "https://" not in page  # no external assets
    assert ("job-1/base", "overall_score") in parser.invalid_fields
    assert ("job-2/fine-tuned", "dimensions") in parser.invalid_fields  # truncated output: every field invalid
    assert not any(key.startswith("job-0/fine-tuned") for key, _ in parser.invalid_fields)
    assert "verdict" in page and "FAIL" in page  # the fine-tuned model misses the 95 % format gate
    assert "overall-score error of 9" in page  # the paired rule is stated where the numbers are


def test_review_shows_compliance_with_and_without_the_grammar_mask(evaluation):
    from dataclasses import replace

    from mondrian_assets.core.evaluation.constrained_compliance import ConstrainedCompliance
    from mondrian_assets.core.evaluation.overhead import OverheadMeasurement

    examples, base, tuned, comparison, gates, out_dir = evaluation
    timing = OverheadMeasurement(((1.0, 1.0), (1.0, 1.0)), ((1.25, 1.25), (1.25, 1.25)), 16)
    constrained = ConstrainedCompliance(3, 2, 1, 2, 3, 0, timing)
    paths = write((examples, base, tuned, replace(comparison, constrained=constrained), gates, out_dir))
    page = paths.review_html.read_text()
    assert "2/3 on its own" in page and "3/3 under the service's grammar mask" in page
    assert "0.80x unconstrained" in page  # 25% more time per token = 0.8x the tokens/s
    saved = json.loads(paths.report_json.read_text())["metrics"]["constrained_decoding"]
    assert saved["format_compliance_constrained"] == 1.0 and saved["decode_speed_ratio"] == pytest.approx(0.8)


def test_missing_image_is_reported_not_fatal(evaluation):
    examples, *_ = evaluation
    shutil.rmtree(examples[0].image_path.parent)
    page = write(evaluation).review_html.read_text()
    assert "image missing" in page


def test_chart_is_a_png(evaluation):
    *_, comparison, _gates, _out = evaluation
    png = charts.comparison_chart_png(comparison)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.skipif(not CHROMIUM.exists(), reason="headless Chromium is not installed")
def test_review_html_renders_in_headless_chromium(evaluation, tmp_path):
    paths = write(evaluation)
    dom = subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", paths.review_html.as_uri()],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert dom.count('class="example"') == 3
    assert "<script>alert" not in dom
