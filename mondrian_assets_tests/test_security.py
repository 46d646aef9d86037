"""Security of the default path: no network outside loopback, file reads only inside the configured roots, and
the app's DB and files byte-identical after a full run (link, split, train, evaluate)."""

import hashlib
import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import dagster as dg
import guards
import pytest

from mondrian_assets.defs import evaluation, linking, splits, training
from mondrian_assets.defs.resources import MlxTrainer

ASSETS = [linking.linked_records, splits.advisor_splits, training.lora_adapter, evaluation.eval_report]
CHILD_CONNECT = "import socket\ntry:\n    socket.create_connection(('192.0.2.1', 9), timeout=2)\nexcept OSError as e:\n    print(type(e).__name__)"


def test_the_guard_refuses_the_network_here_and_in_child_processes(tmp_path):
    """The enforcement the full-run test relies on: it must catch this process and its Python children."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    with guards.guarded(tmp_path / "guard.jsonl", (tmp_path / "watched",)) as events:
        with pytest.raises(guards.NetworkRefused):
            socket.create_connection(("192.0.2.1", 9), timeout=2)
        socket.create_connection(listener.getsockname(), timeout=2).close()  # loopback stays allowed
        child = subprocess.run([sys.executable, "-c", CHILD_CONNECT], capture_output=True, text=True, check=True)
        assert child.stdout.strip() == "NetworkRefused"
    listener.close()
    assert sorted(e["pid"] == os.getpid() for e in events if "network" in e) == [False, True]


def _tree_digest(root: Path) -> dict[str, str]:
    """Every file and symlink under `root` (names included), by content hash."""
    digests = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            digests[str(path.relative_to(root))] = "-> " + os.readlink(path)
        elif path.is_file():
            digests[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


@pytest.mark.slow
def test_full_run_stays_offline_inside_its_roots_and_leaves_the_app_untouched(
    demo_app, locations, mondrian_db, embedded_base, instance, tmp_path
):
    # Hostile references to a secret beside the app: a symlinked image and an analysis path out of the roots.
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "photo.jpg").write_bytes((next((demo_app / "source").glob("*.jpg"))).read_bytes())
    (secret / "analysis.json").write_text("{}")
    (demo_app / "source" / "leak.jpg").symlink_to(secret / "photo.jpg")
    with sqlite3.connect(demo_app / "mondrian.db") as db:
        db.execute("INSERT INTO jobs (id, filename, advisor, status, analysis_file) VALUES "
                   "('leak', 'leak.jpg', 'weston', 'done', '../secret/analysis.json')")  # fmt: skip
    db.close()
    before = _tree_digest(demo_app)
    trainer = MlxTrainer(base_model=str(embedded_base), iters=4, eval_interval=2, save_interval=2, warmup_steps=1)
    resources = {"mondrian_db": mondrian_db, "mlx_trainer": trainer}
    eval_config = {"ops": {"eval_report": {"config": {"max_examples": 2, "max_tokens": 24, "batch_size": 2}}}}

    with guards.guarded(tmp_path / "guard.jsonl", (tmp_path, "/etc")) as events:
        assert dg.materialize([linking.linked_records], resources=resources, instance=instance).success
        for selection in (["train_split", "val_split"], ["lora_adapter"], ["eval_report"]):
            result = dg.materialize(ASSETS, selection=selection, partition_key="weston", resources=resources,
                                    instance=instance, run_config=eval_config if selection == ["eval_report"] else None,
                                    raise_on_error=False)  # fmt: skip
            materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
            assert materialized == set(selection)  # a gate may block what follows; each stage itself ran

    assert [e for e in events if "network" in e] == []
    assert _tree_digest(demo_app) == before  # the app's DB (no journal or WAL left either) and every file
    opened = {e["open"] for e in events if "open" in e}
    assert any(e["pid"] != os.getpid() for e in events if "open" in e), "the training child ran guarded too"
    roots = [str(p) + os.sep for p in (locations.app_dir, locations.home)]
    assert {p for p in opened if p.startswith(str(tmp_path)) and not any(p.startswith(r) for r in roots)} == set()
    assert not {p for p in opened if p.startswith(str(secret)) or p in ("/etc/passwd", "/etc/hosts")}
    assert any(p.startswith(str(locations.app_dir / "source")) for p in opened)  # it did read the app's images
