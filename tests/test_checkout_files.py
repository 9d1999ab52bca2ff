"""Checked-out files look like files a user wrote: normal permissions, exact bytes."""

import os
import stat

from ah_testkit import write_adapter


def test_checked_out_files_get_umask_permissions(registry, tmp_path):
    src = write_adapter(tmp_path / "a")
    registry.commit(src, "first")
    old = os.umask(0o022)
    try:
        registry.checkout("HEAD", tmp_path / "out")
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert files
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p
        assert p.read_bytes() == (src / p.relative_to(tmp_path / "out")).read_bytes()
