"""The persistent Dagster instance the command line runs against, and what `status` says about it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from mondrian_assets.core.locations import Locations

# The instance settings ./dev starts DAGSTER_HOME with (not at the root: Dagster warns about a dagster.yaml in the
# working directory that is not DAGSTER_HOME's).
INSTANCE_TEMPLATE = Path(__file__).resolve().parent.parent / "dagster_home" / "dagster.yaml"


def instance_home(loc: Locations) -> Path:
    return Path(os.environ.get("DAGSTER_HOME") or loc.home / ".dagster")


def project_instance(loc: Locations):
    """The persistent instance in DAGSTER_HOME (default <home>/.dagster), set up with the project's dagster.yaml
    (concurrency limits, run monitoring) unless that folder already has its own."""
    import dagster as dg

    home = instance_home(loc)
    os.environ["DAGSTER_HOME"] = str(home)
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists():
        shutil.copyfile(INSTANCE_TEMPLATE, home / "dagster.yaml")
    return dg.DagsterInstance.get()


def instance_report(loc: Locations) -> list[str]:
    """For `status`: what the instance's repair did just now (runs whose worker died, slots they held, slots a
    killed demo lent), then who holds or waits for the MLX pool. Empty when no instance was made here yet."""
    if not (instance_home(loc) / "dagster.yaml").exists():
        return []
    from mondrian_assets.defs.run_workers import MLX_POOL, pool_holders, repair_instance

    instance = project_instance(loc)
    lines = [f"repaired: {line}" for line in repair_instance(instance)]
    info = instance.event_log_storage.get_concurrency_info(MLX_POOL)
    holders = pool_holders(instance)
    held = sum(h.claimed for h in holders)
    limit = f"{info.limit} (the instance's default)" if info.using_default_limit else f"{info.limit} (set)"
    lines.append(f"pool {MLX_POOL}: limit {limit}, {held} slot(s) held, {len(holders) - held} step(s) waiting")
    for h in holders:
        lines.append(f"  {'holds' if h.claimed else 'waits'}: run {h.run_id[:8]} {h.step_key}: {h.state}")
    return lines
