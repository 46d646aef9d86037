"""The web UI in a real browser: `mondrian-assets ui` (webserver and daemon) on a fresh home, driven by headless
Chromium through Playwright, as a user would: the asset graph, a run launched from the launchpad for one advisor
partition with small training settings, the run's success, the `eval_report` metadata. Screenshots are saved
(the folder is printed). Run with `./dev test -m browser`; `.ci/run` installs Debian's chromium and runs it.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import dagster as dg
import pytest

from mondrian_assets_tests.service_helpers import free_port

pytestmark = pytest.mark.browser

ASSETS = ("linked_records", "train_split", "val_split", "lora_adapter", "eval_report", "deployed_version",
          "active_version_evaluation")
VIEWPORT, GRAPH_VIEWPORT = {"width": 1600, "height": 1000}, {"width": 3600, "height": 1400}
ADVISOR = "weston"  # a small demo advisor (13 train / 2 val): a short run
# Small settings, typed into the launchpad: a few training steps and a short evaluation
RUN_CONFIG = (
    "{ops: {eval_report: {config: {max_examples: 2, max_tokens: 48}}}, resources: {mlx_trainer: {config: "
    "{iters: 12, eval_interval: 6, save_interval: 6, warmup_steps: 2}}}}"
)
CHROMIUM_ARGS = [
    "--no-sandbox",  # CI runs as root
    "--disable-background-networking",  # no internet here: nothing may phone home
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-sync",
    "--no-first-run",
]


def _wait_until_serving(url: str, server: subprocess.Popen, log: Path, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"`mondrian-assets ui` exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/server_info", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    pytest.fail(f"the web UI did not answer within {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def ui_server(tmp_path):
    """`mondrian-assets ui` on a free port of 127.0.0.1, on a fresh home (it generates the demo app there)."""
    home, port = tmp_path / "home", free_port()
    log = tmp_path / "ui.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MONDRIAN_", "DAGSTER_"))}
    with log.open("w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "mondrian_assets.cli", "ui", "--home", str(home), "--host", "127.0.0.1",
             "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_serving(url, server, log)
        yield url, home
    finally:
        os.killpg(server.pid, signal.SIGINT)  # what Ctrl-C sends: dagster dev stops the webserver and the daemon
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@pytest.fixture
def browser():
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("Debian's chromium is not installed: apt-get install -y chromium (.ci/run does this)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def _dismiss_first_visit_dialogs(page) -> None:
    """Dagster's community dialog opens once on a new instance, a moment after a page has loaded: whenever it
    shows, Playwright skips it before the next action."""
    page.add_locator_handler(page.get_by_role("button", name="Skip", exact=True), lambda skip: skip.click())


def _wait_for_run(page, timeout_s: float) -> str:
    """On a run's page: wait for its status tag to settle, return it (Success, Failure or Canceled)."""
    from playwright.sync_api import expect

    status = page.locator("[class*='PageHeader_titleAndTags'] .BaseTag").first
    expect(status).to_have_text(re.compile(r"^(Success|Failure|Canceled)$"), timeout=timeout_s * 1000)
    return status.inner_text()


def test_ui_shows_the_graph_launches_an_advisor_run_and_its_eval_report(ui_server, browser, tmp_path_factory):
    url, home = ui_server
    shots = tmp_path_factory.mktemp("ui_screenshots")
    print(f"\nscreenshots: {shots}")
    page = browser.new_page(viewport=VIEWPORT)
    page.set_default_timeout(60_000)
    try:
        _drive_the_ui(page, url, home, shots)
    except Exception:
        page.screenshot(path=shots / "failure.png")
        print(f"failure screenshot: {shots / 'failure.png'}")
        raise


def _drive_the_ui(page, url: str, home: Path, shots: Path) -> None:
    from playwright.sync_api import expect

    expect.set_options(timeout=60_000)  # pages load slowly on a busy 2-core machine
    # the asset graph: every asset of the loop, around lora_adapter at full depth
    _dismiss_first_visit_dialogs(page)
    page.goto(f"{url}/assets/lora_adapter?view=lineage")
    page.set_viewport_size(GRAPH_VIEWPORT)  # the graph draws only the nodes in view: make room for all of them
    page.locator("button").filter(has_text=re.compile(r"^All$")).click()
    graph_nodes = page.locator("foreignObject")
    for asset in ASSETS:
        expect(graph_nodes.filter(has_text=re.compile(rf"^{asset}")).first).to_be_visible()
    page.screenshot(path=shots / "1_asset_graph.png")
    page.set_viewport_size(VIEWPORT)

    # link the app's jobs (this also adds the advisor partitions), from the asset's own page
    page.goto(f"{url}/assets/linked_records")
    page.locator("button").filter(has_text=re.compile(r"^Materialize$")).click()
    page.locator("a[href^='/runs/']").first.click()  # the in-progress run, under "Latest materialization"
    assert _wait_for_run(page, timeout_s=900) == "Success"  # a loaded 2-core machine took more than 300 s

    # one advisor's split, training and evaluation: its partition and small settings in the launchpad
    page.goto(f"{url}/locations/mondrian_assets/jobs/advisor_job/playground")
    page.get_by_placeholder("Partition").click()
    page.get_by_role("menuitem", name=ADVISOR, exact=True).click()
    editor = page.locator(".CodeMirror").first
    editor.click()
    page.keyboard.press("Control+A")
    page.keyboard.insert_text(RUN_CONFIG)  # inserted as typed text, without the editor's auto-indent
    page.keyboard.press("Home")  # back to the start of the line for the screenshot
    expect(page.get_by_text("No errors")).to_be_visible()
    page.screenshot(path=shots / "2_launchpad.png")
    page.get_by_role("button", name="Launch Run").click()
    page.wait_for_url("**/runs/**")
    run_id = page.url.rstrip("/").rsplit("/", 1)[-1]
    status = _wait_for_run(page, timeout_s=900)
    page.screenshot(path=shots / "3_advisor_run.png")
    assert status == "Success", f"run {run_id} ended {status}; see {shots / '3_advisor_run.png'}"

    # the evaluation as the UI shows it: the materialization's metadata for this advisor
    page.goto(f"{url}/assets/eval_report?view=events&partition={ADVISOR}")
    expect(page.get_by_text("fine_tuned_format_compliance").first).to_be_visible()
    expect(page.get_by_text("verdict", exact=True).first).to_be_visible()
    page.screenshot(path=shots / "4_eval_report_metadata.png", full_page=True)

    # what the UI showed is what the instance recorded
    instance = dg.DagsterInstance.from_config(str(home / ".dagster"))
    run = instance.get_run_by_id(run_id)
    assert run is not None and run.status == dg.DagsterRunStatus.SUCCESS
    assert run.tags["dagster/partition"] == ADVISOR
    event = instance.get_latest_materialization_event(dg.AssetKey("eval_report"))
    assert event is not None and event.asset_materialization.partition == ADVISOR
    assert (home / "evaluation" / ADVISOR / "comparison_report.json").is_file()
    decision = instance.get_latest_materialization_event(dg.AssetKey("deployed_version"))
    assert decision is not None and decision.asset_materialization.partition == ADVISOR
