"""The retrain sensor on real SQLite files: what counts as new, when an advisor is due, partitions, run keys, and
the instance's limits (one run per advisor, one MLX step per machine)."""

import time

import dagster as dg
import pytest
import yaml
from dagster._core.execution.plan.instance_concurrency_context import InstanceConcurrencyContext
from dagster._core.remote_origin import RegisteredCodeLocationOrigin, RemoteJobOrigin, RemoteRepositoryOrigin
from dagster._core.storage.dagster_run import DagsterRunStatus
from dagster._core.test_utils import create_run_for_test
from dagster._core.workspace.context import WorkspaceProcessContext
from dagster._core.workspace.load_target import EmptyWorkspaceTarget
from dagster._daemon.run_coordinator.queued_run_coordinator_daemon import QueuedRunCoordinatorDaemon

from mondrian_assets.project_instance import INSTANCE_TEMPLATE
from mondrian_assets.cli import main as cli_main
from mondrian_assets.core.data import app_db, linker
from mondrian_assets.core.data.link_cache import LinkStore
from mondrian_assets.core.data.new_examples import RetrainPolicy, WatchCursor, look
from mondrian_assets.core.state_db import state_engine
from mondrian_assets.definitions import defs
from mondrian_assets.defs import linking, sensors
from mondrian_assets.defs.partitions import ADVISOR_PARTITIONS_NAME
from mondrian_assets.defs.jobs import retrain_job
from mondrian_assets.defs.resources import MlxTrainer, MondrianDatabase, RetrainSettings
from mondrian_assets.defs.run_workers import MLX_POOL
from mondrian_assets.demo.app import append_demo_jobs, load_truth

POLICY = RetrainPolicy(min_new_examples=5, max_wait_s=600)


def link_state(loc) -> LinkStore:
    store = LinkStore(state_engine(loc.state_db))
    with app_db.read_only_engine(loc.db_path).connect() as conn:
        linker.link(conn, loc, store)
    return store


def look_at(loc, cursor: WatchCursor, now: float, policy: RetrainPolicy = POLICY):
    with app_db.read_only_engine(loc.db_path).connect() as conn:
        return look(conn, loc, cursor, policy, now)


def test_new_examples_wait_for_min_new_examples_then_form_one_batch(locations):
    store = link_state(locations)
    start = WatchCursor.after(linker.last_link(store, locations))
    first = look_at(locations, start, now=1000)
    assert first.new_examples == {} and first.due == []  # what the link saw is not new

    append_demo_jobs(locations.app_dir, 3, seed=1, both_eras=True)
    second = look_at(locations, first.cursor, now=1010)
    assert second.new_examples == {"ansel": 3} and second.due == []
    assert second.cursor.pending["ansel"].count == 3 and second.cursor.pending["ansel"].first_seen == 1010

    append_demo_jobs(locations.app_dir, 2, seed=2, both_eras=True)
    third = look_at(locations, second.cursor, now=1020)
    assert [(b.advisor, b.count, b.first_seen) for b in third.due] == [("ansel", 5, 1010)]
    assert "min_new_examples" in third.due[0].reason
    assert third.cursor.pending == {}
    # the look read the two new rows and the rows that were not finished, nothing else
    unfinished = len(first.cursor.jobs.open_rowids)
    assert third.rows_read - third.waiting_checked == 2 + unfinished


def test_max_wait_releases_a_batch_below_min_new_examples(locations):
    store = link_state(locations)
    cursor = look_at(locations, WatchCursor.after(linker.last_link(store, locations)), now=0).cursor
    append_demo_jobs(locations.app_dir, 2, seed=3, advisor="weston")
    waiting = look_at(locations, cursor, now=100)
    assert waiting.due == [] and waiting.cursor.pending["weston"].count == 2
    still = look_at(locations, waiting.cursor, now=100 + POLICY.max_wait_s - 1)
    assert still.due == []
    released = look_at(locations, still.cursor, now=100 + POLICY.max_wait_s)
    assert [(b.advisor, b.count) for b in released.due] == [("weston", 2)]
    assert "max_wait" in released.due[0].reason


