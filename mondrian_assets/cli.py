"""`mondrian-assets`: the command line over the same code the assets run.

Every command that materializes assets runs them through Dagster against the persistent instance in
DAGSTER_HOME (default <MONDRIAN_HOME>/.dagster), so `mondrian-assets ui` shows their history afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from mondrian_assets import registry_commands
from mondrian_assets.advisor_table import AdvisorRow, evaluated_cells, render
from mondrian_assets.core.locations import Locations
from mondrian_assets.project_instance import project_instance

if TYPE_CHECKING:  # importing Dagster is slow; commands that run jobs import it when they run
    from mondrian_assets.run_outcome import RunOutcome


REPO_ROOT = Path(__file__).resolve().parent.parent  # workspace.yaml
DEMO_ADD_ADVISORS = ("ansel", "weston")  # the demo's advisors with enough examples to retrain


def _locations(args: argparse.Namespace) -> Locations:
    return Locations.resolve(app_dir=getattr(args, "app_dir", None), home=getattr(args, "home", None))


def _use_demo_if_unset(args: argparse.Namespace) -> Locations:
    """With no app configured, point MONDRIAN_APP_DIR at the demo app (generating it on first use)."""
    loc = _locations(args)
    if not (args.app_dir or os.environ.get("MONDRIAN_APP_DIR") or os.environ.get("MONDRIAN_DB")):
        if not loc.db_path.exists():
            _generate_demo(loc.app_dir, seed=args.seed)
    os.environ["MONDRIAN_APP_DIR"] = str(loc.app_dir)
    os.environ["MONDRIAN_HOME"] = str(loc.home)
    return loc


def _generate_demo(app_dir: Path, *, seed: int, n_jobs: int | None = None) -> None:
    from mondrian_assets.demo.app import DEFAULT_JOBS, generate_demo_app

    summary = generate_demo_app(app_dir, seed=seed, n_jobs=n_jobs or DEFAULT_JOBS)
    per_advisor = ", ".join(f"{a} {n}" for a, n in sorted(summary.completed_by_advisor.items()))
    print(f"demo app written to {summary.app_dir}: {summary.jobs_total} jobs ({per_advisor} completed)")


def cmd_demo_data(args: argparse.Namespace) -> int:
    app_dir = _locations(args).app_dir
    if args.add is None:
        _generate_demo(app_dir, seed=args.seed, n_jobs=args.jobs)
        return 0
    from mondrian_assets.demo.app import append_demo_jobs

    advisors = args.advisor or list(DEMO_ADD_ADVISORS)
    try:
        added = append_demo_jobs(app_dir, args.add, seed=args.seed, advisor=advisors, both_eras=True)
    except ValueError as exc:
        print(f"demo-data --add: {exc}", file=sys.stderr)
        return 2
    print(f"added {len(added)} finished jobs ({', '.join(advisors)} in turn, both app eras) to {app_dir}; "
          "the retrain sensor picks them up on its next tick")  # fmt: skip
    return 0


def cmd_link(args: argparse.Namespace) -> int:
    from mondrian_assets.core.data.linker import summary_text
    from mondrian_assets.run_outcome import run_job

    loc = _use_demo_if_unset(args)
    outcome = run_job("link_job", project_instance(loc))
    for error in outcome.errors:
        print(f"linking failed: {error}", file=sys.stderr)
    if loc.manifest_path.exists():
        print(summary_text(json.loads(loc.manifest_path.read_text())))
    return 0 if outcome.status != "failed" else 1


def _split_counts(loc: Locations, advisor: str) -> dict:
    from mondrian_assets.core.data.splits import split_files

    meta_path = split_files(loc.training_data, advisor).meta_json
    return json.loads(meta_path.read_text()) if meta_path.exists() else {"counts": {}, "data_version": "-", "note": ""}


def _failed_row(row: AdvisorRow, outcome: RunOutcome) -> AdvisorRow:
    first_line = outcome.errors[0].splitlines()[0]
    return replace(row, decision="failed", reason=f"{first_line} (full log: run {outcome.run_id[:8]} in ./dev ui)")


def _split_row(loc: Locations, instance, advisor: str) -> AdvisorRow:
    """Split one advisor (this also prepares the base model's tokenizer, once, before any parallel training)."""
    from mondrian_assets.run_outcome import run_job

    split = run_job("split_job", instance, advisor)
    counts = _split_counts(loc, advisor)["counts"]
    row = AdvisorRow(advisor, counts.get("train", 0), counts.get("val", 0))
    # a blocking split check failed: a verdict, and a later train_job would not be blocked by it (a WARN one, such as
    # split_ratio on a few images, only informs)
    if stopped := [g for g in split.failed_gates if g.stops_downstream]:
        failed = ", ".join(f"{g.asset} {g.check}" for g in stopped)
        return replace(row, decision="not trained", reason=f"split checks failed: {failed}")
    return _failed_row(row, split) if split.status == "failed" else row


def _trained_row(row: AdvisorRow) -> AdvisorRow:
    """Train and evaluate one split advisor (in a worker process); the row says what was decided and why."""
    from mondrian_assets.run_outcome import run_job

    loc = Locations.resolve()
    decided_before = registry_commands.decision_count(loc, row.advisor)
    outcome = run_job("train_job", project_instance(loc), row.advisor)
    if outcome.status == "ok" and not outcome.decisions:
        row = replace(row, deploy=registry_commands.decision_since(loc, row.advisor, decided_before))
    if decision := outcome.decisions.get("lora_adapter"):
        return replace(row, decision=str(decision["decision"]), reason=str(decision["reason"]))
    if "eval_report" in outcome.materialized:
        report = json.loads((loc.evaluation / row.advisor / "comparison_report.json").read_text())
        row = replace(row, **evaluated_cells(report))
    if outcome.status == "failed":
        return _failed_row(row, outcome)
    if outcome.status == "gated":
        reasons = "; ".join(f"{g.check}: {g.message}" if g.message else f"{g.check} failed" for g in outcome.failed_gates)
        return replace(row, decision="not deployable", reason=reasons)
    return replace(row, decision="deployable", reason="every gate passed")


@contextlib.contextmanager
def _demo_mlx_slots(instance, slots: int) -> Iterator[None]:
    """Let `slots` MLX steps run at once while the demo trains, then give the pool back its default.

    The pool's one slot protects a Mac from two 4B models in memory at once; the embedded model takes ~0.3 GB and
    one CPU core per step, so on the demo it only makes the second advisor wait. A limit someone set (anything
    but the default) is left alone. The loan is recorded first: if the demo is killed, the next start gives it
    back (`run_workers.repair_instance`)."""
    from mondrian_assets.defs.run_workers import MLX_POOL, lend_pool_slots, return_pool_slots

    lent = slots > 1 and lend_pool_slots(instance, MLX_POOL, slots)
    try:
        yield
    finally:
        if lent:
            return_pool_slots(instance, MLX_POOL)


def _train_all(rows: list[AdvisorRow], parallel: int) -> list[AdvisorRow]:
    """Run the split advisors' training jobs, `parallel` at a time, the largest first; each run is its own process
    against the same instance."""
    todo = [r for r in rows if r.decision == "-"]
    if parallel <= 1 or len(todo) <= 1:
        done = {r.advisor: _trained_row(r) for r in todo}
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        todo.sort(key=lambda r: -r.train)
        with ProcessPoolExecutor(parallel, mp_context=multiprocessing.get_context("spawn")) as pool:
            done = dict(zip((r.advisor for r in todo), pool.map(_trained_row, todo), strict=True))
    return [done.get(r.advisor, r) for r in rows]


def cmd_demo(args: argparse.Namespace) -> int:
    """The README's main job: demo data, link, split every advisor, then train, evaluate and deploy; ends with
    the table."""
    from mondrian_assets.core.data.linker import summary_text
    from mondrian_assets.defs.partitions import ADVISOR_PARTITIONS_NAME
    from mondrian_assets.run_outcome import run_job

    loc = _use_demo_if_unset(args)
    instance = project_instance(loc)
    link = run_job("link_job", instance)
    if link.status == "failed":
        print(f"linking failed: {link.errors[0]}", file=sys.stderr)
        return 1
    print(summary_text(json.loads(loc.manifest_path.read_text())))
    advisors = args.advisor or sorted(instance.get_dynamic_partitions(ADVISOR_PARTITIONS_NAME))
    rows = [_split_row(loc, instance, advisor) for advisor in advisors]
    if args.skip_training:
        rows = [replace(r, decision="not trained", reason="--skip-training") if r.decision == "-" else r for r in rows]
    else:
        with _demo_mlx_slots(instance, min(args.parallel, os.cpu_count() or 1)):
            rows = _train_all(rows, args.parallel)
    print(f"\nDagster home: {os.environ['DAGSTER_HOME']}  (full run logs: ./dev ui)\n")
    print(render(rows))
    return 1 if any(r.decision == "failed" for r in rows) else 0  # a gate verdict or a data decision is a result


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Any adapter against any validation file: what the nightly re-check of an active version runs."""
    from mondrian_assets.core.data.splits import split_files
    from mondrian_assets.core.evaluation.run import EvalSettings, evaluate_adapter

    loc = _locations(args)
    files = split_files(loc.training_data, args.advisor)
    adapter = Path(args.adapter or loc.models / "adapters" / args.advisor)
    config_path = adapter / "adapter_config.json"
    if not config_path.is_file():
        print(f"no adapter at {adapter} (train it first, or pass --adapter)", file=sys.stderr)
        return 2
    base = args.base_model or json.loads(config_path.read_text())["base_model"]
    out_dir = Path(args.out or loc.evaluation / args.advisor / f"recheck-{adapter.name}")
    outcome = evaluate_adapter(
        base, adapter, Path(args.val_json or files.val_json), Path(args.train_json or files.train_json), out_dir,
        EvalSettings(max_examples=args.max_examples),
    )  # fmt: skip
    print(outcome.verdict)
    print(f"report: {outcome.paths.report_json}\nreview page: {outcome.paths.review_html}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """The advisor service on HTTP: the app's job service (or curl) posts images to /analyze."""
    from mondrian_assets.core.base_model import BaseModelError
    from mondrian_assets.core.data.app_db import AppDatabaseError
    from mondrian_assets.core.serving.app import serve
    from mondrian_assets.core.serving.routing import ServiceMode
    from mondrian_assets.core.serving.service import AdvisorService, ServiceConfig

    loc = _use_demo_if_unset(args)
    if args.base_model:
        base = args.base_model
    else:
        from mondrian_assets.demo.base_model import ensure_embedded_base_model

        base = str(ensure_embedded_base_model(loc.models))
    config = ServiceConfig(
        base_model=base, mode=ServiceMode(args.mode), ab_split=args.ab_split, constrained=not args.unconstrained,
        missing_version=args.missing_version, workers=args.workers, max_waiting=args.max_waiting,
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024), max_tokens=args.max_tokens,
        job_timeout_s=args.job_timeout,
    )  # fmt: skip
    try:
        service = AdvisorService(config, loc)
    except (AppDatabaseError, BaseModelError) as exc:
        print(exc, file=sys.stderr)
        return 2
    print(f"serving {base} in {args.mode} mode on http://{args.host}:{args.port} (state DB {loc.state_db})", flush=True)
    serve(service, args.host, args.port, grace_s=args.grace)
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    from mondrian_assets.core.serving.usage import serving_summary, summary_text
    from mondrian_assets.core.state_db import state_engine

    print(summary_text(serving_summary(state_engine(_locations(args).state_db))))
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    """`dagster dev`: the webserver and the daemon (which runs the sensors, the schedules and the run queue)
    together, on this project's instance and workspace.yaml; Ctrl-C stops both."""
    loc = _use_demo_if_unset(args)
    project_instance(loc)
    argv = [sys.executable, "-m", "dagster", "dev", "-w", str(REPO_ROOT / "workspace.yaml"),
            "-h", args.host, "-p", str(args.port)]  # fmt: skip
    os.execv(argv[0], argv)  # this interpreter: the venv's dagster, whether or not the venv is on PATH
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mondrian-assets",
        description="Turn the Mondrian app's job history into LoRA-fine-tuned Qwen3-VL advisors (Dagster + MLX).",
        epilog="Locations come from MONDRIAN_APP_DIR, MONDRIAN_DB, MONDRIAN_SOURCE_DIR, MONDRIAN_ANALYSIS_DIR and "
        "MONDRIAN_HOME (default: the working directory); with no app configured the demo app is used.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--app-dir", help="the app's root (mondrian.db, source/, uploads/, analysis_md/)")
    common.add_argument("--home", help="where outputs go (training_data/, models/, evaluation/, .dagster/)")
    common.add_argument("--seed", type=int, default=7, help="demo data seed (default 7)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo-data", parents=[common], help="generate the demo app (DB, images, analyses)")
    p.add_argument("--jobs", type=int, help="number of jobs (default 300)")
    p.add_argument("--add", type=int, metavar="N", help="append N finished jobs (both app eras) to the existing demo app")
    p.add_argument("--advisor", action="append", help=f"with --add: these advisors in turn (repeatable; default: {', '.join(DEMO_ADD_ADVISORS)})")
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser("link", parents=[common], help="materialize linked_records and print the summary")
    p.set_defaults(func=cmd_link)

    p = sub.add_parser("demo", parents=[common], help="the main job: link, then every advisor's downstream assets")
    p.add_argument("--advisor", action="append", help="only this advisor (repeatable); default: all")
    p.add_argument("--skip-training", action="store_true", help="stop after the splits")
    p.add_argument("--parallel", type=int, default=2,
                   help="advisor runs at once (default 2, at most one per CPU core; each holds its own copy of the base "
                   "model in memory); while the demo trains, the instance's mlx pool gets as many slots, unless "
                   "someone set its limit")  # fmt: skip
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("evaluate", parents=[common], help="evaluate any adapter against any validation data")
    p.add_argument("--advisor", required=True)
    p.add_argument("--adapter", help="adapter dir (default: models/adapters/<advisor>)")
    p.add_argument("--val-json", help="validation file (default: the advisor's current _val.json)")
    p.add_argument("--train-json", help="training file for the mean baseline (default: the current _train.json)")
    p.add_argument("--base-model", help="default: the base recorded in the adapter's adapter_config.json")
    p.add_argument("--max-examples", type=int, help="evaluate at most this many examples")
    p.add_argument("--out", help="report folder (default: evaluation/<advisor>/recheck-<adapter dir name>)")
    p.set_defaults(func=cmd_evaluate)

    registry_commands.add_commands(sub, common)

    p = sub.add_parser("serve", parents=[common], help="the advisor service (POST /analyze, GET /health)")
    p.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (loopback only)")
    p.add_argument("--port", type=int, default=5100, help="default 5100, where the app's job service calls")
    p.add_argument("--mode", choices=["base", "fine_tuned", "ab_test"], default="fine_tuned")
    p.add_argument("--ab-split", type=float, default=0.5, help="share of A/B jobs on the fine-tuned arm (default 0.5)")
    p.add_argument("--base-model", help="default: the embedded tiny model (built on first use)")
    p.add_argument("--missing-version", choices=["refuse", "base"], default="refuse",
                   help="fine-tuned asked, no active version: 409 (refuse) or serve the base and say so (base)")
    p.add_argument("--unconstrained", action="store_true", help="no grammar mask (schema-valid JSON not guaranteed)")
    p.add_argument("--workers", type=int, default=1, help="generation worker processes (each holds the models)")
    p.add_argument("--max-waiting", type=int, default=4, help="requests queued beyond the busy workers before 503")
    p.add_argument("--max-tokens", type=int, default=1536)
    p.add_argument("--max-upload-mb", type=float, default=25.0)
    p.add_argument("--job-timeout", type=float, default=280.0, help="seconds one generation may take")
    p.add_argument("--grace", type=float, default=30.0, help="seconds running requests get to finish on shutdown")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("usage", parents=[common], help="served requests per advisor and model, and the A/B arms")
    p.set_defaults(func=cmd_usage)

    p = sub.add_parser("ui", parents=[common], help="the Dagster web UI and daemon (sensors, schedules) on this project's instance")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=3000)
    p.set_defaults(func=cmd_ui)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # the reader went away (`status | head`): nothing left to say to it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush does not fail again
        return 0


if __name__ == "__main__":
    sys.exit(main())
