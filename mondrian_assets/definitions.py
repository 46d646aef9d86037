"""The code location: wires the thin modules of defs/ together, nothing else."""

import dagster as dg

from mondrian_assets.defs import deployment, evaluation, jobs, linking, splits, training
from mondrian_assets.defs.resources import MlxTrainer, MondrianDatabase

defs = dg.Definitions(
    assets=[linking.linked_records, splits.advisor_splits, training.lora_adapter, evaluation.eval_report,
            deployment.deployed_version],
    asset_checks=[linking.enough_examples_per_advisor, linking.no_duplicate_images, linking.linked_paths_exist],
    jobs=[jobs.link_job, jobs.split_job, jobs.train_job, jobs.advisor_job, deployment.rollback_job, deployment.pin_job],
    resources={"mondrian_db": MondrianDatabase(), "mlx_trainer": MlxTrainer()},
)
