"""The code location: wires the thin modules of defs/ together, nothing else."""

import dagster as dg

from mondrian_assets.defs import deployment, evaluation, jobs, linking, nightly, schedules, sensors, splits, training
from mondrian_assets.defs.executor import repairing_in_process_executor
from mondrian_assets.defs.resources import AlertWebhook, MlxTrainer, MondrianDatabase, RetrainSettings

defs = dg.Definitions(
    assets=[linking.linked_records, splits.advisor_splits, training.lora_adapter, evaluation.eval_report,
            deployment.deployed_version, nightly.active_version_evaluation],
    asset_checks=[linking.enough_examples_per_advisor, linking.no_duplicate_images, linking.linked_paths_exist],
    jobs=[jobs.link_job, jobs.split_job, jobs.train_job, jobs.advisor_job, jobs.retrain_job, deployment.rollback_job,
          deployment.pin_job, nightly.nightly_evaluation_job],
    schedules=[schedules.nightly_evaluation_schedule],
    sensors=[sensors.retrain_sensor],
    resources={"mondrian_db": MondrianDatabase(), "mlx_trainer": MlxTrainer(), "alert_webhook": AlertWebhook(),
               "retrain_settings": RetrainSettings()},
    executor=repairing_in_process_executor,
)
