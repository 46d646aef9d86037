"""Jobs: link the app's data, and (per advisor partition) everything downstream of it."""

import dagster as dg

link_job = dg.define_asset_job("link_job", selection=dg.AssetSelection.assets("linked_records"),
                               description="Re-read the app's DB and link new jobs (incremental).")
advisor_job = dg.define_asset_job(
    "advisor_job",
    selection=dg.AssetSelection.assets("linked_records").downstream() - dg.AssetSelection.assets("linked_records"),
    description="Build one advisor's splits and everything after them.",
)
