"""The model registry: versions, the active pointer, deploy decisions, rollback and pin (no Dagster import)."""
