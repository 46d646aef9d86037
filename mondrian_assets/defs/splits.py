"""`train_split` / `val_split`: per-advisor, leak-free, stable training data built from the app's own prompts."""


import json
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pandas as pd
from PIL import Image
from pydantic import Field

from mondrian_assets.core.data import app_db, splits
from mondrian_assets.core.data.images import APP_MAX_SIDE
from mondrian_assets.core.schema import build_prompt, canonical_json, parse_analysis
from mondrian_assets.defs.partitions import advisor_partitions
from mondrian_assets.defs.resources import MlxTrainer, MondrianDatabase

MIN_TEXT_CHARS = 100  # the plan's bar for a non-trivial prompt and response


class SplitRunConfig(dg.Config):
    val_fraction: float = Field(default=0.2, description="Share of images (by content hash) held out for validation.")
    min_examples_for_val: int = Field(default=splits.MIN_EXAMPLES_FOR_VAL, description="Below this, no val set.")
    max_image_side: int = Field(default=APP_MAX_SIDE, description="Images are resized as the app does before inference.")
    instruction: str | None = Field(default=None, description="Instruction after the app's prompts; default: the built-in one.")
    ratio_tolerance: float = Field(default=0.15, description="Allowed gap between the wanted and the actual val share.")


def _split_value(files: splits.SplitFiles, split: splits.AdvisorSplit, side: str) -> dict:
    examples = split.train if side == "train" else split.val
    return {
        "advisor": split.advisor,
        "side": side,
        "count": len(examples),
        "data_version": split.data_version,
        "jsonl": str(files.train_jsonl if side == "train" else files.val_jsonl),
        "json": str(files.train_json if side == "train" else files.val_json),
        "meta": str(files.meta_json),
        "note": split.note,
    }


def _sample_row(examples: list[splits.Example]) -> dg.MetadataValue:
    if not examples:
        return dg.MetadataValue.md("(empty)")
    e = examples[0]
    return dg.MetadataValue.md(
        f"**job** `{e.job_id}`  \n**image** `{e.image_path}`\n\n**prompt**\n```\n{e.prompt}\n```\n**response**\n```json\n{e.response}\n```"
    )


CHECKS = [
    dg.AssetCheckSpec("no_image_on_both_sides", asset="val_split", blocking=True,
                      description="No image content hash is in both train and val."),
    dg.AssetCheckSpec("images_decode", asset="train_split", blocking=True,
                      description="Every prepared image in both splits exists and decodes."),
    dg.AssetCheckSpec("texts_non_trivial", asset="train_split", blocking=True,
                      description=f"Every prompt and response is longer than {MIN_TEXT_CHARS} characters."),
    dg.AssetCheckSpec("responses_round_trip", asset="train_split", blocking=True,
                      description="Every response parses back to the canonical schema and re-serializes identically."),
    dg.AssetCheckSpec("split_ratio", asset="val_split",
                      description="The val share is near the configured fraction (warns only: hashing is lumpy on few images)."),
]  # fmt: skip


