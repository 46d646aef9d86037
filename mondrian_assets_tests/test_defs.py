import dataclasses
import importlib
from dataclasses import replace
from pathlib import Path

import dagster as dg
import pydantic
import pytest
import yaml

from mondrian_assets.core.base_model import ResolvedBase
from mondrian_assets.core.evaluation.gates import GateThresholds
from mondrian_assets.core.evaluation.run import EvalSettings, evaluate_adapter
from mondrian_assets.core.training.config import TrainConfig, TrainingConfigError, check_numbers
from mondrian_assets.defs.evaluation import EvalRunConfig
from mondrian_assets.defs.resources import MlxTrainer

REPO = Path(__file__).resolve().parent.parent


def workspace_definitions() -> dg.Definitions:
    """What `dagster dev` in the repo root loads: the module workspace.yaml names."""
    target = yaml.safe_load((REPO / "workspace.yaml").read_text())["load_from"][0]["python_module"]
    return getattr(importlib.import_module(target["module_name"]), target["attribute"])


def test_the_workspace_definitions_load_whole():
    defs = workspace_definitions()
    dg.Definitions.validate_loadable(defs)  # keys, jobs, resources, partition mappings: all resolve
    graph = defs.resolve_asset_graph()
    assets = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert {"linked_records", "train_split", "val_split", "lora_adapter", "eval_report"} <= assets
    jobs = {job.name for job in defs.get_repository_def().get_all_jobs()}
    assert {"link_job", "split_job", "train_job", "advisor_job"} <= jobs
    checks = {key.name for key in graph.asset_check_keys}
    assert {"no_duplicate_images", "files_agree", "no_image_on_both_sides", "loss_went_down",
            "reloads_and_generates", "format_compliance", "score_mae_vs_base", "inference_overhead"} <= checks
    # a step whose logic changes results says which version of it made an asset
    unversioned = [k.to_user_string() for k in graph.get_all_asset_keys() if not graph.get(k).code_version]
    assert not unversioned


def launchpad_fields(config_class: type) -> dict:
    return {name: (f.default, f.description) for name, f in config_class.model_fields.items()}


def test_every_evaluation_setting_is_in_the_run_config_with_cores_default_and_description():
    fields = launchpad_fields(EvalRunConfig)
    for settings in (EvalSettings, GateThresholds):
        for f in dataclasses.fields(settings):
            if f.name == "thresholds":
                continue
            assert f.name in fields, f.name
            assert fields[f.name][0] == f.default and fields[f.name][1], f.name
    config = EvalRunConfig(max_examples=3, overhead_repeats=2, min_format_compliance=0.5)
    settings = config.settings()
    assert (settings.max_examples, settings.overhead_repeats, settings.thresholds.min_format_compliance) == (3, 2, 0.5)


@pytest.mark.parametrize("field, value", [("max_examples", -1), ("batch_size", 0), ("overhead_repeats", 1),
                                          ("min_format_compliance", 1.5)])  # fmt: skip
def test_out_of_bounds_evaluation_settings_are_refused_by_name(field, value, tmp_path):
    with pytest.raises(pydantic.ValidationError, match=field):
        EvalRunConfig(**{field: value})
    settings = EvalRunConfig().settings()
    bad = (replace(settings, thresholds=replace(settings.thresholds, **{field: value})) if field == "min_format_compliance"
           else replace(settings, **{field: value}))  # fmt: skip
    with pytest.raises(ValueError, match=field):  # core refuses it too, before reading any file
        evaluate_adapter("unused", tmp_path, tmp_path / "val.json", tmp_path / "train.json", tmp_path, bad)


def test_every_train_config_field_is_on_the_trainer_resource_with_cores_default_and_description():
    fields = launchpad_fields(MlxTrainer)
    for f in dataclasses.fields(TrainConfig):
        if f.name == "base_model":  # the resource resolves it (a hub id, a folder, or the embedded model)
            continue
        default = list(f.default) if isinstance(f.default, tuple) else f.default
        assert f.name in fields and fields[f.name][0] == default and fields[f.name][1], f.name
    knobs = {"min_learning_rate": 1e-5, "weight_decay": 0.01, "max_grad_norm": 0.5, "quantize_group_size": 32,
             "report_interval": 3, "target_modules": ["q_proj", "v_proj"]}  # fmt: skip
    config = MlxTrainer(**knobs).train_config(ResolvedBase("Org/Name", Path("/models/org-name"), None, None))
    assert config.base_model == "/models/org-name"
    assert {name: getattr(config, name) for name in knobs} == knobs | {"target_modules": ("q_proj", "v_proj")}


@pytest.mark.parametrize("field, value", [("lora_rank", 0), ("iters", 0), ("learning_rate", -1e-4),
                                          ("lora_dropout", 1.0), ("max_seq_length", 4), ("warmup_steps", -1)])  # fmt: skip
def test_out_of_bounds_training_settings_are_refused_by_name(field, value):
    with pytest.raises(pydantic.ValidationError, match=field):
        MlxTrainer(**{field: value})
    with pytest.raises(TrainingConfigError, match=field):  # core refuses it too, before loading anything
        check_numbers(replace(TrainConfig(base_model="unused"), **{field: value}))


def test_the_nightly_schedule_and_its_job_are_in_the_code_location():
    defs = workspace_definitions()
    schedule = next(s for s in defs.schedules if s.name == "nightly_evaluation_schedule")
    assert schedule.job_name == "nightly_evaluation_job" and schedule.cron_schedule == "0 2 * * *"
    assert schedule.default_status.value == "RUNNING"
    job_assets = defs.resolve_job_def("nightly_evaluation_job").asset_layer.executable_asset_keys
    assert {k.to_user_string() for k in job_assets} == {"active_version_evaluation"}
    # a retrain never runs the nightly re-check
    for name in ("train_job", "advisor_job"):
        assert "active_version_evaluation" not in {
            k.to_user_string() for k in defs.resolve_job_def(name).asset_layer.executable_asset_keys}
