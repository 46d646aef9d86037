"""A run killed outright never wedges the instance: its worker is recorded, a later launch (or the daemon's run
monitoring) marks it failed and frees its MLX slot, and the next run resumes from the checkpoint by itself."""

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster._core.launcher.base import WorkerStatus
from dagster._core.test_utils import create_run_for_test

from mondrian_assets.core.processes import Liveness, ProcessIdentity, process_start_time
from mondrian_assets.defs import executor as executor_module
from mondrian_assets.defs.executor import repairing_in_process_executor
from mondrian_assets.defs.run_launcher import WorkerCheckingRunLauncher
from mondrian_assets.defs.run_workers import LENT_SLOTS_FILE, MLX_POOL, WORKER_TAG, pool_holders, repair_instance
from mondrian_assets.project_instance import INSTANCE_TEMPLATE
from mondrian_assets_tests.service_helpers import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent


def _identity_of(process: subprocess.Popen) -> ProcessIdentity:
    return ProcessIdentity(socket.gethostname(), process.pid, process_start_time(process.pid))


def _dead_identity() -> ProcessIdentity:
    """The identity of a process that ran here and is gone."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    identity = _identity_of(child)
    child.kill()
    child.wait()
    return identity


@pytest.fixture
def sleeper():
    """A live process beside the tests: a stand-in for another run's worker."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    time.sleep(0.2)
    yield child
    child.kill()
    child.wait()


def test_a_process_identity_tells_alive_dead_reused_and_elsewhere(sleeper):
    me = ProcessIdentity.current()
    assert me.liveness() is Liveness.ALIVE
    assert ProcessIdentity.from_text(me.to_text()) == me
    assert ProcessIdentity.from_text("garbage") is None and ProcessIdentity.from_text("h:x:1.0") is None
    assert _identity_of(sleeper).liveness() is Liveness.ALIVE
    assert _dead_identity().liveness() is Liveness.DEAD
    # the pid lives, but it is not the process that was recorded (a pid handed out again after a reboot)
    reused = ProcessIdentity(me.host, sleeper.pid, process_start_time(sleeper.pid) - 3600)
    assert reused.liveness() is Liveness.DEAD
    assert ProcessIdentity("another-host", os.getpid(), me.started).liveness() is Liveness.ELSEWHERE


def _started_run(instance, job: str, worker: ProcessIdentity | None, partition: str) -> dg.DagsterRun:
    tags = {"dagster/partition": partition} | ({WORKER_TAG: worker.to_text()} if worker else {})
    return create_run_for_test(instance, job_name=job, status=dg.DagsterRunStatus.STARTED, tags=tags)


def test_repair_fails_only_runs_whose_worker_died_here_and_frees_their_slots(sleeper):
    with dg.instance_for_test(overrides={"concurrency": {"pools": {"default_limit": 1}}}) as instance:
        storage = instance.event_log_storage
        storage.set_concurrency_slots(MLX_POOL, 5)
        dead = _started_run(instance, "train_job", _dead_identity(), "ansel")
        live = _started_run(instance, "train_job", _identity_of(sleeper), "weston")
        elsewhere = _started_run(instance, "train_job", ProcessIdentity("gpu-box", 4242, 1.0), "okeefe")
        unrecorded = _started_run(instance, "train_job", None, "watkins")
        ended = create_run_for_test(instance, job_name="train_job", status=dg.DagsterRunStatus.SUCCESS)
        for run in (dead, live, elsewhere, unrecorded, ended):
            assert storage.claim_concurrency_slot(MLX_POOL, run.run_id, "lora_adapter").is_claimed

        holders = {h.run_id: h.state for h in pool_holders(instance)}
        assert holders[dead.run_id].startswith("worker gone") and holders[live.run_id].startswith("running (pid")
        assert holders[elsewhere.run_id].startswith("running elsewhere")

        lines = repair_instance(instance)
        assert instance.get_run_by_id(dead.run_id).status == dg.DagsterRunStatus.FAILURE
        for run in (live, elsewhere, unrecorded):
            assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.STARTED
        assert {s.run_id for s in storage.get_concurrency_info(MLX_POOL).claimed_slots} == {
            live.run_id, elsewhere.run_id, unrecorded.run_id}  # fmt: skip
        assert any(line.startswith(f"marked run {dead.run_id[:8]} (train_job, ansel) failed") for line in lines)
        assert any(f"run {ended.run_id[:8]}, which has ended" in line for line in lines)
        failure = instance.all_logs(dead.run_id, of_type=dg.DagsterEventType.RUN_FAILURE)[0]
        assert "worker process" in failure.message and "is gone" in failure.message
        assert instance.get_run_by_id(dead.run_id).tags["dagster/max_retries"] == "0"  # the new launch resumes it
        assert repair_instance(instance) == []  # nothing left to do


def test_the_run_launcher_reports_a_dead_worker_failed_and_others_running(sleeper):
    with dg.instance_for_test() as instance:
        launcher = WorkerCheckingRunLauncher()
        assert launcher.supports_check_run_worker_health
        dead = launcher.check_run_worker_health(_started_run(instance, "j", _dead_identity(), "a"))
        assert dead.status == WorkerStatus.FAILED and "is gone" in dead.msg
        for worker in (_identity_of(sleeper), ProcessIdentity("gpu-box", 1, 1.0), None):
            health = launcher.check_run_worker_health(_started_run(instance, "j", worker, "a"))
            assert health.status == WorkerStatus.RUNNING


def test_the_project_instance_runs_monitoring_with_the_checking_launcher():
    for path in (INSTANCE_TEMPLATE, REPO_ROOT / "deploy" / "dagster.yaml"):
        settings = yaml.safe_load(path.read_text())
        assert settings["run_launcher"]["class"] == WorkerCheckingRunLauncher.__name__, path
        assert settings["run_monitoring"]["enabled"] and settings["run_monitoring"]["free_slots_after_run_end_seconds"]
        assert settings["run_retries"]["retry_on_asset_or_op_failure"] is False


LENDER = """import os, sys, time
import dagster as dg
from mondrian_assets.cli import _demo_mlx_slots
with _demo_mlx_slots(dg.DagsterInstance.get(), 2):
    print("lent", flush=True)
    time.sleep(120)
"""


def _home_with_template(root: Path) -> Path:
    home = root / ".dagster"
    home.mkdir(parents=True)
    shutil.copyfile(INSTANCE_TEMPLATE, home / "dagster.yaml")
    return home


def test_a_killed_demo_leaves_the_mlx_pool_as_it_found_it(tmp_path, monkeypatch):
    home = _home_with_template(tmp_path)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    lender = subprocess.Popen([sys.executable, "-c", LENDER], stdout=subprocess.PIPE, text=True)
    assert lender.stdout.readline().strip() == "lent"
    with dg.DagsterInstance.get() as instance:
        storage = instance.event_log_storage
        assert storage.get_concurrency_info(MLX_POOL).limit == 2
        assert repair_instance(instance) == [] and storage.get_concurrency_info(MLX_POOL).limit == 2  # still lending
        lender.kill()
        lender.wait()
        assert storage.get_concurrency_info(MLX_POOL).limit == 2  # what a kill leaves behind
        (line,) = repair_instance(instance)
        assert line.startswith("gave back the 2 mlx slots")
        info = storage.get_concurrency_info(MLX_POOL)
        assert info.limit == 1 and info.using_default_limit and not (home / LENT_SLOTS_FILE).exists()


def test_a_lent_limit_someone_changed_since_is_left_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(_home_with_template(tmp_path)))
    lender = subprocess.Popen([sys.executable, "-c", LENDER], stdout=subprocess.PIPE, text=True)
    assert lender.stdout.readline().strip() == "lent"
    lender.kill()
    lender.wait()
    with dg.DagsterInstance.get() as instance:
        instance.event_log_storage.set_concurrency_slots(MLX_POOL, 3)
        assert repair_instance(instance) == []
        assert instance.event_log_storage.get_concurrency_info(MLX_POOL).limit == 3


@dg.op(pool=MLX_POOL)
def _mlx_step() -> int:
    return 1


def pool_job() -> dg.JobDefinition:
    graph = dg.GraphDefinition(name="pool_graph", node_defs=[_mlx_step])
    return graph.to_job(executor_def=repairing_in_process_executor)


def test_a_step_waiting_for_a_slot_takes_it_once_its_holder_dies(tmp_path, monkeypatch, sleeper):
    """The holder dies while the step waits: the waiting run repairs the instance itself and goes on."""
    monkeypatch.setattr(executor_module, "REPAIR_EVERY_S", 1.0)
    monkeypatch.setenv("DAGSTER_HOME", str(_home_with_template(tmp_path)))
    with dg.DagsterInstance.get() as instance:
        holder = _started_run(instance, "train_job", _identity_of(sleeper), "ansel")
        instance.event_log_storage.initialize_concurrency_limit_to_default(MLX_POOL)
        assert instance.event_log_storage.claim_concurrency_slot(MLX_POOL, holder.run_id, "lora_adapter").is_claimed
        results = {}

        def wait_for_the_slot() -> None:
            with dg.execute_job(dg.reconstructable(pool_job), instance) as result:
                results["success"], results["run_id"] = result.success, result.run_id

        waiter = threading.Thread(target=wait_for_the_slot)
        waiter.start()
        time.sleep(3)
        assert waiter.is_alive() and instance.get_run_by_id(holder.run_id).status == dg.DagsterRunStatus.STARTED
        sleeper.kill()
        sleeper.wait()
        waiter.join(timeout=30)
        assert not waiter.is_alive() and results["success"]
        assert instance.get_run_by_id(holder.run_id).status == dg.DagsterRunStatus.FAILURE
        run = instance.get_run_by_id(results["run_id"])
        assert ProcessIdentity.from_text(run.tags[WORKER_TAG]).pid == os.getpid()
        notes = [e.message for e in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.ENGINE_EVENT)]
        assert any(n.startswith(f"marked run {holder.run_id[:8]}") for n in notes)


# --- the real thing: `dagster asset materialize` of lora_adapter, killed with SIGKILL mid-training -------------

TRAINING = {"iters": 30, "save_interval": 5, "eval_interval": 15, "report_interval": 1, "warmup_steps": 2}


@pytest.fixture
def project(tmp_path, pristine_demo, embedded_base):
    """A home with the project's instance, linked and split for ansel; the environment a user's shell has."""
    home = tmp_path / "home"
    shutil.copytree(pristine_demo.app_dir, home / "demo_app")
    dagster_home = _home_with_template(home)
    settings = yaml.safe_load((dagster_home / "dagster.yaml").read_text())
    settings["run_monitoring"]["poll_interval_seconds"] = 2  # the daemon test should not wait 15 s per look
    (dagster_home / "dagster.yaml").write_text(yaml.safe_dump(settings))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MONDRIAN_", "DAGSTER_"))}
    env |= {"MONDRIAN_HOME": str(home), "MONDRIAN_APP_DIR": str(home / "demo_app"), "DAGSTER_HOME": str(dagster_home)}
    config = home / "run_config.yaml"
    config.write_text(yaml.safe_dump({"resources": {"mlx_trainer": {"config": {
        "base_model": str(embedded_base), **TRAINING}}}}))  # fmt: skip
    for selection, partition in (("linked_records", None), ("train_split,val_split", "ansel")):
        done = subprocess.run(_materialize_argv(config, selection, partition), env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
    return {"home": home, "env": env, "config": config, "dagster_home": dagster_home}


def _materialize_argv(config: Path, selection: str, partition: str | None) -> list[str]:
    argv = [sys.executable, "-m", "dagster", "asset", "materialize", "-m", "mondrian_assets.definitions",
            "--select", selection, "-c", str(config)]  # fmt: skip
    return argv + (["--partition", partition] if partition else [])


def _train(project) -> subprocess.Popen:
    return subprocess.Popen(_materialize_argv(project["config"], "lora_adapter", "ansel"), env=project["env"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip


def _wait_for_checkpoint(project, process: subprocess.Popen, min_step: int, timeout_s: float = 180) -> None:
    checkpoints = project["home"] / "models" / "adapters" / ".ansel.checkpoints"
    deadline = time.monotonic() + timeout_s
    while not any(int(p.name[5:]) >= min_step for p in checkpoints.glob("*/step_*")):
        assert process.poll() is None, process.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint written in time"
        time.sleep(0.2)


def _runs(project) -> list[dg.DagsterRun]:
    os.environ["DAGSTER_HOME"] = str(project["dagster_home"])
    with dg.DagsterInstance.get() as instance:
        return list(reversed(instance.get_runs(dg.RunsFilter(job_name="__ASSET_JOB"))))  # oldest first


def _status_of(project) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mondrian_assets.cli", "status"], env=project["env"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip


@pytest.mark.slow
def test_a_materialize_killed_mid_training_resumes_on_the_next_start(project, monkeypatch):
    first = _train(project)
    _wait_for_checkpoint(project, first, min_step=5)
    # a second process looking at the instance while the first trains never marks it failed
    status = _status_of(project)
    assert status.returncode == 0, status.stderr[-2000:]
    assert "holds: run" in status.stdout and "lora_adapter: running (pid" in status.stdout, status.stdout
    assert "repaired:" not in status.stdout
    _wait_for_checkpoint(project, first, min_step=10)
    assert first.poll() is None  # still training
    first.kill()  # SIGKILL: no cleanup, no events, the slot stays claimed
    first.wait()
    killed = _runs(project)[-1]
    assert killed.status == dg.DagsterRunStatus.STARTED  # what Dagster alone is left with

    second = subprocess.run(_materialize_argv(project["config"], "lora_adapter", "ansel"), env=project["env"],
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    log = second.stdout + second.stderr
    assert second.returncode == 0, log[-4000:]
    resumed = re.search(r"resumed from the checkpoint at step (\d+)", log)
    assert resumed and 10 <= int(resumed[1]) < TRAINING["iters"], log[-4000:]
    assert f"marked run {killed.run_id[:8]} (__ASSET_JOB, ansel) failed" in log
    runs = _runs(project)
    assert runs[-2].status == dg.DagsterRunStatus.FAILURE and runs[-1].status == dg.DagsterRunStatus.SUCCESS
    with dg.DagsterInstance.get() as instance:
        start = instance.all_logs(runs[-1].run_id, of_type=dg.DagsterEventType.RUN_START)[0].timestamp
        step = instance.all_logs(runs[-1].run_id, of_type=dg.DagsterEventType.STEP_START)[0].timestamp
        assert step - start < 30, "the resumed step waited for a slot"  # it waited for nobody: not a timing claim
        assert instance.event_log_storage.get_concurrency_info(MLX_POOL).claimed_slots == []
    adapter = project["home"] / "models" / "adapters" / "ansel"
    rows = [json.loads(line) for line in (adapter / "training_log.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == TRAINING["iters"]


def _launch_from_the_ui(port: int, project) -> str:
    """What Materialize in the web UI does: a queued run of lora_adapter for ansel, started by the daemon."""
    from dagster_graphql import DagsterGraphQLClient

    client = DagsterGraphQLClient("127.0.0.1", port_number=port)
    run_config = yaml.safe_load(project["config"].read_text())
    deadline = time.monotonic() + 120
    while True:
        try:
            return client.submit_job_execution("__ASSET_JOB", run_config=run_config, asset_selection=["lora_adapter"],
                                               tags={"dagster/partition": "ansel"})  # fmt: skip
        except Exception:  # the web server and its code location are still starting
            assert time.monotonic() < deadline, "dagster dev did not come up"
            time.sleep(2)


def _dagster_dev(project, port: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dagster", "dev", "-w", str(REPO_ROOT / "workspace.yaml"),
                             "-p", str(port)], env=project["env"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip


def _kill_session(process: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.mark.slow
def test_with_the_daemon_a_killed_run_is_failed_by_run_monitoring_and_retried(project):
    """Power loss mid-training under `dagster dev`: the web server, the daemon, the code server and the run worker
    all die at once. The next `dagster dev` marks the run failed (run monitoring), frees its slot, and launches a
    retry that resumes from the checkpoint."""
    port = free_port()
    first = _dagster_dev(project, port)
    try:
        run_id = _launch_from_the_ui(port, project)
        deadline = time.monotonic() + 180
        while not list((project["home"] / "models" / "adapters").glob(".ansel.checkpoints/*/step_*")):
            assert time.monotonic() < deadline, "no checkpoint written in time"
            time.sleep(0.5)
    finally:
        _kill_session(first, signal.SIGKILL)
    (killed,) = [r for r in _runs(project) if r.run_id == run_id]
    assert killed.status == dg.DagsterRunStatus.STARTED and WORKER_TAG in killed.tags

    second = _dagster_dev(project, free_port())
    try:
        deadline = time.monotonic() + 300
        while True:
            runs = {r.run_id: r for r in _runs(project)}
            retry = next((r for r in runs.values() if r.tags.get("dagster/parent_run_id") == run_id), None)
            if retry is not None and retry.is_finished:
                break
            states = [(r.run_id[:8], r.status) for r in runs.values()]
            assert time.monotonic() < deadline, f"no finished retry: {states}"
            time.sleep(2)
    finally:
        _kill_session(second, signal.SIGTERM)
    assert runs[run_id].status == dg.DagsterRunStatus.FAILURE
    assert retry.status == dg.DagsterRunStatus.SUCCESS
    with dg.DagsterInstance.get() as instance:
        failure = instance.all_logs(run_id, of_type=dg.DagsterEventType.RUN_FAILURE)[0]
        assert "Detected run worker status FAILED" in failure.message and "is gone" in failure.message
        logs = [e.user_message for e in instance.all_logs(retry.run_id)]
        assert any(m.startswith("resumed from the checkpoint at step") for m in logs), logs[-20:]
        assert instance.event_log_storage.get_concurrency_info(MLX_POOL).claimed_slots == []


@pytest.mark.slow
def test_a_demo_killed_while_training_leaves_the_pool_as_it_found_it(tmp_path, embedded_base):
    """`./dev demo` lends the mlx pool a slot per advisor while it trains; killed then (the whole process group,
    as power loss or the OOM killer of its cgroup would), the next command gives the loan back and fails the
    dead training runs."""
    home = tmp_path / "home"
    shutil.copytree(embedded_base, home / "models" / "base" / embedded_base.name)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MONDRIAN_", "DAGSTER_"))}
    demo = subprocess.Popen([sys.executable, "-m", "mondrian_assets.cli", "demo", "--home", str(home)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not list((home / "models" / "adapters").glob(".*.checkpoints/*/step_*")):  # training, slots lent
            assert demo.poll() is None and time.monotonic() < deadline, "the demo never started training"
            time.sleep(0.5)
        assert (home / ".dagster" / LENT_SLOTS_FILE).is_file()
    finally:
        _kill_session(demo, signal.SIGKILL)
    status = subprocess.run([sys.executable, "-m", "mondrian_assets.cli", "status", "--home", str(home)], env=env,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert status.returncode == 0, status.stderr[-2000:]
    assert "repaired: gave back the 2 mlx slots" in status.stdout, status.stdout
    assert "repaired: marked run" in status.stdout and "(train_job, ansel) failed" in status.stdout, status.stdout
    assert "pool mlx: limit 1 (the instance's default), 0 slot(s) held" in status.stdout, status.stdout
