"""Jobs: link the app's data; per advisor partition, split and train (or everything downstream of linking)."""

import dagster as dg

link_job = dg.define_asset_job(
    "link_job", selection=dg.AssetSelection.assets("linked_records"),
    description="Re-read the app's DB and link new jobs (incremental).",
)  # fmt: skip
split_job = dg.define_asset_job(
    "split_job", selection=dg.AssetSelection.assets("train_split", "val_split"),
    description="Build one advisor's train/val split.",
)  # fmt: skip
# The data and model groups keep the nightly re-check (group monitoring, downstream of deployed_version) out of a
# training run.
_LOOP = dg.AssetSelection.groups("data", "model")
train_job = dg.define_asset_job(
    "train_job", selection=dg.AssetSelection.assets("lora_adapter").downstream() & _LOOP,
    description="Train one advisor's adapter and everything after it, on its current split.",
)  # fmt: skip
advisor_job = dg.define_asset_job(
    "advisor_job",
    selection=(dg.AssetSelection.assets("linked_records").downstream() & _LOOP) - dg.AssetSelection.assets("linked_records"),
    description="Build one advisor's splits and everything after them.",
)
# Linking is unpartitioned (all advisors at once, incremental) and the rest is partitioned by advisor; Dagster runs
# such a job with a partition key: linked_records materializes whole, everything after it for that advisor only.
retrain_job = dg.define_asset_job(
    "retrain_job",
    selection=dg.AssetSelection.assets("linked_records").downstream() & _LOOP,
    description="One advisor's whole loop: link the new jobs, split, train, evaluate, deploy. The retrain sensor's job.",
)
