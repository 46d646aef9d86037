"""kill -9 in the middle of linking or splitting, then a re-run: the result equals an uninterrupted run's and no
output is ever half written (the link cache is written in one transaction, every file by rename)."""

import json
import os
import pickle
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


SPLIT = """import pickle, sys
from pathlib import Path
from mondrian_assets.core.data import splits
records, training_data = pickle.loads(Path(sys.argv[1]).read_bytes()), Path(sys.argv[2])
for advisor in sorted(set(records["advisor"])):
    print(advisor, flush=True)
    split = splits.split_advisor(advisor, records, "Critique this photograph.", splits.SplitConfig(),
                                 training_data / "images")
    splits.write_split(split, splits.SplitConfig(), training_data)
"""


def _split_files(training_data) -> dict[str, bytes]:
    """Every output file but the scratch files a killed writer may leave (dot-named; nothing reads them), with
    the folder's own path taken out so two runs in two folders compare."""
    return {str(p.relative_to(training_data)): p.read_bytes().replace(str(training_data).encode(), b"<td>")
            for p in sorted(training_data.rglob("*")) if p.is_file() and not p.name.startswith(".")}  # fmt: skip


@pytest.mark.parametrize("nth", [0, -1])
def test_split_killed_mid_run_then_rerun_equals_an_uninterrupted_split(pristine_demo, tmp_path, nth):
    """Killed as it starts the first advisor (nothing written yet) or the last one (the others' files written)."""
    loc = Locations.resolve(app_dir=str(pristine_demo.app_dir), home=str(tmp_path / "home"), environ={})
    with app_db.read_only_engine(loc.db_path).connect() as conn:
        records = linker.link(conn, loc).records
    request = tmp_path / "records.pkl"
    request.write_bytes(pickle.dumps(records))
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    subprocess.run([sys.executable, "-c", SPLIT, str(request), str(clean)], check=True, capture_output=True)

    child = subprocess.Popen([sys.executable, "-c", SPLIT, str(request), str(killed)], stdout=subprocess.PIPE, text=True)
    victim = sorted(set(records["advisor"]))[nth]
    while (line := child.stdout.readline()).strip() != victim:
        assert line, "the split ended before reaching the advisor"
    os.kill(child.pid, signal.SIGKILL)  # while it prepares that advisor's images
    assert child.wait() == -signal.SIGKILL
    interrupted, expected = (_split_files(killed) if killed.exists() else {}), _split_files(clean)
    assert interrupted != expected
    assert {name: expected[name] for name in interrupted} == interrupted  # what the kill left: whole files only

    subprocess.run([sys.executable, "-c", SPLIT, str(request), str(killed)], check=True, capture_output=True)
    assert _split_files(killed) == _split_files(clean)
