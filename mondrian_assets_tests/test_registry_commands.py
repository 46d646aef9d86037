"""`mondrian-assets status / versions / rollback / pin / unpin` as a user runs them, on a registry of real adapters."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from mondrian_assets.core.registry.pointer import point_to
from mondrian_assets.core.registry.versions import active_version, deployments, list_versions
from mondrian_assets.core.state_db import state_engine
from mondrian_assets_tests.registry_helpers import Registry
from mondrian_assets_tests.test_cli import cli


@pytest.fixture
def home(tmp_path):
    reg = Registry(tmp_path, home=tmp_path / "home")
    reg.deploy(*reg.candidate(1, [1.0] * 4))
    reg.deploy(*reg.candidate(2, [0.5] * 4))
    reg.deploy(*reg.candidate(3, [2.0] * 4))  # worse than v2: rejected, though its gates passed
    reg.deploy(*reg.candidate(5, [0.1] * 4, gates=[True, False, True]))  # v4: a failed gate
    reg.deploy(*reg.candidate(4, [0.5] * 4), advisor="ansel")
    return reg


def test_status_and_versions(home):
    point_to(home.models, "weston", home.models / "versions" / "weston-v1")  # a pointer out of step
    result = cli(home.root / "home", "status")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:5] == ["advisor", "versions", "active", "pinned", "previous"]
    ansel = next(line for line in lines if line.startswith("ansel "))
    weston = next(line for line in lines if line.startswith("weston "))
    assert ansel.split()[1:5] == ["1", "ansel-v1", "-", "-"]
    assert weston.split()[1:5] == ["4", "weston-v2", "-", "weston-v1"]
    assert "reject v4" in weston and "gate gate1 failed" in weston
    assert "repaired" in result.stdout and home.pointer() == "versions/weston-v2"

    listed = cli(home.root / "home", "versions", "--advisor", "weston")
    assert listed.returncode == 0, listed.stderr
    rows = [line.split()[:3] for line in listed.stdout.splitlines()[1:]]
    assert rows == [["1", "retired", "passed"], ["2", "active", "passed"], ["3", "rejected", "passed"],
                    ["4", "rejected", "failed"]]  # fmt: skip


def test_status_into_a_reader_that_stops_early_ends_quietly(home):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MONDRIAN_", "DAGSTER_"))}
    status = subprocess.Popen([sys.executable, "-m", "mondrian_assets.cli", "status", "--home", str(home.root / "home")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)  # fmt: skip
    status.stdout.close()  # the reader is gone before the table is written, as `status | head -1` can be
    assert status.wait(timeout=120) == 0
    assert b"Traceback" not in status.stderr.read()


def test_status_fails_when_an_active_versions_files_were_deleted(home):
    shutil.rmtree(home.models / "versions" / "ansel-v1")
    result = cli(home.root / "home", "status")
    assert result.returncode == 1
    assert "ansel-v1 is active but its files are gone" in result.stdout and "rollback --advisor ansel" in result.stdout
    assert "weston-v2 is active but" not in result.stdout


def test_rollback_pin_unpin_from_the_command_line(home):
    home_dir = home.root / "home"
    rolled = cli(home_dir, "rollback", "--advisor", "weston")
    assert rolled.returncode == 0, rolled.stderr
    assert "weston-v1 is active" in rolled.stdout and home.pointer() == "versions/weston-v1"
    assert deployments(home.engine, "weston")[-1].actor.startswith("cli:")

    refused = cli(home_dir, "rollback", "--advisor", "weston", "--to", "4")
    assert refused.returncode == 2 and "refused: weston-v4 failed its evaluation gates" in refused.stderr
    assert active_version(home.engine, "weston").number == 1
    # a person may choose a version that passed its gates but lost to the active one then
    assert cli(home_dir, "rollback", "--advisor", "weston", "--to", "3").returncode == 0
    assert active_version(home.engine, "weston").number == 3
    assert cli(home_dir, "pin", "--advisor", "weston", "--version", "2").returncode == 0
    assert active_version(home.engine, "weston").pinned and home.pointer() == "versions/weston-v2"
    assert cli(home_dir, "unpin", "--advisor", "weston").returncode == 0
    nothing = cli(home_dir, "unpin", "--advisor", "weston")
    assert nothing.returncode == 2 and "not pinned" in nothing.stderr


def _table_rows(stdout: str) -> dict[str, str]:
    """The main job's closing table, one line per advisor."""
    table = stdout[stdout.index("advisor  train/val"):].splitlines()[1:]
    return {line.split()[0]: line for line in table if line.strip()}


@pytest.mark.slow
def test_the_main_job_deploys_each_advisor_and_a_second_run_changes_nothing(tmp_path):
    advisors = ("ansel", "weston")
    args = [a for advisor in advisors for a in ("--advisor", advisor)]
    first = cli(tmp_path, "demo", *args, timeout=1800)
    assert first.returncode == 0, first.stderr[-3000:]
    rows = _table_rows(first.stdout)
    engine = state_engine(tmp_path / "mondrian_assets.db")
    status = cli(tmp_path, "status").stdout
    for advisor in advisors:
        report = json.loads((tmp_path / "evaluation" / advisor / "comparison_report.json").read_text())
        passed = all(g["passed"] for g in report["gates"])
        [version] = list_versions(engine, advisor)
        assert version.gates_passed == passed and (version.status == "active") == passed
        line = next(line for line in status.splitlines() if line.startswith(f"{advisor} "))
        assert line.split()[2] == (f"{advisor}-v1" if passed else "-")
        assert f"{'promoted' if passed else 'rejected'} {advisor}-v1" in rows[advisor]

    before = {a: (len(list_versions(engine, a)), len(deployments(engine, a))) for a in advisors}
    second = cli(tmp_path, "demo", *args, timeout=1800)
    assert second.returncode == 0, second.stderr[-3000:]
    assert all("unchanged, " in row for row in _table_rows(second.stdout).values())
    assert {a: (len(list_versions(engine, a)), len(deployments(engine, a))) for a in advisors} == before
