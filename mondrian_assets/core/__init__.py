"""Dagster-free domain logic: nothing in this package imports dagster."""