def test_a_repeated_look_names_the_same_batch_and_the_next_one_finds_nothing(locations):
    store = link_state(locations)
    cursor = WatchCursor.after(linker.last_link(store, locations))
    append_demo_jobs(locations.app_dir, 6, seed=4, both_eras=True)
    once, again = look_at(locations, cursor, now=5), look_at(locations, cursor, now=9)
    assert [b.run_key for b in once.due] == [b.run_key for b in again.due] and len(once.due) == 1
    assert look_at(locations, once.cursor, now=10).due == []
    append_demo_jobs(locations.app_dir, 6, seed=5, both_eras=True)
    later = look_at(locations, once.cursor, now=20)
    assert len(later.due) == 1 and later.due[0].run_key != once.due[0].run_key  # a new batch, a new key


def test_an_analysis_file_written_later_for_a_finished_job_is_noticed(locations, pristine_demo):
    store = link_state(locations)
    cursor = look_at(locations, WatchCursor.after(linker.last_link(store, locations)), now=0).cursor
    assert len(cursor.waiting) >= len(pristine_demo.planted["missing_analysis"])  # jobs that wait for a file
    truth = {t["job_id"]: t for t in load_truth(locations.app_dir)}
    job_id = pristine_demo.planted["missing_analysis"][0]
    advisor = truth[job_id]["advisor"]
    valid = next(t["intended"] for t in truth.values() if t["intended"])
    (locations.analysis_dir / f"analysis-{advisor}-{job_id}.md").write_text(valid)
    seen = look_at(locations, cursor, now=1)
    assert seen.new_examples == {advisor: 1}
    assert len(seen.cursor.waiting) == len(cursor.waiting) - 1  # it no longer waits


def test_cursor_round_trips_and_stays_compact(locations):
    store = link_state(locations)
    cursor = look_at(locations, WatchCursor.after(linker.last_link(store, locations)), now=0).cursor
    append_demo_jobs(locations.app_dir, 2, seed=6)
    cursor = look_at(locations, cursor, now=1).cursor
    text = cursor.encode()
    assert WatchCursor.decode(text) == cursor
    assert len(text) < 2000
    assert WatchCursor.decode("not a cursor") is None


def test_without_any_link_every_linkable_job_is_new_spread_over_looks(locations):
    policy = RetrainPolicy(min_new_examples=5, max_wait_s=600, rows_per_look=50)
    cursor, looks, found = WatchCursor.after(None), 0, {}
    while True:
        seen = look_at(locations, cursor, now=looks, policy=policy)
        looks += 1
        for advisor, n in seen.new_examples.items():
            found[advisor] = found.get(advisor, 0) + n
        if seen.caught_up:
            break
        assert seen.due == []  # nothing is requested while a first look is still catching up
        cursor = seen.cursor
    assert looks >= 3
    with app_db.read_only_engine(locations.db_path).connect() as conn:
        counts = linker.link(conn, locations).advisor_counts()
    # screening skips image decoding and deduplication, so it counts every linked example and a few more
    assert all(found[a] >= n for a, n in counts.items())
    assert {b.advisor for b in seen.due} == {a for a, n in found.items() if n >= 5}


# --- the Dagster sensor ------------------------------------------------------------------------------------------


def tick(instance, mondrian_db, cursor, **settings) -> dg.SensorResult:
    context = dg.build_sensor_context(
        instance=instance, cursor=cursor,
        resources={"mondrian_db": mondrian_db, "retrain_settings": RetrainSettings(**settings)},
    )  # fmt: skip
    return sensors.retrain_sensor(context)


