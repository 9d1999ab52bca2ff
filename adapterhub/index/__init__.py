"""The derived DuckDB index `.ah/index.duckdb` (docs/index.md).

Objects and refs are the truth; this index is rebuilt or caught up from them and never
trusted over them. Nothing here imports duckdb at module import time, so `ah --help` and
`ah log` (which reads objects, not the index) never pay for it.

Modules: schema (tables), extract (objects -> rows), chains (ancestry labels), db (open,
lock, watermark), build (full rebuild), update (incremental), queries (filters, best),
sql (the `ah query` sandbox).
"""

from __future__ import annotations


import os


def eager() -> bool:
    """Whether writes catch the index up themselves (`AH_INDEX=eager`).

    By default they do not (`lazy`, also `off`): a commit then costs no DuckDB work at
    all, and the first command that reads the index catches it up from the objects and
    refs, in one transaction for everything written since (git updates its commit-graph
    the same way, after the fact). `eager` suits a server that answers many queries
    between few writes.
    """
    return os.environ.get("AH_INDEX", "lazy").lower() == "eager"


def sync_after_write(reg) -> None:
    """Catch the index up after a command wrote objects or refs, when writes are eager;
    never raises."""
    if not eager():
        return
    from .update import sync_after_write as _sync

    _sync(reg)
