"""lora_adapter and eval_report through Dagster, on the real embedded model with short real training runs."""

import json

import dagster as dg
import pytest

from mondrian_assets.core.data.splits import split_files
from mondrian_assets.core.evaluation.run import evaluate_in_process
from mondrian_assets.core.isolation import crash_once_at
from mondrian_assets.core.training.loop import train_lora
from mondrian_assets.core.training.readiness import MIN_TRAIN_EXAMPLES
from mondrian_assets.defs import linking
from mondrian_assets.defs.resources import MlxTrainer
from mondrian_assets.run_outcome import read_outcome
from helpers import hub_cache_with, materialize_partition, step_events

def run(selection, advisor, mondrian_db, trainer, instance, run_config=None) -> dg.ExecuteInProcessResult:
    resources = {"mondrian_db": mondrian_db, "mlx_trainer": trainer}
    return materialize_partition(selection, advisor, resources, instance, run_config)


@pytest.fixture
def linked(mondrian_db, instance):
    assert dg.materialize([linking.linked_records], resources={"mondrian_db": mondrian_db}, instance=instance).success


def test_adapter_trains_writes_its_files_and_passes_its_checks(linked, locations, mondrian_db, embedded_base, trainer, instance):
    assert run(["train_split", "val_split"], "weston", mondrian_db, trainer, instance).success
    result = run(["lora_adapter"], "weston", mondrian_db, trainer, instance)
    assert result.success
    adapter = locations.models / "adapters" / "weston"
    for name in ("adapter_config.json", "adapters.safetensors", "training_args.json", "training_log.jsonl", "loss_curve.png"):
        assert (adapter / name).is_file(), name
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model"] == str(embedded_base) and config["data_version"]
    log = [json.loads(line) for line in (adapter / "training_log.jsonl").read_text().splitlines()]
    assert {"step", "train_loss", "learning_rate", "tokens_per_sec", "peak_memory_gb"} <= set(log[-1])

    meta = result.asset_materializations_for_node("lora_adapter")[0].metadata
    assert meta["best_val_loss"].value < meta["first_val_loss"].value
    assert meta["trainable_parameters"].value > 0 and "loss_curve" in meta
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {"loss_went_down": True, "reloads_and_generates": True, "weights_finite": True,
                      "trainable_parameters_as_configured": True}  # fmt: skip


@pytest.mark.parametrize("advisor", ["okeefe", "watkins"])
def test_small_advisor_is_a_decision_not_a_failure(advisor, linked, locations, mondrian_db, trainer, instance):
    """Too little data: no adapter, eval_report skipped (not failed), the decision recorded in the instance."""
    assert run(["train_split", "val_split"], advisor, mondrian_db, trainer, instance).success
    result = run(["lora_adapter", "eval_report"], advisor, mondrian_db, trainer, instance)
    assert result.success
    assert result.asset_materializations_for_node("lora_adapter") == []
    skipped = {e.step_key for e in result.all_events if e.event_type_value == "STEP_SKIPPED"}
    assert skipped == {"eval_report"}
    observed = instance.fetch_observations(dg.AssetKey("lora_adapter"), limit=10).records
    [decision] = [r.asset_observation.metadata for r in observed if r.asset_observation.partition == advisor]
    train_count = json.loads(split_files(locations.training_data, advisor).meta_json.read_text())["counts"]["train"]
    assert decision["decision"].value == "not trained"
    assert decision["examples_needed"].value == MIN_TRAIN_EXAMPLES - train_count > 0
    assert f"needs {decision['examples_needed'].value} more training examples" in decision["reason"].value
    outcome = read_outcome(instance, result.run_id)
    assert outcome.status == "ok" and outcome.decisions["lora_adapter"]["decision"] == "not trained"


def test_missing_base_model_is_a_clear_config_error(linked, mondrian_db, trainer, tmp_path, instance):
    assert run(["train_split", "val_split"], "weston", mondrian_db, trainer, instance).success
    result = run(["lora_adapter"], "weston", mondrian_db, MlxTrainer(base_model=str(tmp_path / "nowhere")), instance)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "nowhere" in failure.event_specific_data.error.message
    # read back from the instance, a failure no gate explains is a real failure
    outcome = read_outcome(instance, result.run_id)
    assert outcome.status == "failed" and outcome.failed_gates == [] and "nowhere" in outcome.errors[0]