def test_sensor_requests_one_run_per_due_advisor_and_adds_new_advisors(locations, mondrian_db, instance):
    assert dg.materialize([linking.linked_records], resources={"mondrian_db": mondrian_db}, instance=instance).success
    first = tick(instance, mondrian_db, None, min_new_examples=3)
    assert not first.run_requests and first.skip_reason

    append_demo_jobs(locations.app_dir, 4, seed=7, both_eras=True)
    append_demo_jobs(locations.app_dir, 3, seed=8, advisor="gehry", both_eras=True)  # an advisor never seen
    second = tick(instance, mondrian_db, first.cursor, min_new_examples=3)
    assert sorted(r.partition_key for r in second.run_requests) == ["ansel", "gehry"]
    assert all(r.run_key and r.tags["mondrian/new_examples"] in ("3", "4") for r in second.run_requests)
    (add,) = second.dynamic_partitions_requests
    assert add.partitions_def_name == ADVISOR_PARTITIONS_NAME and list(add.partition_keys) == ["gehry"]

    # evaluate_tick (what the daemon calls) resolves the requests against the definitions: partitions, job
    context = dg.build_sensor_context(instance=instance, instance_ref=instance.get_ref(), cursor=first.cursor, definitions=defs, resources={
        "mondrian_db": mondrian_db, "retrain_settings": RetrainSettings(min_new_examples=3)})  # fmt: skip
    data = sensors.retrain_sensor.evaluate_tick(context)
    assert {r.run_key for r in data.run_requests} == {r.run_key for r in second.run_requests}
    assert [list(r.partition_keys) for r in data.dynamic_partitions_requests] == [["gehry"]]

    # a repeated tick (its cursor lost) asks for the same run keys: Dagster launches a run key once
    repeated = tick(instance, mondrian_db, first.cursor, min_new_examples=3)
    assert {r.run_key for r in repeated.run_requests} == {r.run_key for r in second.run_requests}
    # the next tick has nothing new
    assert not tick(instance, mondrian_db, second.cursor, min_new_examples=3).run_requests


def test_no_app_database_yet_is_a_skip_not_an_error(tmp_path, instance):
    empty = MondrianDatabase(app_dir=str(tmp_path / "no_app"), home=str(tmp_path / "home"))
    result = tick(instance, empty, None)
    assert not result.run_requests and "no app database" in result.skip_reason.skip_message


def test_an_app_never_linked_here_is_a_skip_until_its_first_link(locations, mondrian_db, instance):
    """A fresh home (`./dev ui` before `./dev demo`): no retrain of every advisor unasked; after the first link the
    next tick starts from it."""
    result = tick(instance, mondrian_db, None)
    assert not result.run_requests and "never linked" in result.skip_reason.skip_message and result.cursor is None
    link_state(locations)
    after = tick(instance, mondrian_db, None)
    assert not after.run_requests and after.cursor is not None  # what the first link took is not new


def test_retrain_job_links_then_runs_everything_after_for_one_advisor():
    job = defs.resolve_job_def("retrain_job")
    assets = {key.to_user_string() for key in job.asset_layer.selected_asset_keys}
    assert {"linked_records", "train_split", "val_split", "lora_adapter", "eval_report", "deployed_version"} <= assets
    assert job.partitions_def.name == ADVISOR_PARTITIONS_NAME
    assert sensors.retrain_sensor.job_name == "retrain_job"
    assert sensors.retrain_sensor.default_status == dg.DefaultSensorStatus.RUNNING


@pytest.fixture
def project_instance():
    """An instance with the project's dagster.yaml, launching runs into a recorder instead of processes."""
    settings = yaml.safe_load(INSTANCE_TEMPLATE.read_text())
    overrides = {**settings, "run_launcher": {"module": "dagster._core.test_utils", "class": "MockedRunLauncher"}}
    with dg.instance_for_test(overrides=overrides) as instance:
        yield instance


def test_sensor_schedule_and_manual_launch_for_one_advisor_run_one_at_a_time(project_instance):
    """weston's retrain requested by the sensor, its nightly re-check by the schedule and a manual launch, all
    queued at the same moment, with one manual run for ansel: the run queue starts ansel's run and one of weston's
    at once, and each next weston run only once the one before has ended; none is lost, none runs twice."""

    def queued(job: str, advisor: str, tags: dict[str, str]):
        location = RemoteRepositoryOrigin(RegisteredCodeLocationOrigin("mondrian_assets"), "__repository__")
        return create_run_for_test(project_instance, job_name=job, status=DagsterRunStatus.QUEUED,
                                   remote_job_origin=RemoteJobOrigin(location, job),
                                   tags={"dagster/partition": advisor, **tags})  # fmt: skip

    runs = [queued("retrain_job", "weston", {"dagster/sensor_name": "retrain_sensor", "dagster/run_key": "weston-1"}),
            queued("nightly_evaluation_job", "weston", {"dagster/schedule_name": "nightly_evaluation_schedule"}),
            queued("retrain_job", "weston", {}),  # launched by hand in the UI
            queued("retrain_job", "ansel", {})]  # fmt: skip
    weston, ansel = runs[:3], runs[3]
    started: list[str] = []
    with WorkspaceProcessContext(project_instance, EmptyWorkspaceTarget()) as workspace:
        for _ in range(len(weston)):
            list(QueuedRunCoordinatorDaemon(interval_seconds=1).run_iteration(workspace))
            status = {r.run_id: project_instance.get_run_by_id(r.run_id).status for r in runs}
            running = [r.run_id for r in weston if status[r.run_id] == DagsterRunStatus.STARTING]
            assert len(running) == 1, status  # one run of weston at a time, whoever asked
            assert status[ansel.run_id] != DagsterRunStatus.QUEUED  # another advisor is not held back
            started.append(running[0])
            project_instance.report_run_failed(project_instance.get_run_by_id(running[0]))  # it ends; the next may start
    assert sorted(started) == sorted(r.run_id for r in weston)  # every request ran, each once


