"""The nightly re-check: the schedule's run requests from the registry, the verdict's bars, and the check failing
loudly (a failed run, an evaluation_history row, an alert to a loopback webhook) on a planted regression."""

import json
import shutil
import threading
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, HTTPServer

import dagster as dg
import pytest

from mondrian_assets.core.evaluation.gates import GateThresholds
from mondrian_assets.core.locations import Locations
from mondrian_assets.core.registry import decisions
from mondrian_assets.core.registry.recheck import deployment_settings, history, judge
from mondrian_assets.core.registry.versions import Version, register_version
from mondrian_assets.core.state_db import state_engine
from mondrian_assets.definitions import defs
from mondrian_assets.defs import evaluation, linking, nightly, splits, training
from mondrian_assets.defs.partitions import ADVISOR_PARTITIONS_NAME
from mondrian_assets.defs.resources import AlertWebhook, MlxTrainer, MondrianDatabase
from mondrian_assets.defs.schedules import nightly_evaluation_schedule
from mondrian_assets.registry_commands import cmd_status
from mondrian_assets_tests.registry_helpers import Registry

NIGHT = datetime(2026, 12, 3, 2, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize("saved, expected_scores", [
    ({"max_tokens": 90, "expected_scores": True}, True),
    ({"max_tokens": 90, "expected_scores": False}, False),
    ({"max_tokens": 90}, False),  # a report from before expected score values: decoded greedily
    (None, True),  # no report: today's defaults
])  # fmt: skip
def test_the_recheck_decodes_as_the_deployment_evaluation_did(tmp_path, saved, expected_scores):
    report = tmp_path / "comparison_report.json"
    if saved is not None:
        report.write_text(json.dumps({"settings": saved}))
    version = Version("weston", 1, "h", "base", "d", "f", {}, str(report), True, "active", False, tmp_path, "t", None)
    settings = deployment_settings(version, GateThresholds())
    assert settings.expected_scores is expected_scores
    assert settings.max_tokens == (90 if saved else None)


def test_judge_holds_within_the_tolerance_and_fails_each_bar():
    held = judge(1.0, 0.9, 0.6, min_format_compliance=0.95, mae_tolerance=0.5)
    assert held.passed and "within 0.50 of 0.600" in held.reasons[1]
    regressed = judge(1.0, 1.2, 0.6, min_format_compliance=0.95, mae_tolerance=0.5)
    assert not regressed.passed and regressed.reasons == [
        "overall-score MAE 1.200 regressed from 0.600 at deployment by more than the tolerance 0.50"]
    broken = judge(0.5, 0.6, 0.6, min_format_compliance=0.95, mae_tolerance=0.5)
    assert not broken.passed and "below the gate's 0.950" in broken.reasons[0]
    silent = judge(0.0, None, 0.6, min_format_compliance=0.0, mae_tolerance=0.5)
    assert not silent.passed and "undefined" in silent.reasons[0]


def _tick(mondrian_db: MondrianDatabase, instance: dg.DagsterInstance):
    # as a context manager: the resources it builds are closed again, leaving no state to later tests
    with dg.build_schedule_context(instance=instance, resources={"mondrian_db": mondrian_db},
                                   scheduled_execution_time=NIGHT, repository_def=defs.get_repository_def()) as context:  # fmt: skip
        return nightly_evaluation_schedule.evaluate_tick(context)


def test_schedule_requests_one_run_per_advisor_with_an_active_version(tmp_path, instance):
    assert nightly_evaluation_schedule.cron_schedule == "0 2 * * *"
    assert nightly_evaluation_schedule.execution_timezone == "UTC"
    assert nightly_evaluation_schedule.job_name == "nightly_evaluation_job"
    home = tmp_path / "home"
    mondrian_db = MondrianDatabase(app_dir=str(tmp_path / "app"), home=str(home))
    empty = _tick(mondrian_db, instance)
    assert not empty.run_requests and "no advisor has an active version" in empty.skip_message

    instance.add_dynamic_partitions(ADVISOR_PARTITIONS_NAME, ["ansel", "okeefe", "weston"])  # as linking does
    registry = Registry(tmp_path, home)
    for seed, advisor, gates in ((1, "ansel", None), (2, "weston", None), (3, "okeefe", [True, False, True])):
        registry.deploy(*registry.candidate(seed, [0.5, 0.5, 0.5, 0.5], gates=gates), advisor=advisor)
    requests = _tick(mondrian_db, instance).run_requests
    # okeefe's only version failed a gate: it was never made active, so there is nothing of it to re-check
    assert [(r.partition_key, r.run_key) for r in requests] == [
        ("ansel", "nightly-ansel-2026-12-03"), ("weston", "nightly-weston-2026-12-03")]
    assert _tick(mondrian_db, instance).run_requests[0].run_key == requests[0].run_key  # same night, same key


class _Webhook(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self):
        self.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def webhook():
    """A loopback HTTP server that records every JSON body posted to it."""
    _Webhook.received = []
    server = HTTPServer(("127.0.0.1", 0), _Webhook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/alerts", _Webhook.received
    server.shutdown()


ASSETS = [linking.linked_records, splits.advisor_splits, training.lora_adapter, evaluation.eval_report,
          nightly.active_version_evaluation]  # fmt: skip


@pytest.mark.slow  # a training and two evaluations; `.ci/run` runs it with the other slow proofs
def test_nightly_check_fails_loudly_on_a_planted_regression(pristine_demo, embedded_base, tmp_path, instance,
                                                            webhook, capsys):  # fmt: skip
    """weston trained briefly (12 steps: it has not learned the format), then registered as the active version
    with deployment-time metrics it never had: the re-check on the validation data must say it regressed."""
    shutil.copytree(pristine_demo.app_dir, tmp_path / "app")
    loc = Locations.resolve(app_dir=str(tmp_path / "app"), home=str(tmp_path / "home"), environ={})
    mondrian_db = MondrianDatabase(app_dir=str(loc.app_dir), home=str(loc.home))
    trainer = MlxTrainer(base_model=str(embedded_base), iters=12, eval_interval=6, save_interval=6, warmup_steps=2)
    url, received = webhook

    def run(selection, partition="weston", alert_url=None, config=None):
        return dg.materialize(ASSETS, selection=selection, partition_key=partition, instance=instance,
                              resources={"mondrian_db": mondrian_db, "mlx_trainer": trainer,
                                         "alert_webhook": AlertWebhook(url=alert_url)},
                              run_config=config, raise_on_error=False)  # fmt: skip

    assert run(["linked_records"], partition=None).success
    small_eval = {"ops": {"eval_report": {"config": {"max_examples": 2, "max_tokens": 24, "batch_size": 2}}}}
    assert run(["train_split", "val_split", "lora_adapter", "eval_report"], config=small_eval).success

    engine = state_engine(loc.state_db)
    planted = {"format_compliance": 1.0, "overall_score_mae": 0.2}
    version, _ = register_version(engine, loc.models, "weston", loc.models / "adapters" / "weston",
                                  report=loc.evaluation / "weston" / "comparison_report.json", metrics=planted,
                                  gates_passed=True)  # fmt: skip
    decisions.pin(engine, loc.models, "weston", number=version.number, actor="test")

    result = run(["active_version_evaluation"], alert_url=url)
    assert not result.success  # the blocking check fails the run: red in the UI's run list
    check = result.get_asset_check_evaluations()[0]
    assert check.check_name == "active_version_holds_up" and not check.passed
    assert check.severity == dg.AssetCheckSeverity.ERROR
    meta = result.asset_materializations_for_node("active_version_evaluation")[0].metadata
    assert meta["version"].value == "weston-v1" and meta["deployment_format_compliance"].value == 1.0
    assert meta["format_compliance"].value < 0.95

    [row] = history(engine, "weston")
    assert not row.passed and row.version == 1 and row.examples == 2  # the deployment-time settings: 2 examples
    assert row.reference_overall_score_mae == 0.2 and any("below the gate" in r for r in row.reasons)
    [alert] = received
    assert alert["advisor"] == "weston" and alert["version"] == 1 and alert["reasons"] == row.reasons
    assert "failed its nightly re-check" in alert["text"] and alert["dagster_run_id"] == result.run_id

    # no webhook configured: the check fails the same way, and nothing is sent anywhere
    assert not run(["active_version_evaluation"]).success
    assert len(received) == 1 and len(history(engine, "weston")) == 2

    class Args:
        home, advisor = str(loc.home), None

    assert cmd_status(Args()) == 0
    out = capsys.readouterr().out
    assert "nightly re-check FAILED: weston-v1" in out and "below the gate" in out