def test_eval_report_materializes_even_when_a_gate_fails(linked, locations, mondrian_db, trainer, instance):
    assert run(["train_split", "val_split"], "weston", mondrian_db, trainer, instance).success
    assert run(["lora_adapter"], "weston", mondrian_db, trainer, instance).success
    config = {"ops": {"eval_report": {"config": {"max_examples": 2, "max_tokens": 24, "batch_size": 2}}}}
    result = run(["eval_report"], "weston", mondrian_db, trainer, instance, config)

    report_path = locations.evaluation / "weston" / "comparison_report.json"
    report = json.loads(report_path.read_text())
    assert {"evaluation_date", "base_model", "lora_path", "validation_data", "metrics", "sample_results"} <= set(report)
    assert {"base_model", "fine_tuned_model", "improvements"} <= set(report["metrics"])
    assert len(report["sample_results"]) == 2
    assert (locations.evaluation / "weston" / "review.html").is_file()
    # 12 steps and 24 tokens cannot produce a whole analysis: the format gate must fail; it does not block the
    # run, deployed_version reads it from the report and records the rejection (test_deployment_assets)
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks["format_compliance"] is False
    assert [g["passed"] for g in report["gates"] if g["name"] == "format_compliance"] == [False]
    # what users would get: both re-decoded under the grammar mask, whose bounds close every answer of this
    # under-trained adapter validly within the budget (raised to the grammar's smallest over the 24-token cap)
    constrained = report["metrics"]["constrained_decoding"]
    assert constrained["redecoded"] == 2 - constrained["accepted_as_is"]
    assert constrained["valid_constrained"] == 2 and constrained["cut_off"] == 0 and constrained["timed_pairs"] > 0
    metadata = result.asset_materializations_for_node("eval_report")[0].metadata
    assert metadata["fine_tuned_format_compliance_constrained"].value == constrained["format_compliance_constrained"]
    assert result.success
    # read back from the instance, a failed gate is a verdict, not an error
    outcome = read_outcome(instance, result.run_id)
    assert outcome.status == "gated" and outcome.errors == [] and "eval_report" in outcome.materialized
    assert "format_compliance" in {g.check for g in outcome.failed_gates}
    assert report["meaningful"] is False and "n=2<5" in report["meaningful_note"]
    assert 'id="not-meaningful"' in (locations.evaluation / "weston" / "review.html").read_text()
    assert result.asset_materializations_for_node("eval_report")[0].metadata["report"].value == str(report_path)


def test_a_hub_id_from_the_local_cache_is_resolved_once_and_used_everywhere(
    linked, locations, mondrian_db, embedded_base, instance, tmp_path, monkeypatch
):
    """`base_model: Org/Name` as users write it, found in a Hugging Face cache with the network off."""
    snapshot = hub_cache_with(embedded_base, tmp_path, monkeypatch)
    revision = snapshot.name

    trainer = MlxTrainer(base_model="Org/Name", iters=12, eval_interval=6, save_interval=6, warmup_steps=2)
    assert run(["train_split", "val_split"], "weston", mondrian_db, trainer, instance).success
    config = {"ops": {"eval_report": {"config": {"max_examples": 1, "max_tokens": 8, "overhead_repeats": 2}}}}
    result = run(["lora_adapter", "eval_report"], "weston", mondrian_db, trainer, instance, config)

    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert all(checks[name] for name in ("loss_went_down", "reloads_and_generates", "weights_finite",
                                         "trainable_parameters_as_configured")), checks  # fmt: skip
    adapter = locations.models / "adapters" / "weston"
    args = json.loads((adapter / "training_args.json").read_text())
    assert args["config"]["base_model"] == str(snapshot)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model"] == str(snapshot)
    meta = result.asset_materializations_for_node("lora_adapter")[0].metadata
    assert "Org/Name" in meta["base_model"].value and revision[:12] in meta["base_model"].value
    report = json.loads((locations.evaluation / "weston" / "comparison_report.json").read_text())
    assert report["base_model"] == str(snapshot)  # evaluated on the same folder it trained on
    assert not (adapter.parent / ".weston.checkpoints").exists()  # the checks passed: checkpoints discarded


def test_a_hub_id_missing_from_the_cache_is_refused_with_what_to_do(linked, mondrian_db, trainer, instance,
                                                                     tmp_path, monkeypatch):  # fmt: skip
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert run(["train_split", "val_split"], "weston", mondrian_db, trainer, instance).success
    result = run(["lora_adapter"], "weston", mondrian_db, MlxTrainer(base_model="Org/Missing"), instance)
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "hf download Org/Missing" in failure.event_specific_data.error.message
    assert "STEP_UP_FOR_RETRY" not in step_events(result, "lora_adapter")  # a config problem is not retried


