import importlib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def test_workspace_yaml_points_at_the_definitions():
    """`dagster dev` in the repo root loads what workspace.yaml names: load it the same way."""
    target = yaml.safe_load((REPO / "workspace.yaml").read_text())["load_from"][0]["python_module"]
    defs = getattr(importlib.import_module(target["module_name"]), target["attribute"])
    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert {"linked_records", "train_split", "val_split"} <= keys
    assert defs.resolve_job_def("link_job") and defs.resolve_job_def("advisor_job")
