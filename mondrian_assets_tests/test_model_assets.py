"""lora_adapter and eval_report through Dagster, on the real embedded model with short real training runs."""

import json

import dagster as dg
import pytest

from mondrian_assets.defs import evaluation, linking, splits, training
from mondrian_assets.defs.resources import MlxTrainer

ASSETS = [linking.linked_records, splits.advisor_splits, training.lora_adapter, evaluation.eval_report]


def run(selection, advisor, mondrian_db, trainer, instance, run_config=None) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        ASSETS,
        selection=selection,
        partition_key=advisor,
        resources={"mondrian_db": mondrian_db, "mlx_trainer": trainer},
        instance=instance,
        run_config=run_config,
        raise_on_error=False,
    )


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


def test_tiny_advisor_training_is_refused_with_a_reason(linked, mondrian_db, trainer, instance):
    assert run(["train_split", "val_split"], "okeefe", mondrian_db, trainer, instance).success
    result = run(["lora_adapter"], "okeefe", mondrian_db, trainer, instance)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "no validation examples" in failure.event_specific_data.error.message


def test_missing_base_model_is_a_clear_config_error(linked, mondrian_db, trainer, tmp_path, instance):
    assert run(["train_split", "val_split"], "weston", mondrian_db, trainer, instance).success
    result = run(["lora_adapter"], "weston", mondrian_db, MlxTrainer(base_model=str(tmp_path / "nowhere")), instance)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "nowhere" in failure.event_specific_data.error.message


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
    assert result.success
    assert result.asset_materializations_for_node("eval_report")[0].metadata["report"].value == str(report_path)