def test_one_mlx_step_per_machine(project_instance):
    for name in ("lora_adapter", "eval_report"):
        assert defs.resolve_assets_def(name).op.pool == MLX_POOL
    ansel, weston = (create_run_for_test(project_instance, job_name="retrain_job") for _ in range(2))
    with InstanceConcurrencyContext(project_instance, ansel) as first, \
            InstanceConcurrencyContext(project_instance, weston) as second:  # fmt: skip
        assert first.claim(MLX_POOL, "lora_adapter")
        assert not second.claim(MLX_POOL, "lora_adapter")  # waits for the slot
        project_instance.event_log_storage.free_concurrency_slot_for_step(ansel.run_id, "lora_adapter")
        deadline = time.monotonic() + 20
        while not second.claim(MLX_POOL, "lora_adapter"):  # the waiting step polls, as the executor does
            assert time.monotonic() < deadline, "the freed slot never went to the waiting step"
            time.sleep(0.2)


def test_after_the_demo_demo_data_add_and_one_tick_request_one_run_per_affected_advisor(locations, instance, mondrian_db, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(locations.home / ".dagster"))
    assert cli_main(["link", "--app-dir", str(locations.app_dir), "--home", str(locations.home)]) == 0
    baseline = tick(instance, mondrian_db, None)
    assert cli_main(["demo-data", "--add", "20", "--app-dir", str(locations.app_dir)]) == 0
    result = tick(instance, mondrian_db, baseline.cursor)
    assert sorted(r.partition_key for r in result.run_requests) == ["ansel", "weston"]
    assert [r.tags["mondrian/new_examples"] for r in result.run_requests] == ["10", "10"]


@pytest.mark.slow  # a short real training run and evaluation
def test_a_requested_retrain_runs_link_to_a_registry_decision(locations, mondrian_db, instance, embedded_base):
    """The sensor's request, run as the daemon would run it: retrain_job for that advisor partition, with the
    request's tags, from linking new jobs to the registry's decision (a short real training run)."""
    assert dg.materialize([linking.linked_records], resources={"mondrian_db": mondrian_db}, instance=instance).success
    baseline = tick(instance, mondrian_db, None)
    append_demo_jobs(locations.app_dir, 10, seed=9, advisor="weston", both_eras=True)
    (request,) = tick(instance, mondrian_db, baseline.cursor).run_requests
    assert request.partition_key == "weston"

    trainer = MlxTrainer(base_model=str(embedded_base), iters=12, eval_interval=6, save_interval=6, warmup_steps=2)
    resources = {"mondrian_db": mondrian_db, "mlx_trainer": trainer, "retrain_settings": RetrainSettings()}
    job = dg.Definitions(assets=defs.assets, asset_checks=defs.asset_checks, jobs=[retrain_job],
                         resources=resources).resolve_job_def("retrain_job")  # fmt: skip
    small_eval = {"ops": {"eval_report": {"config": {"max_examples": 2, "max_tokens": 24, "batch_size": 2}}}}
    result = job.execute_in_process(run_config=small_eval, instance=instance, partition_key=request.partition_key,
                                    tags=request.tags, raise_on_error=False)  # fmt: skip
    assert result.success
    linked = result.asset_materializations_for_node("linked_records")[0].metadata
    assert linked["jobs_read"].value < 40  # the link read the new rows, not the app
    decision = result.asset_materializations_for_node("deployed_version")[0].metadata["decision"].value
    assert decision in ("promote", "reject")
