"""The derived DuckDB index `.ah/index.duckdb` (docs/index.md).

Objects and refs are the truth; this index is rebuilt or caught up from them and never
trusted over them. Nothing here imports duckdb at module import time, so `ah --help` and
`ah log` (which reads objects, not the index) never pay for it.

Modules: schema (tables), extract (objects -> rows), chains (ancestry labels), db (open,
lock, watermark), build (full rebuild), update (incremental), queries (filters, best),
sql (the `ah query` sandbox).
"""

from __future__ import annotations


def sync_after_write(reg) -> None:
    """Catch the index up after a command wrote objects or refs; never raises."""
    from .update import sync_after_write as _sync

    _sync(reg)
