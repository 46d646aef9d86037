"""The registry's commands of `mondrian-assets`: status, versions, rollback, pin, unpin.

They call the same core functions as `deployed_version`, `rollback_job` and `pin_job`, on the state DB and
models/ under MONDRIAN_HOME; every action is recorded in the `deployments` table with the user as its actor.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Callable

import sqlalchemy as sa

from mondrian_assets.core.locations import Locations


def _registry(args: argparse.Namespace) -> tuple[sa.Engine, Locations]:
    from mondrian_assets.core.state_db import state_engine

    loc = Locations.resolve(home=args.home)
    return state_engine(loc.state_db), loc


def _actor() -> str:
    return f"cli:{getpass.getuser()}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in [header, *rows])


def _name(version) -> str:
    return version.name if version is not None else "-"


def cmd_status(args: argparse.Namespace) -> int:
    from mondrian_assets.core.registry.recheck import last_recheck
    from mondrian_assets.core.registry.status import registry_status

    engine, loc = _registry(args)
    _print_instance(loc)
    statuses = [s for s in registry_status(engine, loc.models) if not args.advisor or s.advisor in args.advisor]
    if not statuses:
        print(f"no versions registered under {loc.models} yet (run the main job: ./dev demo)")
        return 0
    rows, regressed = [], []
    for s in statuses:
        last = s.last_decision
        decision = f"{last.action} v{last.to_version} at {last.at} by {last.actor}: {'; '.join(last.reasons)}" if last else "-"
        recheck = last_recheck(engine, s.advisor)
        nightly = f"{'passed' if recheck.passed else 'FAILED'} v{recheck.version} at {recheck.evaluated_at}" if recheck else "-"
        if recheck is not None and not recheck.passed:
            regressed.append(f"nightly re-check FAILED: {s.advisor}-v{recheck.version} at {recheck.evaluated_at}: "
                             + "; ".join(recheck.reasons) + f" (report: {recheck.report})")  # fmt: skip
        rows.append([s.advisor, str(len(s.versions)), _name(s.active), _name(s.pinned), _name(s.previous),
                     s.last_evaluation or "-", nightly, decision])  # fmt: skip
    print(_table(["advisor", "versions", "active", "pinned", "previous", "last evaluation", "nightly check",
                  "last decision"], rows))  # fmt: skip
    for line in regressed:
        print(line)
    for s in statuses:
        if s.pointer_repaired:
            print(f"repaired {loc.models / (s.advisor + '-active')} -> {s.pointer or '(removed)'} to match the registry")
    missing = [s.active for s in statuses if s.active is not None and not (s.active.path / "adapters.safetensors").is_file()]
    for version in missing:  # deleted by hand: the service cannot load it, the nightly re-check cannot run
        print(f"{version.name} is active but its files are gone ({version.path}): roll back with "
              f"`mondrian-assets rollback --advisor {version.advisor} --to N`, or retrain")  # fmt: skip
    _print_serving(engine)
    return 1 if missing else 0


def _print_instance(loc: Locations) -> None:
    """The Dagster instance's runs and MLX pool: dead runs failed and slots freed just now, who holds the pool."""
    from mondrian_assets.project_instance import instance_report

    if lines := instance_report(loc):
        print("\n".join(lines) + "\n")


def _print_serving(engine: sa.Engine) -> None:
    """What the advisor service served (the `usage` command's report), when it served anything."""
    from mondrian_assets.core.serving.usage import serving_summary, summary_text

    summary = serving_summary(engine)
    if summary.total.requests:
        print("\n" + summary_text(summary))


def cmd_versions(args: argparse.Namespace) -> int:
    from mondrian_assets.core.registry.versions import list_versions

    engine, _ = _registry(args)
    versions = list_versions(engine, args.advisor)
    if not versions:
        print(f"{args.advisor}: no versions registered")
        return 0
    rows = [[str(v.number), v.status, "pinned" if v.pinned else "", "passed" if v.gates_passed else "failed",
             v.created_at, v.content_hash[:12], v.data_version, "pruned" if v.pruned_at else str(v.path)]
            for v in versions]  # fmt: skip
    print(_table(["version", "status", "pin", "gates", "created", "content", "data version", "files"], rows))
    return 0


def _act(action: Callable[[], object], done: Callable[[object], str]) -> int:
    from mondrian_assets.core.registry.versions import RegistryError

    try:
        result = action()
    except RegistryError as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 2
    print(done(result))
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from mondrian_assets.core.registry.decisions import rollback

    engine, loc = _registry(args)
    return _act(lambda: rollback(engine, loc.models, args.advisor, to=args.to, actor=_actor()),
                lambda v: f"{args.advisor}: {v.name} is active; {loc.models / (args.advisor + '-active')} -> {v.path}")  # fmt: skip


def cmd_pin(args: argparse.Namespace) -> int:
    from mondrian_assets.core.registry.decisions import pin

    engine, loc = _registry(args)
    return _act(lambda: pin(engine, loc.models, args.advisor, number=args.version, actor=_actor()),
                lambda v: f"{args.advisor}: pinned {v.name} (active); new candidates are recorded, not promoted")  # fmt: skip


def cmd_unpin(args: argparse.Namespace) -> int:
    from mondrian_assets.core.registry.decisions import unpin

    engine, loc = _registry(args)
    return _act(lambda: unpin(engine, loc.models, args.advisor, actor=_actor()),
                lambda v: f"{args.advisor}: unpinned {v.name}; it stays active until a better candidate arrives")  # fmt: skip


def decision_count(loc: Locations, advisor: str) -> int:
    from mondrian_assets.core.registry.versions import deployments
    from mondrian_assets.core.state_db import state_engine

    return len(deployments(state_engine(loc.state_db), advisor))


def decision_since(loc: Locations, advisor: str, count_before: int) -> str:
    """What the deploy of a run decided, for the demo's summary: no new row means nothing changed."""
    from mondrian_assets.core.registry.versions import active_version, deployments
    from mondrian_assets.core.state_db import state_engine

    engine = state_engine(loc.state_db)
    history, active = deployments(engine, advisor), active_version(engine, advisor)
    now = f"active {active.name}" if active else "no active version"
    if len(history) == count_before:
        return f"unchanged, {now}"
    last = history[-1]
    verb = {"promote": "promoted", "reject": "rejected"}.get(last.action, last.action)
    why = "" if last.action == "promote" else ": " + "; ".join(last.reasons)
    return f"{verb} {advisor}-v{last.to_version}, {now}{why}"


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("status", parents=[common], help="per advisor: versions, active, pinned, last evaluation and decision")
    p.add_argument("--advisor", action="append", help="only this advisor (repeatable)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("versions", parents=[common], help="an advisor's registered versions")
    p.add_argument("--advisor", required=True)
    p.set_defaults(func=cmd_versions)

    p = sub.add_parser("rollback", parents=[common], help="make an earlier version active again")
    p.add_argument("--advisor", required=True)
    p.add_argument("--to", type=int, help="version number (default: the previous active version)")
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("pin", parents=[common], help="keep a version active; deploys then only record candidates")
    p.add_argument("--advisor", required=True)
    p.add_argument("--version", type=int, help="version number to pin and make active (default: the active one)")
    p.set_defaults(func=cmd_pin)

    p = sub.add_parser("unpin", parents=[common], help="let deploys promote better candidates again")
    p.add_argument("--advisor", required=True)
    p.set_defaults(func=cmd_unpin)
