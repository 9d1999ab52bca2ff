"""Opening `.ah/index.duckdb`: lock and corruption errors told apart, and the watermark.

DuckDB lets one process write a database file at a time and raises an IO error with
"Could not set lock" in every other. That case is `IndexBusy`: writers skip the index
(the next command catches it up) and readers wait briefly. Every other failure to open
or read the file (truncated, garbage, wrong version) is `IndexCorrupt`: the index is
derived, so it is rebuilt.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ..errors import AhError
from .schema import INDEX_FILE, SCHEMA_VERSION

# How long a reading command waits for another process's write lock.
READ_WAIT_S = 10.0


class IndexBusy(AhError):
    """Another process holds the index's write lock."""


class IndexCorrupt(Exception):
    """The index file cannot be used; internal: it is rebuilt, never shown to users."""


def index_path(reg) -> Path:
    return reg.ah_dir / INDEX_FILE


def is_lock_error(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "could not set lock" in text or "conflicting lock" in text


def connect(path: Path, *, read_only: bool = False, config: dict | None = None):
    """A DuckDB connection, or IndexBusy / IndexCorrupt."""
    import duckdb

    try:
        return duckdb.connect(str(path), read_only=read_only, config=config or {})
    except duckdb.Error as exc:
        if is_lock_error(exc):
            raise IndexBusy(f"the index {path} is being written by another process; try again") from None
        raise IndexCorrupt(str(exc)) from None


def connect_waiting(path: Path, *, read_only: bool = True, config: dict | None = None, wait_s: float | None = None):
    """Like connect, retrying while another process holds the write lock."""
    deadline = time.monotonic() + (READ_WAIT_S if wait_s is None else wait_s)
    delay = 0.02
    while True:
        try:
            return connect(path, read_only=read_only, config=config)
        except IndexBusy:
            if time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


def read_meta(con) -> dict[str, str]:
    import duckdb

    try:
        meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
    except duckdb.Error as exc:
        raise IndexCorrupt(f"no readable meta table: {exc}") from None
    if meta.get("schema_version") != str(SCHEMA_VERSION):
        raise IndexCorrupt(f"index schema version {meta.get('schema_version')!r}, expected {SCHEMA_VERSION}")
    return meta


def write_meta(con, refs_digest: str, journal_offset: int, refs_signature: str | None,
               journal_size: int | None = None) -> None:
    """The watermark. `journal_offset` is where the next read of the eval journal starts
    (after the last whole line); `journal_size` the journal's size then (larger when a
    torn line follows), so an unchanged journal is recognised by one stat."""
    con.execute("DELETE FROM meta")
    con.executemany(
        "INSERT INTO meta VALUES (?, ?)",
        [["schema_version", str(SCHEMA_VERSION)], ["refs_digest", refs_digest], ["journal_offset", str(journal_offset)],
         ["journal_size", str(journal_offset if journal_size is None else journal_size)],
         ["refs_signature", refs_signature or ""]],
    )


def remove_index(path: Path) -> None:
    """Delete the index and its write-ahead log (a stale WAL must never meet a new file)."""
    for p in (path, Path(str(path) + ".wal")):
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass
