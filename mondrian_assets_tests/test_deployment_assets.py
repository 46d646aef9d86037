"""`deployed_version`, `rollback_job` and `pin_job` through Dagster: the real embedded model with a short real
training run for the asset, registries of small real adapters for the jobs."""

import json
import shutil

import dagster as dg
import pytest
import sqlalchemy as sa

from mondrian_assets.core.inference.loading import load_for_inference
from mondrian_assets.core.locations import Locations
from mondrian_assets.core.registry.evidence import evaluate_version
from mondrian_assets.core.registry.pointer import read_pointer
from mondrian_assets.core.registry.versions import active_version, deployments, list_versions
from mondrian_assets.core.state_db import deployments_table, model_versions_table, state_engine
from mondrian_assets.definitions import defs
from mondrian_assets.defs import deployment, evaluation, linking, splits, training
from mondrian_assets.defs.resources import MlxTrainer, MondrianDatabase
from mondrian_assets_tests.registry_helpers import Registry

ASSETS = [linking.linked_records, splits.advisor_splits, training.lora_adapter, evaluation.eval_report,
          deployment.deployed_version]  # fmt: skip
SMALL_EVAL = {"ops": {"eval_report": {"config": {"max_examples": 2, "max_tokens": 24, "batch_size": 2}}}}


class Pipeline:
    def __init__(self, loc: Locations, instance: dg.DagsterInstance, resources: dict):
        self.loc, self.instance, self.resources = loc, instance, resources
        self.engine = state_engine(loc.state_db)

    def run(self, selection: list[str], advisor: str | None = "weston", resources: dict | None = None,
            run_config: dict | None = None) -> dg.ExecuteInProcessResult:  # fmt: skip
        config = run_config or (SMALL_EVAL if "eval_report" in selection else None)
        return dg.materialize(ASSETS, selection=selection, partition_key=advisor, resources=resources or self.resources,
                              instance=self.instance, run_config=config, raise_on_error=False)  # fmt: skip

    def counts(self) -> tuple[int, int]:
        with self.engine.connect() as conn:
            return tuple(conn.execute(sa.select(sa.func.count()).select_from(t)).scalar()
                         for t in (model_versions_table, deployments_table))  # fmt: skip


@pytest.fixture(scope="module")
def pipeline(pristine_demo, embedded_base, tmp_path_factory):
    """weston linked, split, trained briefly (12 steps: too short to learn the format) and deployed, once."""
    root = tmp_path_factory.mktemp("deploy")
    shutil.copytree(pristine_demo.app_dir, root / "app")
    loc = Locations.resolve(app_dir=str(root / "app"), home=str(root / "home"), environ={})
    trainer = MlxTrainer(base_model=str(embedded_base), iters=12, eval_interval=6, save_interval=6, warmup_steps=2)
    resources = {"mondrian_db": MondrianDatabase(app_dir=str(loc.app_dir), home=str(loc.home)), "mlx_trainer": trainer}
    with dg.instance_for_test() as instance:
        p = Pipeline(loc, instance, resources)
        assert p.run(["linked_records"], advisor=None).success
        assert p.run(["train_split", "val_split"]).success
        p.first = p.run(["lora_adapter", "eval_report", "deployed_version"])
        yield p


def test_a_failed_gate_still_reaches_a_recorded_decision_in_the_same_run(pipeline):
    result = pipeline.first
    assert result.success  # the gates do not block: deployed_version records the verdict
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks["format_compliance"] is False

    meta = result.asset_materializations_for_node("deployed_version")[0].metadata
    assert meta["decision"].value == "reject" and meta["active_version"].value == "none"
    assert "gate format_compliance failed" in meta["reasons"].value
    [version] = list_versions(pipeline.engine, "weston")
    assert version.status == "rejected" and not version.gates_passed
    report = json.loads((pipeline.loc.evaluation / "weston" / "comparison_report.json").read_text())
    assert json.loads((version.path / "comparison_report.json").read_text())["gates"] == report["gates"]
    assert read_pointer(pipeline.loc.models, "weston") is None and active_version(pipeline.engine, "weston") is None
    assert deployments(pipeline.engine, "weston")[0].actor == f"dagster:{result.run_id}"


def test_rematerializing_with_nothing_new_changes_nothing(pipeline):
    before = pipeline.counts()
    again = pipeline.run(["lora_adapter", "eval_report", "deployed_version"])  # retrains: same data, same weights
    assert again.success
    assert again.asset_materializations_for_node("deployed_version")[0].metadata["decision"].value == "unchanged"
    assert pipeline.counts() == before
    assert [p.name for p in (pipeline.loc.models / "versions").iterdir()] == ["weston-v1"]


def test_a_version_is_evaluated_with_the_evaluation_code_and_cached(pipeline):
    [version] = list_versions(pipeline.engine, "weston")
    val = pipeline.loc.training_data / "weston" / "training_data_weston_val.json"
    settings = {"max_examples": 2, "max_tokens": 24, "batch_size": 2, "seed": 0}
    said: list[str] = []
    first = evaluate_version(pipeline.engine, version, val, settings, log=said.append)
    assert [o.example_id for o in first] == [r.get("job_id") or o.example_id for r, o in
                                              zip(json.loads(val.read_text()), first)]  # fmt: skip
    assert len(first) == 2 and not any(o.valid for o in first)  # 24 tokens cannot hold a whole analysis
    assert "generating 2 analyses" in said[-1]
    assert evaluate_version(pipeline.engine, version, val, settings, log=said.append) == first
    assert "cached" in said[-1]


