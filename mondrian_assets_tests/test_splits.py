import json
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
from PIL import Image

from mondrian_assets.core.data import splits
from mondrian_assets.core.data.split_checks import check_written_split
from mondrian_assets.core.schema import DEFAULT_INSTRUCTION, canonical_json, parse_analysis
from mondrian_assets.defs import linking
from mondrian_assets.defs import splits as split_defs
from mondrian_assets.defs.partitions import ADVISOR_PARTITIONS_NAME
from mondrian_assets.demo.app import append_demo_jobs
from mondrian_assets.run_outcome import read_outcome
from helpers import materialize_partition, step_events

ASSETS = [linking.linked_records, split_defs.advisor_splits]


def materialize_link(mondrian_db, instance) -> dg.ExecuteInProcessResult:
    result = dg.materialize([linking.linked_records], resources={"mondrian_db": mondrian_db}, instance=instance)
    assert result.success
    return result


def materialize_split(mondrian_db, instance, advisor: str, trainer) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        ASSETS,
        selection=["train_split", "val_split"],
        partition_key=advisor,
        resources={"mondrian_db": mondrian_db, "mlx_trainer": trainer},
        instance=instance,
    )


def sides(locations, advisor: str) -> dict[str, str]:
    return json.loads(splits.split_files(locations.training_data, advisor).meta_json.read_text())["sides"]


def test_split_materializes_files_checks_and_metadata(locations, mondrian_db, trainer, instance):
    materialize_link(mondrian_db, instance)
    result = materialize_split(mondrian_db, instance, "ansel", trainer)
    assert result.success
    files = splits.split_files(locations.training_data, "ansel")
    train = json.loads(files.train_json.read_text())
    val = json.loads(files.val_json.read_text())
    assert len(train) > 50 and 8 <= len(val) <= 30
    assert {"image_path", "prompt", "response"} <= set(train[0])

    row = json.loads(files.train_jsonl.read_text().splitlines()[0])
    assert row["messages"][0]["content"][0] == {"type": "image"}  # image first, then the text, as the app sends
    prompt = row["messages"][0]["content"][1]["text"]
    assert prompt.endswith(DEFAULT_INSTRUCTION) and "Ansel" in prompt  # the advisor's own prompt from the DB
    with Image.open(row["images"][0]) as img:
        assert max(img.size) <= 800 and img.mode == "RGB"

    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {"files_agree": True, "no_image_on_both_sides": True, "images_decode": True,
                      "texts_non_trivial": True, "responses_round_trip": True, "split_ratio": True}  # fmt: skip
    mats = {m.asset_key.to_user_string(): m for m in result.get_asset_materialization_events()}
    train_meta = mats["train_split"].materialization.metadata
    assert train_meta["count"].value == len(train) and "sample" in train_meta
    meta = json.loads(files.meta_json.read_text())
    assert meta["counts"] == {"train": len(train), "val": len(val), "total": len(train) + len(val)}
    assert meta["data_version"] == train_meta["data_version"].value
    # token lengths under the base model's own tokenizer, so max_seq_length can be checked before training
    assert 0 < meta["tokens"]["response"]["min"] <= meta["tokens"]["response"]["max"] < 1024


def test_adding_jobs_never_moves_an_old_example(locations, mondrian_db, trainer, instance):
    materialize_link(mondrian_db, instance)
    assert materialize_split(mondrian_db, instance, "ansel", trainer).success
    before = sides(locations, "ansel")
    version_before = json.loads(splits.split_files(locations.training_data, "ansel").meta_json.read_text())["data_version"]

    append_demo_jobs(locations.app_dir, 20, seed=123)
    materialize_link(mondrian_db, instance)
    assert materialize_split(mondrian_db, instance, "ansel", trainer).success
    after = sides(locations, "ansel")
    assert len(after) == len(before) + 20
    assert all(after[image] == side for image, side in before.items())
    meta = json.loads(splits.split_files(locations.training_data, "ansel").meta_json.read_text())
    assert meta["data_version"] != version_before


def test_same_image_in_several_jobs_never_leaks(tmp_path):
    image = tmp_path / "a.png"
    Image.new("RGB", (64, 48), "gray").save(image)
    response = canonical_json(parse_analysis(json.dumps({
        "image_description": "Gray.", "overall_score": 5, "key_strengths": ["a"], "priority_improvements": ["b"],
        "technical_notes": "", "dimensions": [{"name": "Lighting", "score": 5, "comment": "c", "recommendation": "r"}],
    })).analysis)  # fmt: skip
    rows = [
        {"job_id": f"j{i}", "advisor": "ansel", "image_path": str(image), "image_sha256": f"{i % 7:064x}",
         "analysis_json": response, "overall_score": 5.0}
        for i in range(60)
    ]  # fmt: skip
    split = splits.split_advisor("ansel", pd.DataFrame(rows), "p", splits.SplitConfig(), tmp_path / "cache")
    train = {e.image_sha256 for e in split.train}
    val = {e.image_sha256 for e in split.val}
    assert not train & val


