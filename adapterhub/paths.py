"""File names inside an adapter folder: what is safe to store and to write back.

A snapshot path is checked twice: when a folder is committed and when a stored snapshot
is read (a snapshot that arrived from a remote is not trusted), so checkout can never be
steered outside its target folder or into a registry's own `.ah/`.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import CheckoutError, UnsafePath

MAX_PATH_BYTES = 4096


def check_relpath(path: str) -> str:
    """Return `path` if it is a safe relative POSIX path, else raise UnsafePath."""
    if not path:
        raise UnsafePath("empty file name")
    try:
        # A name whose bytes are not UTF-8 (os.listdir hands it over with lone surrogates)
        # cannot go into a snapshot's canonical JSON, nor come back out the same.
        encoded = path.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsafePath(f"file name is not valid UTF-8: {path!r}") from None
    if len(encoded) > MAX_PATH_BYTES:
        raise UnsafePath(f"file name too long: {path[:60]!r}...")
    if "\0" in path:
        raise UnsafePath(f"file name contains a NUL byte: {path!r}")
    if "\\" in path:
        raise UnsafePath(f"file name contains a backslash: {path!r}")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        raise UnsafePath(f"file name contains a control character: {path!r}")
    if path.startswith("/") or (len(path) > 1 and path[1] == ":"):
        raise UnsafePath(f"absolute file name: {path!r}")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise UnsafePath(f"file name has an empty, '.' or '..' component: {path!r}")
        if part.lower() == ".ah" or part.lower() == ".git":
            raise UnsafePath(f"file name names a repository folder: {path!r}")
    return path


def ensure_real_dir(root: Path, rel_dir: str) -> Path:
    """Create `root/rel_dir` one component at a time, refusing any symlink on the way.

    Checking each component with lstat (rather than trusting `mkdir -p`) is what keeps
    checkout from writing through a symlink that someone planted in the target folder.
    """
    current = root
    for part in [p for p in rel_dir.split("/") if p]:
        current = current / part
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            os.mkdir(current)
            continue
        if stat.S_ISLNK(st.st_mode):
            raise CheckoutError(f"refusing to write through symlink {current}")
        if not stat.S_ISDIR(st.st_mode):
            raise CheckoutError(f"{current} exists and is not a folder")
    return current
