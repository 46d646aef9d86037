"""The registry on a real SQLite state DB with real adapter folders and reports (see registry_helpers)."""

import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mondrian_assets.core.registry.decisions import (
    WORST_ERROR,
    candidate_vs_active,
    pin,
    rollback,
    unpin,
)
from mondrian_assets.core.registry.evidence import ExampleOutcome
from mondrian_assets.core.registry.pointer import point_to, pointer_path
from mondrian_assets.core.registry.status import registry_status
from mondrian_assets.core.registry.versions import (
    ADAPTER_FILES,
    RegistryError,
    active_version,
    adapter_content_hash,
    deployments,
    list_versions,
    register_version,
)
from mondrian_assets.core.state_db import deployments_table, model_versions_table
from mondrian_assets_tests.registry_helpers import Registry


@pytest.fixture
def reg(tmp_path) -> Registry:
    return Registry(tmp_path)


def test_first_version_is_promoted_as_an_immutable_copy_behind_the_pointer(reg):
    adapter, report = reg.candidate(1, [0.5, 0.5, 0.5, 0.5])
    decision = reg.deploy(adapter, report)

    assert decision.action == "promote" and decision.active.name == "weston-v1"
    v1 = active_version(reg.engine, "weston")
    assert v1.path == reg.models / "versions" / "weston-v1" and v1.status == "active"
    assert v1.content_hash == adapter_content_hash(adapter) and v1.fingerprint == "run-1"
    for name in (*ADAPTER_FILES, "training_args.json", "training_log.jsonl", "comparison_report.json"):
        copy = v1.path / name
        assert copy.is_file() and not copy.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH), name
    assert (v1.path / "adapters.safetensors").read_bytes() == (adapter / "adapters.safetensors").read_bytes()
    assert reg.pointer() == "versions/weston-v1"
    assert pointer_path(reg.models, "weston").resolve() == v1.path.resolve()
    history = deployments(reg.engine, "weston")
    assert [(d.action, d.from_version, d.to_version, d.actor) for d in history] == [("promote", None, 1, "test")]
    assert reg.evaluated == []  # nothing to compare against


def test_a_moved_home_keeps_its_versions(reg, tmp_path):
    """Rows name version folders relative to the home, so copying the home elsewhere keeps them loadable."""
    reg.deploy(*reg.candidate(1, [0.5, 0.5, 0.5, 0.5]))
    reg.engine.dispose()
    moved = tmp_path / "moved-home"
    shutil.copytree(tmp_path / "home", moved, symlinks=True)
    shutil.rmtree(tmp_path / "home")
    v1 = active_version(Registry(tmp_path, moved).engine, "weston")
    assert v1.path == moved / "models" / "versions" / "weston-v1" and (v1.path / "adapters.safetensors").is_file()
    assert Path(v1.eval_report) == v1.path / "comparison_report.json" and Path(v1.eval_report).is_file()
    assert pointer_path(moved / "models", "weston").resolve() == v1.path.resolve()


def test_a_failed_gate_is_rejected_with_its_reason_and_never_made_active(reg):
    adapter, report = reg.candidate(1, [0.5, 0.5, 0.5, 0.5], gates=[True, False, True])
    decision = reg.deploy(adapter, report)
    assert decision.action == "reject" and decision.active is None
    assert decision.reasons == ["gate gate1 failed: gate1 failed"]
    assert list_versions(reg.engine, "weston")[0].status == "rejected" and reg.pointer() is None

    # a later run deploying the same candidate cannot promote it, and records nothing new
    again = reg.deploy(adapter, report)
    assert again.action == "unchanged" and active_version(reg.engine, "weston") is None
    assert reg.rows(deployments_table) == 1
    # nor can a person
    with pytest.raises(RegistryError, match="failed its evaluation gates"):
        pin(reg.engine, reg.models, "weston", number=1, actor="test")


def test_a_report_without_gate_results_is_no_evidence(reg):
    adapter, report = reg.candidate(1, [0.5, 0.5, 0.5, 0.5], gates=[])
    decision = reg.deploy(adapter, report)
    assert decision.action == "reject" and "no gate results" in decision.reasons[0]