def test_hashing_holds_out_the_configured_share():
    fraction = 0.2
    hashes = [f"{i:064x}" for i in range(2000)]
    val_share = sum(splits.side_of(h, fraction) == "val" for h in hashes) / len(hashes)
    assert abs(val_share - fraction) < 0.03


def test_tiny_advisor_gets_no_validation_set(locations, mondrian_db, trainer, instance):
    materialize_link(mondrian_db, instance)
    result = materialize_split(mondrian_db, instance, "okeefe", trainer)
    assert result.success
    meta = json.loads(splits.split_files(locations.training_data, "okeefe").meta_json.read_text())
    assert meta["counts"] == {"train": 3, "val": 0, "total": 3}
    assert "no validation set" in meta["note"]
    val_meta = {m.asset_key.to_user_string(): m for m in result.get_asset_materialization_events()}["val_split"]
    assert "no validation set" in val_meta.materialization.metadata["note"].value


def test_new_advisor_becomes_a_partition(locations, mondrian_db, trainer, instance):
    materialize_link(mondrian_db, instance)
    assert "gilpin" not in instance.get_dynamic_partitions(ADVISOR_PARTITIONS_NAME)
    append_demo_jobs(locations.app_dir, 6, seed=5, advisor="gilpin")
    materialize_link(mondrian_db, instance)
    assert "gilpin" in instance.get_dynamic_partitions(ADVISOR_PARTITIONS_NAME)
    assert materialize_split(mondrian_db, instance, "gilpin", trainer).success


def failed_checks(files: splits.SplitFiles) -> set[str]:
    return {c.name for c in check_written_split(files, val_fraction=0.2, ratio_tolerance=0.15) if not c.passed}


def test_split_checks_read_the_written_files_and_catch_tampering(locations, mondrian_db, trainer, instance):
    materialize_link(mondrian_db, instance)
    assert materialize_split(mondrian_db, instance, "weston", trainer).success
    files = splits.split_files(locations.training_data, "weston")
    assert failed_checks(files) == set()
    pristine = {path: path.read_bytes() for path in (files.train_jsonl, files.val_jsonl, files.train_json)}

    val_row = files.val_jsonl.read_text().splitlines()[0]
    files.train_jsonl.write_text(files.train_jsonl.read_text() + val_row + "\n")  # a validation photo leaks in
    assert failed_checks(files) == {"files_agree", "no_image_on_both_sides"}
    files.train_jsonl.write_bytes(pristine[files.train_jsonl])

    rows = json.loads(files.train_json.read_text())
    rows[0]["response"] = rows[0]["response"].replace('"overall_score":', '"overall_score" :')  # not canonical
    files.train_json.write_text(json.dumps(rows))
    lines = files.train_jsonl.read_text().splitlines()
    record = json.loads(lines[0])
    record["messages"][1]["content"][0]["text"] = rows[0]["response"]
    files.train_jsonl.write_text("\n".join([json.dumps(record), *lines[1:]]) + "\n")
    assert failed_checks(files) == {"responses_round_trip"}
    for path, data in pristine.items():
        path.write_bytes(data)

    image = Path(json.loads(files.val_jsonl.read_text().splitlines()[0])["images"][0])
    image.write_bytes(image.read_bytes()[:200])  # a truncated prepared image
    assert failed_checks(files) == {"images_decode"}
    files.val_jsonl.write_text(files.val_jsonl.read_text()[:-40])  # a half-written file
    assert "files_agree" in failed_checks(files)


def test_a_failing_split_check_stops_training(locations, mondrian_db, trainer, instance):
    materialize_link(mondrian_db, instance)
    result = materialize_partition(
        ["train_split", "val_split", "lora_adapter"], "weston", {"mondrian_db": mondrian_db, "mlx_trainer": trainer},
        instance, run_config={"ops": {"advisor_splits": {"config": {"min_text_chars": 100_000}}}},
    )  # fmt: skip
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks["texts_non_trivial"] is False
    assert "STEP_START" not in step_events(result, "lora_adapter")
    assert not (locations.models / "adapters" / "weston").exists()
    # read back from the instance as the CLI reads it: a verdict, though the checks ran in the advisor_splits step
    outcome = read_outcome(instance, result.run_id)
    assert outcome.status == "gated" and outcome.errors == []
    assert [(g.check, g.stops_downstream) for g in outcome.failed_gates] == [("texts_non_trivial", True)]


def test_a_lumpy_split_ratio_warns_and_stops_nothing(mondrian_db, trainer, instance):
    materialize_link(mondrian_db, instance)
    result = materialize_partition(
        ["train_split", "val_split"], "weston", {"mondrian_db": mondrian_db, "mlx_trainer": trainer}, instance,
        run_config={"ops": {"advisor_splits": {"config": {"ratio_tolerance": 0.0}}}},
    )  # fmt: skip
    outcome = read_outcome(instance, result.run_id)
    assert [(g.check, g.stops_downstream) for g in outcome.failed_gates] == [("split_ratio", False)]
    assert outcome.errors == []


def test_invalid_fraction_is_a_clear_error():
    with pytest.raises(ValueError, match="val_fraction"):
        splits.SplitConfig(val_fraction=1.5)
