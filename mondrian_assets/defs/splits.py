"""`train_split` / `val_split`: per-advisor, leak-free, stable training data built from the app's own prompts."""


import json
from collections.abc import Iterator

import dagster as dg
import pandas as pd
from pydantic import Field

from mondrian_assets.core.base_model import BaseModelError
from mondrian_assets.core.data import app_db, splits
from mondrian_assets.core.data.images import APP_MAX_SIDE
from mondrian_assets.core.data.split_checks import MIN_TEXT_CHARS, check_written_split
from mondrian_assets.core.schema import build_prompt
from mondrian_assets.defs.partitions import advisor_partitions
from mondrian_assets.defs.resources import MlxTrainer, MondrianDatabase

CODE_VERSION = "1"  # bump when splitting changes which side an example lands on, its prompt, response or image


class SplitRunConfig(dg.Config):
    val_fraction: float = Field(default=0.2, gt=0, lt=1,
                                description="Share of images (by content hash) held out for validation.")
    min_examples_for_val: int = Field(default=splits.MIN_EXAMPLES_FOR_VAL, ge=2, description="Below this, no val set.")
    max_image_side: int = Field(default=APP_MAX_SIDE, ge=28,
                                description="Images are resized as the app does before inference.")
    instruction: str | None = Field(default=None,
                                    description="Instruction after the app's prompts; default: the built-in one.")
    ratio_tolerance: float = Field(default=0.15, ge=0, le=1,
                                   description="Allowed gap between the wanted and the actual val share.")
    min_text_chars: int = Field(default=MIN_TEXT_CHARS, ge=0,
                                description="A prompt or response this short or shorter fails texts_non_trivial.")  # fmt: skip


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
    dg.AssetCheckSpec("files_agree", asset="train_split", blocking=True,
                      description="The JSON, JSONL and meta files as written describe the same examples."),
    dg.AssetCheckSpec("no_image_on_both_sides", asset="val_split", blocking=True,
                      description="No prepared image file (by content) is in both train.jsonl and valid.jsonl."),
    dg.AssetCheckSpec("images_decode", asset="train_split", blocking=True,
                      description="Every prepared image in both splits exists and decodes."),
    dg.AssetCheckSpec("texts_non_trivial", asset="train_split", blocking=True,
                      description="Every prompt and response is longer than min_text_chars (the plan's 100)."),
    dg.AssetCheckSpec("responses_round_trip", asset="train_split", blocking=True,
                      description="Every response parses back to the canonical schema and re-serializes identically."),
    dg.AssetCheckSpec("split_ratio", asset="val_split",
                      description="The val share is near the configured fraction (warns only: hashing is lumpy on few images)."),
]  # fmt: skip


_ASSET_OF_CHECK = {"files_agree": "train_split", "no_image_on_both_sides": "val_split", "images_decode": "train_split",
                   "texts_non_trivial": "train_split", "responses_round_trip": "train_split", "split_ratio": "val_split"}  # fmt: skip


def _check_results(files: splits.SplitFiles, cfg: SplitRunConfig) -> Iterator[dg.AssetCheckResult]:
    """Checks read the files as written, so they vouch for what training will read."""
    for check in check_written_split(files, val_fraction=cfg.val_fraction, ratio_tolerance=cfg.ratio_tolerance,
                                     min_text_chars=cfg.min_text_chars):  # fmt: skip
        severity = dg.AssetCheckSeverity.WARN if check.name == "split_ratio" else dg.AssetCheckSeverity.ERROR
        yield dg.AssetCheckResult(check_name=check.name, asset_key=_ASSET_OF_CHECK[check.name], passed=check.passed,
                                  severity=severity, metadata=check.metadata)  # fmt: skip


@dg.multi_asset(
    outs={
        "train_split": dg.AssetOut(group_name="data", code_version=CODE_VERSION,
                                   description="Per-advisor training examples (JSON + mlx-vlm JSONL)."),
        "val_split": dg.AssetOut(group_name="data", code_version=CODE_VERSION,
                                 description="Per-advisor validation examples, stable across retrains."),
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
    try:
        tokenizer_json = mlx_trainer.resolved_base(loc.models).path / "tokenizer.json"
    except BaseModelError as exc:  # token counts are a nicety here; lora_adapter refuses the base with this reason
        context.log.warning(f"no token counts in the split meta: {exc}")
        tokenizer_json = None
    files = splits.write_split(split, split_config, loc.training_data, tokenizer_json)
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
    yield from _check_results(files, config)