def test_a_killed_trainer_is_retried_by_dagster_and_resumes_from_its_checkpoint(
    linked, locations, mondrian_db, trainer, instance, tmp_path, monkeypatch
):
    marker = tmp_path / "killed-once"
    for name, value in crash_once_at(train_lora, 8, marker).items():  # SIGKILL at step 8, after the checkpoint at 6
        monkeypatch.setenv(name, value)
    assert run(["train_split", "val_split"], "weston", mondrian_db, trainer, instance).success
    result = run(["lora_adapter"], "weston", mondrian_db, trainer, instance)

    assert marker.exists(), "the first attempt must have been killed"
    events = step_events(result, "lora_adapter")
    assert "STEP_UP_FOR_RETRY" in events and "STEP_RESTARTED" in events
    assert result.success
    meta = result.asset_materializations_for_node("lora_adapter")[0].metadata
    assert meta["resumed_from_step"].value == 6 and meta["steps"].value == 12


_TIMED = ("latency", "tokens_per_s", "s_per_token", "speed_ratio", "timing", "overhead", "evaluation_date", "duration")


def _untimed(value):
    """A report without what a clock measures (latencies, speeds, the overhead gate, the date): what must repeat."""
    if isinstance(value, dict):
        if value.get("name") == "inference_overhead":
            return {"name": value["name"]}
        return {k: _untimed(v) for k, v in value.items() if not any(t in k for t in _TIMED)}
    if isinstance(value, list):
        return [_untimed(v) for v in value]
    return value


def test_a_killed_evaluation_fails_its_step_naming_the_signal_and_the_retry_equals_an_uninterrupted_one(
    linked, locations, mondrian_db, trainer, instance, tmp_path, monkeypatch
):
    assert run(["train_split", "val_split"], "weston", mondrian_db, trainer, instance).success
    assert run(["lora_adapter"], "weston", mondrian_db, trainer, instance).success
    config = {"ops": {"eval_report": {"config": {"max_examples": 2, "max_tokens": 24, "batch_size": 2,
                                                  "overhead_repeats": 2}}}}  # fmt: skip
    report_path = locations.evaluation / "weston" / "comparison_report.json"
    assert run(["eval_report"], "weston", mondrian_db, trainer, instance, config).success
    uninterrupted = json.loads(report_path.read_text())

    marker = tmp_path / "killed-once"
    for name, value in crash_once_at(evaluate_in_process, 3, marker).items():  # SIGKILL once the base has answered
        monkeypatch.setenv(name, value)
    result = run(["eval_report"], "weston", mondrian_db, trainer, instance, config)

    assert marker.exists(), "the first attempt must have been killed"
    [retry] = [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    assert "evaluation process was killed by signal SIGKILL" in retry.event_specific_data.error.to_string()
    assert "STEP_RESTARTED" in step_events(result, "eval_report") and result.success
    retried = json.loads(report_path.read_text())
    assert retried["evaluation_date"] != uninterrupted["evaluation_date"]  # written again, by the retry
    assert _untimed(retried) == _untimed(uninterrupted)


def test_a_failing_adapter_check_stops_evaluation_and_keeps_the_checkpoint(linked, locations, mondrian_db,
                                                                           embedded_base, instance):  # fmt: skip
    # a learning rate too small to move any weight: the validation loss cannot go down
    frozen = MlxTrainer(base_model=str(embedded_base), iters=4, eval_interval=2, save_interval=2, warmup_steps=0,
                        learning_rate=1e-30, min_learning_rate=0.0, lr_schedule="constant")  # fmt: skip
    assert run(["train_split", "val_split"], "weston", mondrian_db, frozen, instance).success
    result = run(["lora_adapter", "eval_report"], "weston", mondrian_db, frozen, instance)

    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks["loss_went_down"] is False
    assert "STEP_START" not in step_events(result, "eval_report")  # the blocking check stopped it
    assert not result.asset_materializations_for_node("eval_report")
    assert (locations.models / "adapters" / ".weston.checkpoints").is_dir()
    outcome = read_outcome(instance, result.run_id)  # as the CLI reads it: a verdict, not a failure
    assert outcome.status == "gated" and outcome.errors == []
    assert "loss_went_down" in {g.check for g in outcome.failed_gates}

    again = run(["lora_adapter"], "weston", mondrian_db, frozen, instance)  # e.g. a retry: no second training
    assert again.asset_materializations_for_node("lora_adapter")[0].metadata["resumed_from_step"].value == 4
