"""Write failures in a child process (CI runs as root, which ignores permissions and quotas): a full disk
(RLIMIT_FSIZE, writes past it fail with EFBIG) and permission denied (the child runs as `nobody`). The previous
output stays intact, no temporary file is left behind, and the error says what could not be written."""

import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from mondrian_assets.core import atomic

WRITE_FILE = "from pathlib import Path; from mondrian_assets.core import atomic; atomic.write_json(Path({path!r}), {{'new': 'x' * 100_000}})"
WRITE_DIR = """from pathlib import Path
from mondrian_assets.core import atomic
with atomic.staged_dir(Path({path!r})) as stage:
    (stage / "adapters.safetensors").write_bytes(b"w" * 100_000)
"""


def _small_disk() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (16_384, 16_384))


def _run(code: str, *, as_nobody: bool = False) -> subprocess.CompletedProcess:
    prefix = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"] if as_nobody else []
    return subprocess.run([*prefix, sys.executable, "-c", code], capture_output=True, text=True,
                          preexec_fn=None if as_nobody else _small_disk)  # fmt: skip


@pytest.fixture
def outputs():
    """A folder `nobody` may enter but not write, holding the previous outputs (tmp_path's parents are private)."""
    folder = Path(tempfile.mkdtemp(prefix="mondrian-outputs-"))
    folder.chmod(0o755)
    atomic.write_json(folder / "manifest.json", {"old": True})
    with atomic.staged_dir(folder / "adapter") as stage:
        (stage / "adapters.safetensors").write_bytes(b"previous")
    yield folder
    shutil.rmtree(folder)


def _listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"" for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("code", [WRITE_FILE, WRITE_DIR], ids=["file", "directory"])
def test_disk_full_keeps_the_previous_output(outputs, code):
    before = _listing(outputs)
    target = outputs / ("manifest.json" if code is WRITE_FILE else "adapter")
    child = _run(code.format(path=str(target)))
    assert child.returncode != 0
    assert f"WriteFailed: [Errno 27] could not write {target}: File too large; its previous version is unchanged" in child.stderr
    assert _listing(outputs) == before  # same files, same bytes, nothing staged left behind


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv to drop to nobody")
@pytest.mark.parametrize("code", [WRITE_FILE, WRITE_DIR], ids=["file", "directory"])
def test_permission_denied_keeps_the_previous_output(outputs, code):
    before = _listing(outputs)
    target = outputs / ("manifest.json" if code is WRITE_FILE else "adapter")
    child = _run(code.format(path=str(target)), as_nobody=True)
    assert child.returncode != 0
    assert f"WriteFailed: [Errno 13] could not write {target}: Permission denied" in child.stderr
    assert _listing(outputs) == before