def _check_results(split: splits.AdvisorSplit, files: splits.SplitFiles, cfg: SplitRunConfig) -> Iterator[dg.AssetCheckResult]:
    """Checks read the files as written, so they vouch for what training will read."""
    rows = {
        side: [json.loads(line) for line in path.read_text().splitlines()]
        for side, path in (("train", files.train_jsonl), ("val", files.val_jsonl))
    }
    train_hashes, val_hashes = {e.image_sha256 for e in split.train}, {e.image_sha256 for e in split.val}
    leaked = train_hashes & val_hashes
    yield dg.AssetCheckResult(check_name="no_image_on_both_sides", asset_key="val_split", passed=not leaked,
                              metadata={"shared_images": len(leaked)})

    bad_images = []
    for row in rows["train"] + rows["val"]:
        try:
            with Image.open(row["images"][0]) as img:
                img.load()
        except OSError as exc:
            bad_images.append(f"{row['images'][0]}: {exc}")
    yield dg.AssetCheckResult(check_name="images_decode", asset_key="train_split", passed=not bad_images,
                              metadata={"checked": len(rows["train"]) + len(rows["val"]), "failed": len(bad_images),
                                        "first_failure": bad_images[0] if bad_images else "none"})

    def texts(row: dict) -> tuple[str, str]:
        user, assistant = row["messages"][0], row["messages"][1]
        return user["content"][-1]["text"], assistant["content"][0]["text"]

    pairs = [texts(r) for r in rows["train"] + rows["val"]]
    short = sum(1 for p, r in pairs if len(p) <= MIN_TEXT_CHARS or len(r) <= MIN_TEXT_CHARS)
    yield dg.AssetCheckResult(check_name="texts_non_trivial", asset_key="train_split", passed=short == 0 and bool(pairs),
                              metadata={"too_short": short, "examples": len(pairs)})

    broken = 0
    for _, response in pairs:
        parsed = parse_analysis(response)
        broken += not (parsed.ok and parsed.analysis is not None and canonical_json(parsed.analysis) == response)
    yield dg.AssetCheckResult(check_name="responses_round_trip", asset_key="train_split", passed=broken == 0,
                              metadata={"not_round_tripping": broken})

    total = len(split.train) + len(split.val)
    actual = len(split.val) / total if total else 0.0
    within = not split.has_val or abs(actual - cfg.val_fraction) <= cfg.ratio_tolerance
    yield dg.AssetCheckResult(check_name="split_ratio", asset_key="val_split", passed=within,
                              severity=dg.AssetCheckSeverity.WARN,
                              metadata={"val_share": round(actual, 3), "wanted": cfg.val_fraction, "note": split.note or "ok"})  # fmt: skip


@dg.multi_asset(
    outs={
        "train_split": dg.AssetOut(group_name="data", description="Per-advisor training examples (JSON + mlx-vlm JSONL)."),
        "val_split": dg.AssetOut(group_name="data", description="Per-advisor validation examples, stable across retrains."),
    },
    partitions_def=advisor_partitions,
    check_specs=CHECKS,
)
def advisor_splits(
    context: dg.AssetExecutionContext, config: SplitRunConfig, mondrian_db: MondrianDatabase, mlx_trainer: MlxTrainer,
    linked_records: pd.DataFrame,
) -> Iterator[dg.Output | dg.AssetCheckResult]:
    """Split one advisor's linked records by image content hash; the prompt is the app's own (system prompt,
    then the advisor's prompt, then the instruction), the response the canonical JSON of the analysis."""
    advisor = context.partition_key
    loc = mondrian_db.locations()
    with mondrian_db.app_connection() as conn:
        system_prompt = app_db.read_system_prompt(conn)
        advisor_row = app_db.read_advisors(conn).get(advisor)
    if advisor_row is None or not advisor_row.prompt:
        context.log.warning(f"advisor {advisor!r} has no prompt in the app's `advisors` table; using the system prompt alone")
    prompt = build_prompt(system_prompt, advisor_row.prompt if advisor_row else None, config.instruction)
    split_config = splits.SplitConfig(config.val_fraction, config.min_examples_for_val, config.max_image_side)
    split = splits.split_advisor(advisor, linked_records, prompt, split_config, loc.training_data / "images")
    base = Path(mlx_trainer.resolved_base_model(loc.models))
    files = splits.write_split(split, split_config, loc.training_data, base / "tokenizer.json")
    context.log.info(f"{advisor}: {len(split.train)} train / {len(split.val)} val, data version {split.data_version}"
                     + (f" ({split.note})" if split.note else ""))

    meta = json.loads(files.meta_json.read_text())
    for side, examples in (("train", split.train), ("val", split.val)):
        value = _split_value(files, split, side)
        yield dg.Output(
            value,
            output_name=f"{side}_split",
            data_version=dg.DataVersion(split.data_version),
            metadata={
                "count": len(examples),
                "data_version": split.data_version,
                "score_mean": meta["score_distribution"][side].get("mean", 0.0),
                "response_tokens_max": meta["tokens"]["response"].get("max", -1),
                "note": split.note or "ok",
                "jsonl": dg.MetadataValue.path(value["jsonl"]),
                "sample": _sample_row(examples),
            },
        )
    yield from _check_results(split, files, config)

