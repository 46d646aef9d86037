import dataclasses
import importlib
from dataclasses import replace
from pathlib import Path

import pydantic
import pytest
import yaml

from mondrian_assets.core.evaluation.gates import GateThresholds
from mondrian_assets.core.evaluation.run import EvalSettings, evaluate_adapter
from mondrian_assets.defs.evaluation import EvalRunConfig

REPO = Path(__file__).resolve().parent.parent


def test_workspace_yaml_points_at_the_definitions():
    """`dagster dev` in the repo root loads what workspace.yaml names: load it the same way."""
    target = yaml.safe_load((REPO / "workspace.yaml").read_text())["load_from"][0]["python_module"]
    defs = getattr(importlib.import_module(target["module_name"]), target["attribute"])
    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert {"linked_records", "train_split", "val_split"} <= keys
    assert defs.resolve_job_def("link_job") and defs.resolve_job_def("advisor_job")


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
