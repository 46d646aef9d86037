"""The code location: wires the thin modules of defs/ together, nothing else."""

import dagster as dg

from mondrian_assets.defs import jobs, linking, splits
from mondrian_assets.defs.resources import MondrianDatabase

defs = dg.Definitions(
    assets=[linking.linked_records, splits.advisor_splits],
    asset_checks=[linking.enough_examples_per_advisor, linking.no_duplicate_images, linking.linked_paths_exist],
    jobs=[jobs.link_job, jobs.advisor_job],
    resources={"mondrian_db": MondrianDatabase()},
)