def test_worse_than_the_active_version_is_rejected_better_is_promoted(reg):
    assert reg.deploy(*reg.candidate(1, [1.0, 1.0, 1.0, 1.0])).action == "promote"

    worse = reg.deploy(*reg.candidate(2, [0.5, 0.5, 0.5, None]))  # closer on three, invalid on one
    assert worse.action == "reject" and worse.active.name == "weston-v1"
    assert "worse than the active weston-v1 on the same 4 validation examples" in worse.reasons[0]
    assert worse.comparison["candidate_mean_error"] == pytest.approx((1.5 + WORST_ERROR) / 4)
    assert worse.comparison["active_mean_error"] == pytest.approx(1.0)
    assert reg.pointer() == "versions/weston-v1"

    better = reg.deploy(*reg.candidate(3, [0.5, 0.5, 0.5, 1.0]))
    assert better.action == "promote" and better.active.name == "weston-v3"
    assert {v.number: v.status for v in list_versions(reg.engine, "weston")} == {1: "retired", 2: "rejected", 3: "active"}
    assert reg.pointer() == "versions/weston-v3"
    assert reg.evaluated == ["weston-v1", "weston-v1"]
    assert [d.action for d in deployments(reg.engine, "weston")] == ["promote", "reject", "promote"]


def test_paired_comparison_uses_the_same_examples():
    a = [ExampleOutcome("x", 5.0, True, 6.0), ExampleOutcome("y", None, True, 3.0)]  # y: reference invalid, unscored
    b = [ExampleOutcome("x", 5.0, False, None), ExampleOutcome("y", None, True, 9.0)]
    result = candidate_vs_active(a, b)
    assert (result.examples, result.candidate_error, result.active_error) == (1, 1.0, WORST_ERROR)
    with pytest.raises(RegistryError, match="different examples"):
        candidate_vs_active(a, b[:1])


def test_redeploying_the_same_adapter_content_changes_nothing(reg):
    adapter, report = reg.candidate(1, [0.5, 0.5, 0.5, 0.5])
    reg.deploy(adapter, report)
    before = (reg.rows(model_versions_table), reg.rows(deployments_table))

    copy = reg.root / "elsewhere"
    shutil.copytree(adapter, copy)  # the same content in another folder is the same version
    again = reg.deploy(copy, report)
    assert again.action == "unchanged" and again.candidate.number == 1
    assert (reg.rows(model_versions_table), reg.rows(deployments_table)) == before
    assert sorted(p.name for p in (reg.models / "versions").iterdir()) == ["weston-v1"]


def test_a_folder_changed_after_its_evaluation_is_refused(reg):
    adapter, report = reg.candidate(1, [0.5, 0.5, 0.5, 0.5])
    evaluated = adapter_content_hash(adapter)
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(RegistryError, match="changed after it was evaluated"):
        register_version(reg.engine, reg.models, "weston", adapter, report=report, metrics={}, gates_passed=True,
                         expected_hash=evaluated)  # fmt: skip
    assert reg.rows(model_versions_table) == 0


def test_rollback_pin_and_unpin(reg):
    reg.deploy(*reg.candidate(1, [1.0] * 4))
    reg.deploy(*reg.candidate(2, [0.5] * 4))
    assert rollback(reg.engine, reg.models, "weston", actor="cli:me").name == "weston-v1"
    assert reg.pointer() == "versions/weston-v1"
    assert {v.number: v.status for v in list_versions(reg.engine, "weston")} == {1: "active", 2: "retired"}
    with pytest.raises(RegistryError, match="no earlier version"):
        rollback(reg.engine, reg.models, "weston", actor="cli:me")
    assert rollback(reg.engine, reg.models, "weston", to=2, actor="cli:me").name == "weston-v2"

    # pinned: a better candidate is recorded, not promoted, and rollback is refused
    assert pin(reg.engine, reg.models, "weston", actor="cli:me").name == "weston-v2"
    held = reg.deploy(*reg.candidate(3, [0.1] * 4))
    assert held.action == "reject" and "pinned to weston-v2" in held.reasons[0]
    with pytest.raises(RegistryError, match="pinned"):
        rollback(reg.engine, reg.models, "weston", actor="cli:me")
    # pinning another version makes it active
    assert pin(reg.engine, reg.models, "weston", number=3, actor="cli:me").name == "weston-v3"
    assert reg.pointer() == "versions/weston-v3"
    unpin(reg.engine, reg.models, "weston", actor="cli:me")
    assert active_version(reg.engine, "weston").name == "weston-v3" and not active_version(reg.engine, "weston").pinned
    assert reg.deploy(*reg.candidate(4, [0.05] * 4)).action == "promote"

    actions = [(d.action, d.from_version, d.to_version) for d in deployments(reg.engine, "weston")]
    assert actions == [("promote", None, 1), ("promote", 1, 2), ("rollback", 2, 1), ("rollback", 1, 2), ("pin", 2, 2),
                       ("reject", 2, 3), ("pin", 2, 3), ("unpin", 3, 3), ("promote", 3, 4)]  # fmt: skip


