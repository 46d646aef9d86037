"""kill -9 in the middle of linking, then a re-run: the result equals an uninterrupted run's and the manifest is
never half written (the link cache is written in one transaction, the manifest by rename)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from mondrian_assets.core.data import app_db, linker
from mondrian_assets.core.data.link_cache import LinkStore
from mondrian_assets.core.state_db import state_engine
from mondrian_assets.core.locations import Locations

LINK = """import sys
from mondrian_assets.core.data import app_db, linker
from mondrian_assets.core.data.link_cache import LinkStore
from mondrian_assets.core.state_db import state_engine
from mondrian_assets.core.locations import Locations
loc = Locations.resolve(app_dir=sys.argv[1], home=sys.argv[2], environ={})
with app_db.read_only_engine(loc.db_path).connect() as conn:
    print("linking", flush=True)
    linker.write_manifest(linker.link(conn, loc, LinkStore(state_engine(loc.state_db)), workers=1), loc)
"""


def _records(loc: Locations) -> list[dict]:
    manifest = json.loads(loc.manifest_path.read_text())
    return sorted((r | {"advisor": a} for a, info in manifest["by_advisor"].items() for r in info["records"]),
                  key=lambda r: r["job_id"])  # fmt: skip


@pytest.mark.parametrize("delay_s", [0.2, 1.0])
def test_link_killed_mid_run_then_rerun_equals_an_uninterrupted_link(pristine_demo, tmp_path, delay_s):
    app = str(pristine_demo.app_dir)
    clean = Locations.resolve(app_dir=app, home=str(tmp_path / "clean"), environ={})
    with app_db.read_only_engine(clean.db_path).connect() as conn:
        linker.write_manifest(linker.link(conn, clean), clean)

    home = tmp_path / "killed"
    child = subprocess.Popen([sys.executable, "-c", LINK, app, str(home)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "linking"
    time.sleep(delay_s)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    loc = Locations.resolve(app_dir=app, home=str(home), environ={})
    if loc.manifest_path.exists():  # the kill came after the rename: then it is the whole manifest
        assert _records(loc) == _records(clean)

    rerun = subprocess.run([sys.executable, "-c", LINK, app, str(home)], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert _records(loc) == _records(clean)
    assert [p.name for p in loc.training_data.iterdir() if p.name.startswith(".")] == []
    # the cache a killed run may have left is usable: a third run reads everything from it
    store = LinkStore(state_engine(loc.state_db))
    with app_db.read_only_engine(loc.db_path).connect() as conn:
        again = linker.link(conn, loc, store)
    assert again.cache_misses == 0 and sorted(again.records["job_id"]) == [r["job_id"] for r in _records(clean)]
