"""The command line as a user runs it: a child process, a fresh home, the persistent Dagster instance."""

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from mondrian_assets.cli import _demo_mlx_slots, build_parser
from mondrian_assets.defs.run_workers import MLX_POOL


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
    """The README's run command, and issue 8's bar: every advisor with 10+ validation images learns to read the
    photo (valid JSON every time, overall-score MAE at most 0.8 x the training-mean baseline's, every gate passed);
    the small ones are reported with the examples they still need. No traceback, exit 0."""
    result = cli(tmp_path, "demo", timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    table = result.stdout[result.stdout.index("advisor  train/val"):].splitlines()
    rows = {line.split()[0]: line for line in table[1:]}
    assert set(rows) == {"ansel", "weston", "watkins", "okeefe"}
    for small in ("watkins", "okeefe"):
        assert "not trained" in rows[small] and "more training examples" in rows[small]
    for advisor in ("ansel", "weston"):
        report = json.loads((tmp_path / "evaluation" / advisor / "comparison_report.json").read_text())
        tuned, mean = report["metrics"]["fine_tuned_model"], report["metrics"]["mean_baseline"]
        assert tuned["examples"] >= 10 and report["meaningful"]
        assert tuned["format_compliance"] == 1.0 and report["metrics"]["base_model"]["format_compliance"] < 0.1
        assert tuned["overall_score_mae"] <= 0.8 * mean["overall_score_mae"], (advisor, tuned, mean)
        assert all(g["passed"] for g in report["gates"]), report["gates"]
        assert " deployable " in rows[advisor] and "not deployable" not in rows[advisor]

    # the same adapter re-checked on its own, as the nightly schedule will
    recheck = cli(tmp_path, "evaluate", "--advisor", "weston", "--max-examples", "1")
    assert recheck.returncode == 0, recheck.stderr[-2000:]
    assert (tmp_path / "evaluation" / "weston" / "recheck-weston" / "comparison_report.json").is_file()


def test_the_demo_lends_the_mlx_pool_a_slot_per_advisor_and_gives_it_back():
    with dg.instance_for_test(overrides={"concurrency": {"pools": {"default_limit": 1}}}) as instance:
        storage = instance.event_log_storage
        with _demo_mlx_slots(instance, 2):
            assert storage.get_concurrency_info(MLX_POOL).limit == 2
        after = storage.get_concurrency_info(MLX_POOL)
        assert after.limit == 1 and after.using_default_limit
        storage.set_concurrency_slots(MLX_POOL, 3)  # a limit someone chose is theirs
        with _demo_mlx_slots(instance, 2):
            assert storage.get_concurrency_info(MLX_POOL).limit == 3
        assert storage.get_concurrency_info(MLX_POOL).limit == 3


def test_a_real_failure_exits_non_zero_with_the_reason_and_no_traceback(tmp_path):
    """A broken base model is a real failure: the row says what failed, the exit code is 1, the console shows no
    traceback (the instance keeps the full log)."""
    assert cli(tmp_path, "demo", "--advisor", "weston", "--skip-training").returncode == 0
    config = next((tmp_path / "models" / "base").glob("*/config.json"))
    config.write_text("{ not json")
    result = cli(tmp_path, "demo", "--advisor", "weston")
    assert result.returncode == 1, result.stdout[-2000:]
    assert "Traceback" not in result.stdout + result.stderr
    row = next(line for line in result.stdout.splitlines() if line.startswith("weston "))
    assert " failed " in row and "lora_adapter" in row and "./dev ui" in row


def test_evaluate_without_an_adapter_says_so(tmp_path):
    result = cli(tmp_path, "evaluate", "--advisor", "ansel")
    assert result.returncode == 2 and "no adapter" in result.stderr