def test_retention_keeps_the_newest_and_never_the_active_pinned_or_previous(reg):
    pruned = [reg.deploy(*reg.candidate(seed, [5.0 - seed] * 4), keep_last=1).pruned for seed in (1, 2, 3, 4)]
    assert pruned == [[], [], [1], [2]]  # each promotion keeps the new active and the previous one
    live = {v.number for v in list_versions(reg.engine, "weston") if v.pruned_at is None}
    assert live == {3, 4}  # 4 active, 3 previous
    assert sorted(p.name for p in (reg.models / "versions").iterdir()) == ["weston-v3", "weston-v4"]
    assert reg.rows(model_versions_table) == 4  # history stays
    with pytest.raises(RegistryError, match="removed by retention"):
        rollback(reg.engine, reg.models, "weston", to=1, actor="test")

    pin(reg.engine, reg.models, "weston", number=3, actor="test")  # active and pinned: v3; v4 retired
    reg.deploy(*reg.candidate(5, [0.5] * 4), keep_last=1)  # rejected (pinned), but the newest
    live = {v.number for v in list_versions(reg.engine, "weston") if v.pruned_at is None}
    assert live == {3, 5}


def test_status_repairs_a_pointer_that_disagrees_with_the_registry(reg):
    reg.deploy(*reg.candidate(1, [1.0] * 4))
    reg.deploy(*reg.candidate(2, [0.5] * 4))
    point_to(reg.models, "weston", reg.models / "versions" / "weston-v1")  # changed by hand
    [status] = registry_status(reg.engine, reg.models)
    assert status.pointer_repaired and status.pointer == "versions/weston-v2" == reg.pointer()
    assert status.active.number == 2 and status.previous.number == 1 and len(status.versions) == 2
    assert status.last_decision.action == "promote" and status.last_evaluation == "2026-12-02T10:00:00+00:00"

    pointer_path(reg.models, "weston").unlink()  # deleted by hand
    assert registry_status(reg.engine, reg.models)[0].pointer_repaired and reg.pointer() == "versions/weston-v2"
    assert not registry_status(reg.engine, reg.models)[0].pointer_repaired  # in agreement: nothing to do


CRASH_POINTS = ["version_dir_written", "version_row_written", "decision_recorded", "pointer_staged",
                "pointer_switched", "pruned_rows_written"]  # fmt: skip

