"""`mondrian-assets`: the command line over the same code the assets run.

Every command that materializes assets runs them through Dagster against the persistent instance in
DAGSTER_HOME (default <MONDRIAN_HOME>/.dagster), so `mondrian-assets ui` shows their history afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from mondrian_assets import registry_commands
from mondrian_assets.core.locations import Locations


REPO_ROOT = Path(__file__).resolve().parent.parent  # workspace.yaml
# The instance settings ./dev starts DAGSTER_HOME with (not at the root: Dagster warns about a dagster.yaml in the
# working directory that is not DAGSTER_HOME's).
INSTANCE_TEMPLATE = REPO_ROOT / "dagster_home" / "dagster.yaml"
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


def _generate_demo(app_dir: Path, *, seed: int, n_jobs: int = 120) -> None:
    from mondrian_assets.demo.app import generate_demo_app

    summary = generate_demo_app(app_dir, seed=seed, n_jobs=n_jobs)
    per_advisor = ", ".join(f"{a} {n}" for a, n in sorted(summary.completed_by_advisor.items()))
    print(f"demo app written to {summary.app_dir}: {summary.jobs_total} jobs ({per_advisor} completed)")


def _instance(loc: Locations):
    """The persistent instance in DAGSTER_HOME, set up with the project's dagster.yaml (concurrency limits)
    unless that folder already has its own."""
    import dagster as dg

    home = Path(os.environ.setdefault("DAGSTER_HOME", str(loc.home / ".dagster")))
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists():
        shutil.copyfile(INSTANCE_TEMPLATE, home / "dagster.yaml")
    return dg.DagsterInstance.get()


def _run_job(name: str, instance, partition_key: str | None = None) -> str:
    """Run a job in-process on the persistent instance: "ok", "gated" (a blocking check failed: its asset
    materialized, what is downstream did not) or "failed"."""
    import warnings

    import dagster as dg

    from mondrian_assets.definitions import defs

    warnings.filterwarnings("ignore", category=dg.BetaWarning)
    result = defs.resolve_job_def(name).execute_in_process(
        instance=instance,
        partition_key=partition_key,
        raise_on_error=False,
        run_config={"loggers": {"console": {"config": {"log_level": "INFO"}}}},  # progress, not event noise
    )
    if result.success:
        return "ok"
    label = f"{name}[{partition_key}]" if partition_key else name
    failures = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    errors = [str(e.event_specific_data.error.message) for e in failures if e.event_specific_data.error]  # type: ignore[union-attr]
    if errors and all("blocking asset check" in msg for msg in errors):
        print(f"{label}: gate failed, downstream blocked: {errors[0].strip()}", file=sys.stderr)
        return "gated"
    print(f"{label} FAILED (run {result.run_id}): {errors[-1].strip() if errors else 'see the run log'}", file=sys.stderr)
    return "failed"


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

    loc = _use_demo_if_unset(args)
    status = _run_job("link_job", _instance(loc))
    if loc.manifest_path.exists():
        print(summary_text(json.loads(loc.manifest_path.read_text())))
    return 0 if status == "ok" else 1


def _split_counts(loc: Locations, advisor: str) -> dict:
    from mondrian_assets.core.data.splits import split_files

    meta_path = split_files(loc.training_data, advisor).meta_json
    return json.loads(meta_path.read_text()) if meta_path.exists() else {"counts": {}, "data_version": "-", "note": ""}


def _trained_summary(loc: Locations, advisor: str) -> str:
    """First vs best val loss, then base vs fine-tuned format compliance and score MAE (and the mean baseline)."""
    parts = []
    log_path = loc.models / "adapters" / advisor / "training_log.jsonl"
    if log_path.exists():
        val = [r["val_loss"] for r in map(json.loads, log_path.read_text().splitlines()) if "val_loss" in r]
        parts.append(f"val loss {val[0]:.2f} -> {min(val):.2f}" if val else "no val loss")
    report_path = loc.evaluation / advisor / "comparison_report.json"
    if report_path.exists():
        m = json.loads(report_path.read_text())["metrics"]

        def num(value: float | None) -> str:
            return "n/a" if value is None else f"{value:.2f}"

        base, tuned, mean = m["base_model"], m["fine_tuned_model"], m["mean_baseline"]
        parts.append(f"valid JSON {num(base['format_compliance'])} -> {num(tuned['format_compliance'])}")
        parts.append(f"score MAE {num(base['overall_score_mae'])} -> {num(tuned['overall_score_mae'])}"
                     f" (mean baseline {num(mean['overall_score_mae'])})")  # fmt: skip
    return "; ".join(parts) or "-"


def cmd_demo(args: argparse.Namespace) -> int:
    """The README's main job: demo data, link, split every advisor, then train, evaluate and deploy every advisor
    that has a val set."""
    from mondrian_assets.core.data.linker import summary_text
    from mondrian_assets.defs.partitions import ADVISOR_PARTITIONS_NAME

    loc = _use_demo_if_unset(args)
    instance = _instance(loc)
    if _run_job("link_job", instance) != "ok":
        return 1
    print(summary_text(json.loads(loc.manifest_path.read_text())))
    advisors = args.advisor or sorted(instance.get_dynamic_partitions(ADVISOR_PARTITIONS_NAME))
    outcome: dict[str, str] = {}
    deploy: dict[str, str] = {}
    errors = 0
    for advisor in advisors:
        if _run_job("split_job", instance, advisor) != "ok":
            errors += 1
            outcome[advisor] = "split failed (see above)"
        elif not (meta := _split_counts(loc, advisor))["counts"].get("val"):
            outcome[advisor] = f"not trained: {meta['note']}"
        elif args.skip_training:
            outcome[advisor] = "not trained (--skip-training)"
        else:
            decided_before = registry_commands.decision_count(loc, advisor)
            status = _run_job("train_job", instance, advisor)
            errors += status == "failed"
            notes = {"ok": "", "gated": "  [a gate failed: not deployable]", "failed": "  [failed: see above]"}
            outcome[advisor] = _trained_summary(loc, advisor) + notes[status]
            deploy[advisor] = registry_commands.decision_since(loc, advisor, decided_before) if status == "ok" else "not deployed"

    print("\nadvisor      train   val  data version      base -> fine-tuned")
    for advisor in advisors:
        meta = _split_counts(loc, advisor)
        counts = meta["counts"]
        print(f"  {advisor:<10} {counts.get('train', 0):>5} {counts.get('val', 0):>5}  {meta['data_version']:<16}  {outcome[advisor]}")
        if advisor in deploy:
            print(f"  {'':<10} deploy: {deploy[advisor]}")
    print(f"\nDagster home: {os.environ['DAGSTER_HOME']}  (browse it with: ./dev ui)")
    return 1 if errors else 0  # a gate verdict is a result, not an error


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
    except AppDatabaseError as exc:
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
    _instance(loc)
    repo_root = Path(__file__).resolve().parent.parent
    argv = [sys.executable, "-m", "dagster", "dev", "-w", str(repo_root / "workspace.yaml"),
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
    p.add_argument("--jobs", type=int, default=120, help="number of jobs (default 120)")
    p.add_argument("--add", type=int, metavar="N", help="append N finished jobs (both app eras) to the existing demo app")
    p.add_argument("--advisor", action="append", help=f"with --add: these advisors in turn (repeatable; default: {', '.join(DEMO_ADD_ADVISORS)})")
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser("link", parents=[common], help="materialize linked_records and print the summary")
    p.set_defaults(func=cmd_link)

    p = sub.add_parser("demo", parents=[common], help="the main job: link, then every advisor's downstream assets")
    p.add_argument("--advisor", action="append", help="only this advisor (repeatable); default: all")
    p.add_argument("--skip-training", action="store_true", help="stop after the splits")
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
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
