import os

import pytest

from mondrian_assets.core import atomic


def test_written_files_and_dirs_get_ordinary_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        atomic.write_text(tmp_path / "a.txt", "x")
        with atomic.staged_dir(tmp_path / "d") as stage:
            (stage / "f").write_text("y")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755


def test_failed_staging_keeps_the_old_directory(tmp_path):
    final = tmp_path / "adapter"
    with atomic.staged_dir(final) as stage:
        (stage / "v").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic.staged_dir(final) as stage:
            (stage / "v").write_text("2")
            raise RuntimeError("crash mid-write")
    assert (final / "v").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no stage left behind
