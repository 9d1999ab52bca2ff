"""The derived DuckDB index `.ah/index.duckdb` (docs/index.md).

Objects and refs are the truth; this index is rebuilt or caught up from them and never
trusted over them. Nothing here is imported at `ah --help` time, and duckdb is imported
only inside the functions that open the database.
"""

from __future__ import annotations


def sync_after_write(reg) -> None:
    """Catch the index up after a command wrote objects or refs; never raises."""
    return None
