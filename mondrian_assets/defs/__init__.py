"""The Dagster layer: thin definitions over mondrian_assets.core."""
