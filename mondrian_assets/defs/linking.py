"""`linked_records`: every finished job joined to its image and analysis, with a reason for each rejected row."""


import os
import time

import dagster as dg
import pandas as pd
from pydantic import Field

from mondrian_assets.core.data import linker
from mondrian_assets.core.data.link_cache import LinkStore
from mondrian_assets.defs.partitions import ADVISOR_PARTITIONS_NAME
from mondrian_assets.defs.resources import MondrianDatabase

CODE_VERSION = "1"  # bump when linking changes which jobs link or what a linked record holds
PLAN_MIN_EXAMPLES = 60  # the LoRA plan's floor for a useful advisor dataset


class LinkConfig(dg.Config):
    workers: int = Field(default=4, description="Threads that hash and decode new images.")
    use_cache: bool = Field(default=True, description="Read only what changed since the last link (and reuse facts "
                            "about unchanged files); off: read everything and remember nothing.")
    full: bool = Field(default=False, description="Re-read every job and file, e.g. after editing a finished job's "
                       "row in the app's DB in place (the one change an incremental link cannot see).")
    recover_html_cards: bool = Field(
        default=True,
        description="Recover the older app's HTML analysis cards (every dimension score and the overall grade) "
        "where a job has no JSON analysis; off: such jobs are skipped as analysis_html_card_not_recovered.",
    )


def _counts_table(counts: dict[str, int], key: str) -> dg.TableMetadataValue:
    return dg.MetadataValue.table(
        [dg.TableRecord({key: k, "count": v}) for k, v in counts.items()],
        schema=dg.TableSchema([dg.TableColumn(key, "string"), dg.TableColumn("count", "int")]),
    )


@dg.asset(group_name="data", kinds={"sqlite", "pandas"}, code_version=CODE_VERSION)
def linked_records(
    context: dg.AssetExecutionContext, config: LinkConfig, mondrian_db: MondrianDatabase
) -> dg.Output[pd.DataFrame]:
    """Finished jobs from the app's DB linked to an image that decodes and an analysis that validates against
    the canonical schema, one per (advisor, image content). Writes training_data/training_data_manifest.json."""
    loc = mondrian_db.locations()
    started = time.perf_counter()
    store = LinkStore(mondrian_db.state_engine()) if config.use_cache else None
    with mondrian_db.app_connection() as conn:
        result = linker.link(conn, loc, store, workers=config.workers, full=config.full,
                             recover_html_cards=config.recover_html_cards)
    context.log.info(f"read {result.jobs_read} new or changed jobs from {loc.db_path}, "
                     f"{result.files_changed} changed files")  # fmt: skip
    context.log.info(linker.summary_text(linker.write_manifest(result, loc)))

    advisors = sorted(result.advisor_counts())
    new = [a for a in advisors if not context.instance.has_dynamic_partition(ADVISOR_PARTITIONS_NAME, a)]
    if new:
        context.instance.add_dynamic_partitions(ADVISOR_PARTITIONS_NAME, new)
        context.log.info(f"new advisor partitions: {', '.join(new)}")

    preview = result.records.drop(columns=["analysis_json"]).head(20)
    return dg.Output(
        result.records,
        metadata={
            "linked": len(result.records),
            "skipped": len(result.skips),
            "jobs_read": result.jobs_read,
            "files_changed": result.files_changed,
            "linked_per_advisor": _counts_table(result.advisor_counts(), "advisor"),
            "skipped_per_reason": _counts_table(result.skip_counts(), "reason"),
            "preview": dg.MetadataValue.md(preview.to_markdown(index=False) if len(preview) else "(none)"),
            "manifest": dg.MetadataValue.path(str(loc.manifest_path)),
            "cache_hits": result.cache_hits,
            "cache_misses": result.cache_misses,
            "new_partitions": ", ".join(new) or "none",
            "duration_s": round(time.perf_counter() - started, 2),
        },
    )


@dg.asset_check(asset=linked_records, description=f"Each advisor has at least {PLAN_MIN_EXAMPLES} examples (the plan's floor).")
def enough_examples_per_advisor(linked_records: pd.DataFrame) -> dg.AssetCheckResult:
    counts = linked_records["advisor"].value_counts().to_dict()
    short = {a: int(n) for a, n in counts.items() if n < PLAN_MIN_EXAMPLES}
    return dg.AssetCheckResult(
        passed=not short,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"below_minimum": ", ".join(f"{a} ({n})" for a, n in sorted(short.items())) or "none", "minimum": PLAN_MIN_EXAMPLES},
    )


@dg.asset_check(asset=linked_records, blocking=True, description="No image content appears twice for one advisor.")
def no_duplicate_images(linked_records: pd.DataFrame) -> dg.AssetCheckResult:
    dupes = linked_records[linked_records.duplicated(["advisor", "image_sha256"], keep=False)]
    return dg.AssetCheckResult(passed=dupes.empty, metadata={"duplicate_rows": len(dupes)})


@dg.asset_check(asset=linked_records, blocking=True, description="Every linked image and analysis file exists.")
def linked_paths_exist(linked_records: pd.DataFrame) -> dg.AssetCheckResult:
    paths = list(linked_records["image_path"]) + list(linked_records["analysis_path"].dropna())
    missing = [p for p in paths if not os.path.exists(p)]
    return dg.AssetCheckResult(passed=not missing, metadata={"checked": len(paths), "missing": len(missing), "first_missing": missing[0] if missing else "none"})