@pytest.fixture
def registry(tmp_path, mondrian_db, locations) -> Registry:
    """Two promoted versions of weston in the registry the `mondrian_db` resource points at."""
    reg = Registry(tmp_path, home=locations.home)
    reg.deploy(*reg.candidate(1, [1.0] * 4))
    reg.deploy(*reg.candidate(2, [0.5] * 4))
    return reg


def _run_job(name: str, config: dict, mondrian_db, instance) -> dg.ExecuteInProcessResult:
    job = defs.get_job_def(name)
    return job.execute_in_process(run_config={"ops": config}, resources={"mondrian_db": mondrian_db},
                                  instance=instance, raise_on_error=False)  # fmt: skip


def test_rollback_and_pin_jobs_from_the_ui(registry, mondrian_db, instance):
    instance.add_dynamic_partitions("advisor", ["weston"])
    result = _run_job("rollback_job", {"rollback_active_version": {"config": {"advisor": "weston"}}}, mondrian_db, instance)
    assert result.success
    assert active_version(registry.engine, "weston").number == 1 and registry.pointer() == "versions/weston-v1"
    [event] = result.asset_materializations_for_node("rollback_active_version")
    assert event.partition == "weston" and event.metadata["active_version"].value == "weston-v1"
    assert deployments(registry.engine, "weston")[-1].actor == f"dagster:{result.run_id}"

    pinned = _run_job("pin_job", {"pin_active_version": {"config": {"advisor": "weston", "version": 2}}}, mondrian_db, instance)
    assert pinned.success and active_version(registry.engine, "weston").pinned
    assert registry.pointer() == "versions/weston-v2"
    refused = _run_job("rollback_job", {"rollback_active_version": {"config": {"advisor": "weston"}}}, mondrian_db, instance)
    assert not refused.success
    failure = next(e for e in refused.all_events if e.event_type_value == "STEP_FAILURE")
    assert "pinned to weston-v2" in failure.event_specific_data.error.message
    unpinned = _run_job("pin_job", {"pin_active_version": {"config": {"advisor": "weston", "unpin": True}}}, mondrian_db, instance)
    assert unpinned.success and not active_version(registry.engine, "weston").pinned


RELAXED_GATES = {"min_format_compliance": 0.0, "fallback_to_mean_baseline": False, "max_inference_overhead": 10.0}


def test_a_real_candidate_is_promoted_compared_with_the_active_one_and_rolled_back(pipeline, embedded_base):
    """Gates a 12-step model can pass (no valid base output: nothing to regress from): the first version is
    promoted on the new evidence, then a retrained candidate is judged against it on the same examples."""
    relaxed = {"ops": {"eval_report": {"config": {**SMALL_EVAL["ops"]["eval_report"]["config"], **RELAXED_GATES}}}}
    first = pipeline.run(["eval_report", "deployed_version"], run_config=relaxed)
    assert first.success
    assert first.asset_materializations_for_node("deployed_version")[0].metadata["decision"].value == "promote"
    v1 = active_version(pipeline.engine, "weston")
    assert v1.number == 1 and read_pointer(pipeline.loc.models, "weston") == "versions/weston-v1"
    loaded = load_for_inference(str(embedded_base), pipeline.loc.models / "weston-active")  # verifies it applied
    assert loaded.fused_layers > 0

    retrained = {**pipeline.resources, "mlx_trainer": MlxTrainer(base_model=str(embedded_base), iters=12,
                 eval_interval=6, save_interval=6, warmup_steps=2, seed=1)}  # fmt: skip
    second = pipeline.run(["lora_adapter", "eval_report", "deployed_version"], resources=retrained, run_config=relaxed)
    assert second.success
    meta = second.asset_materializations_for_node("deployed_version")[0].metadata
    assert meta["candidate_version"].value == "weston-v2"
    assert "mean overall-score error | 9.000 | 9.000" in meta["candidate_vs_active"].value  # the active one was evaluated on these examples
    [decision] = [d for d in deployments(pipeline.engine, "weston") if d.to_version == 2]
    compared = decision.evidence["candidate_vs_active"]
    assert compared["examples"] == 2 and compared["active_mean_error"] is not None
    # no valid answer from either: a tie, and a tie is "at least as good"
    assert decision.action == "promote" and active_version(pipeline.engine, "weston").number == 2

    result = defs.get_job_def("rollback_job").execute_in_process(
        run_config={"ops": {"rollback_active_version": {"config": {"advisor": "weston"}}}},
        resources={"mondrian_db": pipeline.resources["mondrian_db"]}, instance=pipeline.instance,
    )  # fmt: skip
    assert result.success and active_version(pipeline.engine, "weston").number == 1
    assert read_pointer(pipeline.loc.models, "weston") == "versions/weston-v1"
