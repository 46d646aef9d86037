"""The advisor service end to end: `mondrian-assets serve` in its own process, real HTTP on loopback, the real
embedded model with real (tiny, quickly trained) adapters, the usage rows read back from the state DB."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from mondrian_assets.core import schema
from mondrian_assets.core.data import app_db
from mondrian_assets.core.registry import decisions
from mondrian_assets.core.registry.versions import register_version
from mondrian_assets.core.serving.routing import ServiceMode, route
from mondrian_assets.core.state_db import state_engine
from mondrian_assets.core.training.config import TrainConfig
from mondrian_assets.core.training.loop import train_lora
from mondrian_assets_tests.service_helpers import Service, jpeg_bytes, launch_service

# --- fixtures: adapters, versions, a running service ------------------------------------------------------------


def _ansel_prompt(app_dir: Path) -> str:
    with app_db.read_only_engine(app_dir / "mondrian.db").connect() as conn:
        return schema.build_prompt(app_db.read_system_prompt(conn), app_db.read_advisors(conn)["ansel"].prompt)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, embedded_base, pristine_demo) -> dict[str, Path]:
    """Two real adapters on the embedded base, trained on the demo app's own ansel prompt: `shaped` (enough steps
    to write most of an analysis) and `early` (a few steps: different outputs, no shape)."""
    root = tmp_path_factory.mktemp("adapters")
    prompt = _ansel_prompt(pristine_demo.app_dir)
    rows = []
    for i in range(8):
        image = root / f"{i}.jpg"
        image.write_bytes(jpeg_bytes(i))
        dims = tuple(schema.Dimension(n, float(3 + (i + k) % 6), f"{n} reads well.", "Keep it.")
                     for k, n in enumerate(schema.DIMENSION_NAMES[:7]))  # fmt: skip
        answer = schema.canonical_json(schema.Analysis(f"Scene {i}.", dims, float(4 + i % 5), ("Light",), ("Focus",), "Zone V."))
        rows.append({"images": [str(image)], "messages": schema.chat_messages(prompt, answer)})
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = {}
    for name, iters, rate in (("shaped", 24, 2e-3), ("early", 4, 1e-3)):
        config = TrainConfig(base_model=str(embedded_base), iters=iters, learning_rate=rate, warmup_steps=2,
                             eval_interval=100, save_interval=100, seed=3)  # fmt: skip
        out[name] = Path(train_lora(config, data, None, root / name, data_version="serving-test").adapter_dir)
    return out


def _deploy(home: Path, number: int) -> None:
    """Make version `number` active through the registry (pin it, then unpin: it stays active)."""
    engine = state_engine(home / "mondrian_assets.db")
    decisions.pin(engine, home / "models", "ansel", number=number, actor="test")
    decisions.unpin(engine, home / "models", "ansel", actor="test")


def _rollback(home: Path, to: int | None = None) -> None:
    decisions.rollback(state_engine(home / "mondrian_assets.db"), home / "models", "ansel", to=to, actor="test")


@pytest.fixture(scope="module")
def home(tmp_path_factory, adapters) -> Path:
    """A MONDRIAN_HOME whose registry holds ansel v1 (`shaped`, active) and v2 (`early`)."""
    home = tmp_path_factory.mktemp("home")
    engine = state_engine(home / "mondrian_assets.db")
    for name in ("shaped", "early"):
        register_version(engine, home / "models", "ansel", adapters[name], report=None, metrics={}, gates_passed=True)
    _deploy(home, 1)
    return home


@pytest.fixture(scope="module")
def start_service(embedded_base, pristine_demo, home) -> Iterator:
    started: list[Service] = []

    def start(*options: str) -> Service:
        started.append(launch_service(home, pristine_demo.app_dir, embedded_base, *options))
        return started[-1]

    yield start
    for service in started:
        service.stop()


@pytest.fixture(scope="module")
def service(start_service) -> Service:
    return start_service("--mode", "fine_tuned", "--max-tokens", "600", "--max-upload-mb", "1", "--max-waiting", "8")


# --- modes ----------------------------------------------------------------------------------------------------


def test_health_names_the_base_the_mode_and_each_advisors_active_version(service):
    health = service.health()
    assert health["status"] == "UP" and health["mode"] == "fine_tuned" and health["fine_tuned"] is True
    assert health["advisors"]["ansel"] == {"active_version": 1, "adapter": str(service.home / "models/versions/ansel-v1")}
    assert health["advisors"]["watkins"] == {"active_version": None}
    assert health["constrained"] is True and health["workers"]["ready"] == 1


def test_each_mode_answers_with_the_model_it_names(service):
    image = jpeg_bytes(100)
    tuned = service.post(image, advisor="ansel", mode="baseline", enable_rag="false")  # what the app sends
    assert tuned.status_code == 200
    body = tuned.json()
    assert (body["model_used"], body["version"], body["mode"]) == ("fine_tuned", 1, "fine_tuned")
    assert body["adapter"].endswith("ansel-v1") and body["adapter_tensors_verified"] > 0
    assert "names no model choice" in body["note"]
    # a finished answer is schema-valid (the grammar's guarantee; the grammar itself is tested in
    # test_serving_core), and the app's fields come with it; a cut-off one (token budget, loop guard) says so
    parsed = schema.parse_analysis(body["full_response"])
    assert body["parse_success"] is parsed.ok and (parsed.ok or body["finish_reason"] in ("length", "repetition")), body
    if parsed.ok:
        assert body["analysis"] == schema.analysis_to_dict(parsed.analysis)
        assert body["overall_score"] == body["analysis"]["overall_score"]
        assert "Overall Grade" in body["analysis_html"] and body["summary_html"]
    else:
        assert body["analysis"] is None and "could not be read" in body["analysis_html"]
    assert body["advisor_bio"] and body["advisor_bio_html"]
    assert body["job_id"].startswith("image-")  # no job id sent: one derived from the image

    base = service.post(image, advisor="ansel", mode="base").json()
    assert (base["model_used"], base["version"], base["adapter"]) == ("base", None, None)
    assert base["full_response"] != body["full_response"]
    assert service.post(image, advisor="ansel", mode="lora").json()["full_response"] == body["full_response"]


def test_ab_arm_follows_the_job_id_and_repeats(service):
    jobs = [f"job-{i}" for i in range(10)]
    first = {j: service.post(jpeg_bytes(200 + i), advisor="ansel", job_id=j, mode="ab_test").json() for i, j in enumerate(jobs)}
    for job, body in first.items():
        assert body["model_used"] == route(ServiceMode.AB_TEST, None, job, 0.5).model
        assert body["job_id"] == job and body["mode"] == "ab_test" and 0 <= body["arm_draw"] < 1
    again = service.post(jpeg_bytes(999), advisor="ansel", job_id=jobs[0], mode="ab_test").json()
    assert again["model_used"] == first[jobs[0]]["model_used"]
    assert {b["model_used"] for b in first.values()} == {"base", "fine_tuned"}  # both arms met in 10 jobs


def test_fine_tuned_without_an_active_version_is_refused_not_substituted(service):
    refused = service.post(jpeg_bytes(1), advisor="watkins")
    assert refused.status_code == 409 and refused.json()["error"] == "no_active_version"
    assert service.post(jpeg_bytes(1), advisor="watkins", mode="base").json()["model_used"] == "base"


# --- bad input ------------------------------------------------------------------------------------------------


def _png_bomb() -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = zlib.compress(b"\0" * (30_000 * 3 + 1) * 64, 9)  # a few KB that would inflate to gigabytes in full
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30_000, 30_000, 8, 2, 0, 0, 0)) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def test_bad_requests_are_refused_with_a_reason_and_still_counted(service):
    before = len(service.usage_rows())
    cases = [
        (service.post(jpeg_bytes(1), advisor="nobody"), 404, "unknown_advisor"),
        (service.post(jpeg_bytes(1)[:2000], advisor="ansel"), 400, "corrupt_image"),
        (service.post(b"just text, not a picture", advisor="ansel"), 415, "not_an_image"),
        (service.post(_png_bomb(), advisor="ansel"), 413, "too_many_pixels"),
        (service.post(jpeg_bytes(1, size=(1400, 1000)) + os.urandom(1_100_000), advisor="ansel"), 413, "request_too_large"),
        (requests.post(f"{service.url}/analyze", files={"photo": ("a.jpg", jpeg_bytes(1))}, data={"advisor": "ansel"},
                       timeout=10), 400, "no_image"),  # fmt: skip
        (requests.post(f"{service.url}/analyze", json={"advisor": "ansel"}, timeout=10), 415, "not_multipart"),
    ]
    for response, status, code in cases:
        assert (response.status_code, response.json()["error"]) == (status, code), response.text
    rows = service.usage_rows()[before:]
    assert [(r["http_status"], r["error"].split(":")[0]) for r in rows] == [(s, c) for _, s, c in cases]
    assert all(r["model_used"] is None for r in rows)
    assert service.post(jpeg_bytes(2), advisor="ansel").status_code == 200  # and the service is unharmed


def test_every_request_is_one_usage_row_written_before_the_answer(service):
    before = len(service.usage_rows())
    bodies = [service.post(jpeg_bytes(300 + i), advisor="ansel", mode=m).json() for i, m in enumerate(["base", "fine_tuned", "x"])]
    rows = service.usage_rows()[before:]
    assert [r["id"] for r in rows] == [b["usage_id"] for b in bodies]
    for row, body in zip(rows, bodies, strict=True):
        assert (row["model_used"], row["version"], row["parse_ok"]) == (body["model_used"], body["version"], body["parse_success"])
        assert row["requested_mode"] in ("base", "fine_tuned", "x") and row["latency_s"] > 0
    all_rows = service.usage_rows()
    assert len(all_rows) == len({r["id"] for r in all_rows})


def test_usage_command_summarizes_the_rows(service):
    rows = service.usage_rows()
    out = subprocess.run([sys.executable, "-m", "mondrian_assets.cli", "usage", "--home", str(service.home)],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    total = next(line for line in out.splitlines() if line.strip().startswith("all")).split()
    assert int(total[1]) == len(rows) and int(total[2]) == sum(r["http_status"] == 200 for r in rows)
    assert "ansel / fine_tuned" in out and "ansel / base" in out and "A/B test" in out and "ansel-v1:" in out
    status = subprocess.run([sys.executable, "-m", "mondrian_assets.cli", "status", "--home", str(service.home)],
                            capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "ansel-v1" in status and "usage per advisor and model" in status


# --- switching versions while serving -------------------------------------------------------------------------


def test_deploy_and_rollback_switch_the_next_request_without_failing_running_ones(service):
    image = jpeg_bytes(400)
    answers: list[dict] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            response = service.post(image, advisor="ansel")
            answers.append({"status": response.status_code, **response.json(), "ended": time.monotonic()})

    def wait_for(version: int) -> float:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if any(a.get("version") == version and a["ended"] > switched for a in answers):
                return time.monotonic()
            time.sleep(0.05)
        raise AssertionError(f"no answer from v{version}")

    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(client) for _ in range(2)]
        time.sleep(1.0)
        switched = time.monotonic()
        _deploy(service.home, 2)
        wait_for(2)
        switched = time.monotonic()
        _rollback(service.home)  # to v1
        wait_for(1)
        stop.set()
        for run in runs:
            run.result()
    assert [a for a in answers if a["status"] != 200] == []
    texts = {v: {a["full_response"] for a in answers if a["version"] == v} for v in (1, 2)}
    # each version always gives its own (greedy) answer: a reported version is the one that was applied
    assert len(texts[1]) == 1 and len(texts[2]) == 1 and texts[1] != texts[2]
    assert service.health()["advisors"]["ansel"]["active_version"] == 1


def test_a_version_whose_files_no_longer_match_the_registry_is_not_served_under_its_name(service, adapters):
    import shutil

    engine = state_engine(service.home / "mondrian_assets.db")
    copy = service.home / "early-copy"
    shutil.copytree(adapters["early"], copy)
    (copy / "adapter_config.json").write_text((copy / "adapter_config.json").read_text() + "\n")  # new content
    version, _ = register_version(engine, service.home / "models", "ansel", copy, report=None, metrics={}, gates_passed=True)
    weights = version.path / "adapters.safetensors"
    weights.chmod(0o644)
    weights.write_bytes((adapters["shaped"] / "adapters.safetensors").read_bytes())  # tampered after registration
    _deploy(service.home, version.number)
    try:
        refused = service.post(jpeg_bytes(450), advisor="ansel")
        assert refused.status_code == 500 and "content hash differs" in refused.json()["message"]
        assert service.usage_rows()[-1]["version"] is None  # the row does not claim a version either
    finally:
        _rollback(service.home, to=1)
    assert service.post(jpeg_bytes(450), advisor="ansel").json()["version"] == 1


# --- crashes --------------------------------------------------------------------------------------------------


def test_a_killed_worker_fails_its_request_only_and_the_next_one_works(service):
    pid = service.health()["workers"]["worker_pids"][0]
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(service.post, jpeg_bytes(500), advisor="ansel", mode="base")
        deadline = time.monotonic() + 30
        while service.health()["workers"]["busy"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.kill(pid, signal.SIGKILL)
        response = running.result()
    assert response.status_code == 500 and response.json()["error"] == "worker_died"
    assert "SIGKILL" in service.usage_rows()[-1]["error"]
    after = service.post(jpeg_bytes(501), advisor="ansel", mode="base")  # waits for the replacement worker
    assert after.status_code == 200
    workers = service.health()["workers"]
    assert workers["restarts"] == 1 and pid not in workers["worker_pids"]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/status").is_file() and "zombie" in Path(f"/proc/{pid}/status").read_text()


def test_a_killed_service_leaves_whole_usage_rows_and_restarts_serving_the_active_version(start_service):
    victim = start_service("--mode", "fine_tuned", "--max-tokens", "600", "--max-waiting", "8")
    first_new_id = max((r["id"] for r in victim.usage_rows()), default=0) + 1
    workers = victim.health()["workers"]["worker_pids"]
    with ThreadPoolExecutor(4) as pool:
        posts = [pool.submit(victim.post, jpeg_bytes(700 + i), advisor="ansel", job_id=f"kill-{i}") for i in range(8)]
        deadline = time.monotonic() + 120
        while not any(p.done() for p in posts):  # kill -9 while some answers are out and others running or queued
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(victim.process.pid, signal.SIGKILL)
        victim.process.wait(timeout=30)
        outcomes = [p.exception() or p.result() for p in posts]
    answered = [o.json() for o in outcomes if isinstance(o, requests.Response)]
    assert answered and len(answered) < len(posts), "the kill must come between two answers"
    assert all(a["version"] == 1 for a in answered)
    deadline = time.monotonic() + 60
    while not all(_gone(pid) for pid in workers):  # its workers see the pipe close and exit: no orphaned model
        assert time.monotonic() < deadline, "a worker outlived its killed service"
        time.sleep(0.2)

    with sqlite3.connect(victim.home / "mondrian_assets.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    rows = [r for r in victim.usage_rows() if r["id"] >= first_new_id]
    # every answer had its row before it was sent; a row is one INSERT: whole or absent, never half written
    assert {a["usage_id"] for a in answered} <= {r["id"] for r in rows} and len(rows) <= len(posts)
    for row in rows:
        assert row["job_id"].startswith("kill-") and row["http_status"] == 200 and row["latency_s"] > 0
        assert (row["model_used"], row["version"]) == ("fine_tuned", 1) and row["finish_reason"] is not None

    restarted = start_service("--mode", "fine_tuned", "--max-tokens", "600")
    assert restarted.health()["advisors"]["ansel"]["active_version"] == 1
    before = answered[0]
    again = restarted.post(jpeg_bytes(700 + int(before["job_id"].split("-")[1])), advisor="ansel", job_id=before["job_id"])
    assert again.status_code == 200 and again.json()["version"] == 1
    assert again.json()["full_response"] == before["full_response"]  # the same version's same (greedy) answer


# --- load and shutdown ----------------------------------------------------------------------------------------


def test_a_full_queue_answers_503_and_shutdown_finishes_running_work_and_fails_queued_work(start_service):
    """One worker, one queue slot. The worker is paused (SIGSTOP) while it holds a request, so the request stays
    running however fast the machine is."""
    slow = start_service("--mode", "base", "--max-tokens", "600", "--max-waiting", "1", "--missing-version", "base")
    fallback = slow.post(jpeg_bytes(600), advisor="watkins", mode="fine_tuned").json()  # configured fallback: said so
    assert fallback["model_used"] == "base" and "no active fine-tuned version" in fallback["note"]
    before = len(slow.usage_rows())
    worker = slow.health()["workers"]["worker_pids"][0]

    def wait_for(busy: int, waiting: int) -> None:
        deadline = time.monotonic() + 30
        while (slow.health()["workers"]["busy"], slow.health()["workers"]["waiting"]) != (busy, waiting):
            assert time.monotonic() < deadline, slow.health()["workers"]
            time.sleep(0.02)

    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(slow.post, jpeg_bytes(601), advisor="ansel")
        wait_for(1, 0)
        os.kill(worker, signal.SIGSTOP)
        try:
            queued = pool.submit(slow.post, jpeg_bytes(602), advisor="ansel")
            wait_for(1, 1)
            refused = slow.post(jpeg_bytes(603), advisor="ansel")
            assert refused.status_code == 503 and refused.json()["error"] == "saturated"
            slow.process.send_signal(signal.SIGTERM)
            assert queued.result().status_code == 503 and queued.result().json()["error"] == "unavailable"
            assert not running.done()
        finally:
            os.kill(worker, signal.SIGCONT)
        assert running.result().status_code == 200  # finished, not cut off
    slow.process.wait(timeout=60)  # uvicorn re-raises the signal once it has shut down cleanly
    assert "Application shutdown complete" in slow.process.stdout.read()
    rows = slow.usage_rows()[before:]
    assert sorted(r["http_status"] for r in rows) == [200, 503, 503]
