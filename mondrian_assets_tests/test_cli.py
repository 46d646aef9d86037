"""The command line as a user runs it: a child process, a fresh home, the persistent Dagster instance."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mondrian_assets.cli import build_parser


def cli(home: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MONDRIAN_", "DAGSTER_"))}
    return subprocess.run(
        [sys.executable, "-m", "mondrian_assets.cli", *args, "--home", str(home)],
        capture_output=True, text=True, env=env, timeout=timeout,
    )  # fmt: skip


def test_help_lists_every_command():
    text = build_parser().format_help()
    for command in ("demo-data", "link", "demo", "evaluate", "status", "versions", "rollback", "pin", "unpin", "ui"):
        assert command in text
    assert "MONDRIAN_APP_DIR" in text


def test_link_on_a_fresh_home_generates_the_demo_and_prints_the_summary(tmp_path):
    result = cli(tmp_path, "link")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "linked" in result.stdout and "skip not_finished" in result.stdout
    assert (tmp_path / "demo_app" / "mondrian.db").is_file()
    manifest = json.loads((tmp_path / "training_data" / "training_data_manifest.json").read_text())
    assert manifest["by_advisor"]["ansel"]["count"] >= 60
    # the run is in the persistent instance, for `dagster dev` to show
    assert any((tmp_path / ".dagster").rglob("*.db"))


@pytest.mark.slow
def test_demo_main_job_end_to_end(tmp_path):
    """The README's run command: every advisor split, trained and evaluated on the embedded model."""
    result = cli(tmp_path, "demo", timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "val loss" in out and "valid JSON" in out and "score MAE" in out
    assert "okeefe" in out and "no validation set" in out
    report = json.loads((tmp_path / "evaluation" / "ansel" / "comparison_report.json").read_text())
    assert report["metrics"]["fine_tuned_model"]["format_compliance"] >= 0.95
    assert report["metrics"]["base_model"]["format_compliance"] < report["metrics"]["fine_tuned_model"]["format_compliance"]

    # the same adapter re-checked on its own, as the nightly schedule will
    recheck = cli(tmp_path, "evaluate", "--advisor", "weston", "--max-examples", "1")
    assert recheck.returncode == 0, recheck.stderr[-2000:]
    assert (tmp_path / "evaluation" / "weston" / "recheck-weston" / "comparison_report.json").is_file()


def test_evaluate_without_an_adapter_says_so(tmp_path):
    result = cli(tmp_path, "evaluate", "--advisor", "ansel")
    assert result.returncode == 2 and "no adapter" in result.stderr
