"""The whole graph on the stand-in with Qwen's real tokenizer (151,643 ranks, numbers digit by digit, real image
token counts): link, split, a few training steps, evaluate, deploy, then one `/analyze` through the service.

The stand-in's weights are random: it proves the token-dependent code paths, not quality (its answers do not
parse, so the gates reject it and the service answers with the base)."""

import json
import shutil

import dagster as dg
import pytest

from mondrian_assets.core.locations import Locations
from mondrian_assets.defs import deployment, evaluation, linking, splits, training
from mondrian_assets.defs.resources import MlxTrainer, MondrianDatabase
from mondrian_assets_tests.service_helpers import jpeg_bytes, launch_service

ASSETS = [linking.linked_records, splits.advisor_splits, training.lora_adapter, evaluation.eval_report,
          deployment.deployed_version]  # fmt: skip
ADVISOR = "watkins"  # the demo's smallest advisor with a validation set: 10 train / 2 val examples
RUN_CONFIG = {"ops": {
    "lora_adapter": {"config": {"min_train_examples": 5, "smoke_test_tokens": 8}},
    "eval_report": {"config": {"max_examples": 2, "max_tokens": 48, "overhead_repeats": 2, "overhead_tokens": 8}},
}}  # fmt: skip


@pytest.mark.slow
def test_every_stage_runs_on_the_qwen_vocabulary_base_and_names_it(pristine_demo, qwen_vocab_base, tmp_path):
    shutil.copytree(pristine_demo.app_dir, tmp_path / "app")
    loc = Locations.resolve(app_dir=str(tmp_path / "app"), home=str(tmp_path / "home"), environ={})
    trainer = MlxTrainer(base_model=str(qwen_vocab_base), iters=2, eval_interval=2, save_interval=2, warmup_steps=1)
    resources = {"mondrian_db": MondrianDatabase(app_dir=str(loc.app_dir), home=str(loc.home)), "mlx_trainer": trainer}
    with dg.instance_for_test() as instance:
        linked = dg.materialize(ASSETS, selection=["linked_records"], resources=resources, instance=instance)
        assert linked.success
        rest = dg.materialize(ASSETS, selection=["train_split", "val_split", "lora_adapter", "eval_report",
                                                 "deployed_version"], partition_key=ADVISOR, resources=resources,
                              instance=instance, run_config=RUN_CONFIG, raise_on_error=False)  # fmt: skip
    assert rest.success, [e.message for e in rest.all_events if e.is_failure]
    adapter = rest.asset_materializations_for_node("lora_adapter")[0].metadata
    assert adapter["steps"].value == 2 and str(qwen_vocab_base) in adapter["base_model"].value

    report = json.loads((loc.evaluation / ADVISOR / "comparison_report.json").read_text())
    assert report["base_model"] == str(qwen_vocab_base)
    assert "each value's tokens looked ahead" in report["settings"]["decoding"]
    constrained = report["metrics"]["constrained_decoding"]  # the 2-step adapter under the mask: every answer valid
    assert constrained["valid_constrained"] == constrained["examples"] == 2 and constrained["cut_off"] == 0
    decision = rest.asset_materializations_for_node("deployed_version")[0].metadata
    assert decision["decision"].value == "reject"  # random weights: the format gate fails, as it should

    service = launch_service(loc.home, loc.app_dir, qwen_vocab_base, "--mode", "base", "--max-tokens", "600")
    try:
        assert service.health()["status"] == "UP"
        reply = service.post(jpeg_bytes(3, size=(800, 600)), advisor=ADVISOR, timeout=300)
    finally:
        service.stop()
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["model"] == qwen_vocab_base.name and body["model_used"] == "base" and body["prompt"]
    assert "each value's tokens looked ahead" in body["decoding"]  # the service decodes scores as evaluation does
    assert body["score_values_by_rule"] == body["full_response"].count('score":')  # every value it wrote, by rule
