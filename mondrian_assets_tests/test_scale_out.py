"""The production instance of deploy/dagster.yaml on a real PostgreSQL server: runs for two advisors are queued
by `dagster job launch`, dequeued and started by `dagster-daemon`, and everything lands in PostgreSQL."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dagster as dg
import pytest

from mondrian_assets_tests.service_helpers import free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ADVISORS = ("ansel", "weston")  # watkins has too few examples to train
RUN_TIMEOUT_S = 900


def _postgres_bin() -> Path | None:
    """The newest installed PostgreSQL server's bin folder (Debian keeps them under /usr/lib/postgresql/<v>)."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent  # Debian links pg_ctl from /usr/local/bin; its siblings are here
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parent.parent.name))
    return versions[-1].parent if versions else None


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL server on a free loopback port. As root (CI), it runs as the `postgres` user,
    since initdb refuses root."""
    bin_dir = _postgres_bin()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl); `.ci/run` installs them (apt-get install postgresql)")
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    root = Path(tempfile.mkdtemp(prefix="mondrian-pg-"))
    if as_user:
        shutil.chown(root, "postgres")
    data, port = root / "data", free_port()
    subprocess.run([*as_user, bin_dir / "initdb", "-D", data, "-A", "trust", "-U", "postgres"], check=True, capture_output=True)
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1"
    subprocess.run([*as_user, bin_dir / "pg_ctl", "-D", data, "-o", options, "-l", root / "server.log", "-w", "start"],
                   check=True, capture_output=True)  # fmt: skip
    try:
        subprocess.run([bin_dir / "createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "dagster"], check=True)
        yield {"DAGSTER_PG_HOST": "127.0.0.1", "DAGSTER_PG_PORT": str(port), "DAGSTER_PG_DB": "dagster",
               "DAGSTER_PG_USERNAME": "postgres", "DAGSTER_PG_PASSWORD": ""}  # fmt: skip
    finally:
        subprocess.run([*as_user, bin_dir / "pg_ctl", "-D", data, "-m", "fast", "-w", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def _env(values: dict[str, str]):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _launch(job: str, advisor: str | None, run_config: dict, env: dict[str, str]) -> None:
    tags = {"dagster/partition": advisor} if advisor else {}
    subprocess.run([BIN / "dagster", "job", "launch", "-j", job, "-w", REPO / "workspace.yaml", "--tags", json.dumps(tags),
                    "--config-json", json.dumps(run_config)], cwd=REPO, env=env, check=True, capture_output=True)  # fmt: skip


def _wait_for(instance: dg.DagsterInstance, count: int, daemon: subprocess.Popen) -> list[dg.RunRecord]:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        records = instance.get_run_records()
        if len(records) >= count and all(r.dagster_run.is_finished for r in records):
            return records
        assert daemon.poll() is None, "dagster-daemon exited"
        time.sleep(2)
    raise AssertionError(f"runs not finished in {RUN_TIMEOUT_S} s: {[r.dagster_run.status for r in instance.get_run_records()]}")


@pytest.mark.slow
def test_two_advisors_run_through_the_queue_on_postgres(postgres, pristine_demo, embedded_base, tmp_path):
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    shutil.copy(REPO / "deploy" / "dagster.yaml", dagster_home / "dagster.yaml")
    env = {**os.environ, **postgres, "DAGSTER_HOME": str(dagster_home), "MONDRIAN_HOME": str(tmp_path / "home"),
           "MONDRIAN_APP_DIR": str(pristine_demo.app_dir)}  # fmt: skip
    trainer = {"base_model": str(embedded_base), "iters": 4, "eval_interval": 2, "save_interval": 2, "warmup_steps": 1}
    in_process = {"execution": {"config": {"in_process": {}}}}  # one process per run: no step subprocesses to start
    advisor_config = {"resources": {"mlx_trainer": {"config": trainer}}, **in_process,
                      "ops": {"eval_report": {"config": {"max_examples": 2, "max_tokens": 24, "batch_size": 2}}}}  # fmt: skip

    # only the runs this test launches: the retrain sensor would otherwise retrain every advisor of a never-linked
    # app on its first tick, racing the link below, and the nightly schedule could fire if CI runs at 02:00
    for kind, name in (("sensor", "retrain_sensor"), ("schedule", "nightly_evaluation_schedule")):
        subprocess.run([BIN / "dagster", kind, "stop", name, "-w", REPO / "workspace.yaml"], cwd=REPO, env=env,
                       check=True, capture_output=True)  # fmt: skip
    with _env({k: env[k] for k in (*postgres, "DAGSTER_HOME")}):
        instance = dg.DagsterInstance.get()
        daemon = subprocess.Popen([BIN / "dagster-daemon", "run", "-w", REPO / "workspace.yaml"], cwd=REPO, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        try:
            _launch("link_job", None, in_process, env)
            [link] = _wait_for(instance, 1, daemon)
            assert link.dagster_run.status == dg.DagsterRunStatus.SUCCESS
            for advisor in ADVISORS:
                _launch("advisor_job", advisor, advisor_config, env)
            records = _wait_for(instance, 1 + len(ADVISORS), daemon)
        finally:
            os.killpg(daemon.pid, signal.SIGTERM)
            daemon.wait(timeout=60)

        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        runs = {r.dagster_run.tags.get("dagster/partition"): r.dagster_run for r in records}
        assert set(runs) == {None, *ADVISORS}
        for advisor in ADVISORS:
            events = [e.dagster_event_type for e in instance.all_logs(runs[advisor].run_id)]
            # through the queue: enqueued by the launch, handed to the run launcher by the daemon, then started
            assert events.index(dg.DagsterEventType.RUN_ENQUEUED) < events.index(dg.DagsterEventType.RUN_STARTING)
            assert events.index(dg.DagsterEventType.RUN_STARTING) < events.index(dg.DagsterEventType.RUN_START)
        for asset in ("train_split", "lora_adapter", "eval_report"):
            assert instance.get_materialized_partitions(dg.AssetKey(asset)) == set(ADVISORS), asset
        assert (tmp_path / "home" / "models" / "adapters" / "ansel" / "adapters.safetensors").is_file()