# Deploys `adapter` with `report`; killed by SIGKILL at the step boundary `point` ("-": never), or after waiting
# for the file `go` to exist when one is named, so that several processes start their deploys at the same moment.
_DEPLOY = """
import os, signal, sys, time
from pathlib import Path
from mondrian_assets.core.registry import versions
from mondrian_assets.core.registry.decisions import deploy_candidate
from mondrian_assets.core.registry.evidence import read_evidence
from mondrian_assets.core.state_db import state_engine
from mondrian_assets_tests.registry_helpers import own_report_outcomes

state_db, models, adapter, report, point, go = sys.argv[1:]
versions.crash_hook = lambda name: os.kill(os.getpid(), signal.SIGKILL) if name == point else None
evidence = read_evidence(Path(report), versions.adapter_content_hash(Path(adapter)))
while go != "-" and not Path(go).exists():
    time.sleep(0.001)
decision = deploy_candidate(state_engine(Path(state_db)), Path(models), "weston", Path(adapter), evidence,
                            evaluate=own_report_outcomes, actor=f"process {os.getpid()}")
print(decision.action)
"""


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_a_crash_between_any_two_steps_leaves_the_old_or_the_new_version(reg, point):
    reg.deploy(*reg.candidate(1, [1.0] * 4))
    adapter, report = reg.candidate(2, [0.5] * 4)
    repo = Path(__file__).resolve().parent.parent
    args = [str(reg.root / "home" / "mondrian_assets.db"), str(reg.models), str(adapter), str(report), point, "-"]
    crashed = subprocess.run([sys.executable, "-c", _DEPLOY, *args], cwd=repo, capture_output=True, text=True)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]  # kill -9 at that very point

    active = active_version(reg.engine, "weston")
    assert active.number in (1, 2)
    target = pointer_path(reg.models, "weston").resolve()
    assert target.name in ("weston-v1", "weston-v2")  # the pointer names a whole version, old or new
    assert all((target / name).is_file() for name in ADAPTER_FILES)

    [status] = registry_status(reg.engine, reg.models)  # the next status repairs what the crash left
    assert status.pointer == f"versions/{active.name}"
    final = reg.deploy(adapter, report)  # and the deploy, run again, completes it exactly once
    assert final.active.name == "weston-v2" and reg.pointer() == "versions/weston-v2"
    assert [(d.action, d.to_version) for d in deployments(reg.engine, "weston")] == [("promote", 1), ("promote", 2)]
    assert [v.number for v in list_versions(reg.engine, "weston")] == [1, 2]
    leftovers = [p.name for p in (reg.models / "versions").iterdir() if p.name.startswith(".")]
    leftovers += [p.name for p in reg.models.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_concurrent_deploys_of_one_advisor_serialize(reg):
    same = reg.candidate(1, [1.0] * 4)
    other = reg.candidate(2, [0.5] * 4)
    start = threading.Barrier(4)
    results, errors = [], []

    def deploy(candidate):
        try:
            start.wait()
            results.append(reg.deploy(*candidate))
        except Exception as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=deploy, args=(c,)) for c in (same, same, other, other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(v.number for v in list_versions(reg.engine, "weston")) == [1, 2]  # no number given twice
    history = deployments(reg.engine, "weston")
    assert sorted(d.to_version for d in history) == [1, 2]  # one decision per candidate, never doubled
    assert sorted(r.action for r in results).count("unchanged") == 2
    assert active_version(reg.engine, "weston").content_hash == adapter_content_hash(other[0])  # the better one
    assert reg.pointer() == f"versions/{active_version(reg.engine, 'weston').name}"


def test_concurrent_deploys_of_one_advisor_from_separate_processes_serialize(reg):
    """Two deploy decisions racing, as two Dagster run workers would: the registry's write lock is SQLite's, so
    it holds across processes; no version number or decision is lost or doubled."""
    same, other = reg.candidate(1, [1.0] * 4), reg.candidate(2, [0.5] * 4)
    repo = Path(__file__).resolve().parent.parent
    go = reg.root / "go"
    db = str(reg.root / "home" / "mondrian_assets.db")
    reg.rows(model_versions_table)  # the state DB and its tables exist before the race
    racers = [subprocess.Popen([sys.executable, "-c", _DEPLOY, db, str(reg.models), str(a), str(r), "-", str(go)],
                               cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for a, r in (same, other, same, other)]  # fmt: skip
    time.sleep(3)  # every racer imported and waiting
    go.touch()
    outputs = [p.communicate(timeout=120) for p in racers]
    assert [p.returncode for p in racers] == [0] * 4, [err[-2000:] for _, err in outputs]
    actions = sorted(out.strip() for out, _ in outputs)
    assert actions.count("unchanged") == 2 and len(actions) == 4
    assert sorted(v.number for v in list_versions(reg.engine, "weston")) == [1, 2]  # no number given twice
    assert sorted(d.to_version for d in deployments(reg.engine, "weston")) == [1, 2]  # one decision each
    assert len({d.actor for d in deployments(reg.engine, "weston")}) == 2
    assert active_version(reg.engine, "weston").content_hash == adapter_content_hash(other[0])  # the better one
    assert reg.pointer() == f"versions/{active_version(reg.engine, 'weston').name}"
