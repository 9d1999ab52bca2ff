"""Crash-safe file writes.

Never write in place: bytes go to a temp file in the same folder, are fsynced, then
renamed over the target with os.replace (atomic on POSIX), and the folder is fsynced so
the rename itself survives a power cut. A killed process leaves at most a stray temp
file (named `.tmp-*`, ignored by every reader and removed by gc), never a half-written
object or ref.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable

TMP_PREFIX = ".tmp-"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, chunks: bytes | Iterable[bytes], *, durable: bool = True) -> None:
    """Write `chunks` to `path` atomically (temp file + fsync + rename).

    The rename replaces whatever is at `path`, a symlink included, without following it.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            if isinstance(chunks, (bytes, bytearray, memoryview)):
                fh.write(chunks)
            else:
                for chunk in chunks:
                    fh.write(chunk)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
        tmp = None
        if durable:
            fsync_dir(path.parent)
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
