"""Tables of the derived index `.ah/index.duckdb` and their Arrow schemas (docs/index.md).

One place names every table and column, so the full build, the incremental update and the
tests agree on them. Bump SCHEMA_VERSION on any change: an index of another version is
rebuilt, never read.
"""

from __future__ import annotations

SCHEMA_VERSION = 2
INDEX_FILE = "index.duckdb"

# Column name -> DuckDB type, in table order; Arrow types follow (arrow_type). Plain strings,
# so reading commands never import pyarrow.
TABLES: dict[str, dict[str, str]] = {
    "commits": {
        "id": "VARCHAR",
        "snapshot": "VARCHAR",
        "author": "VARCHAR",
        "timestamp": "BIGINT",
        "message": "VARCHAR",
        "n_parents": "INTEGER",
        # First-parent chain labels (see chains.py): ancestry queries without a walk.
        "chain": "VARCHAR",
        "pos": "BIGINT",
    },
    "parents": {"commit": "VARCHAR", "parent": "VARCHAR", "position": "INTEGER"},
    "links": {"chain": "VARCHAR", "pos": "BIGINT", "parent_chain": "VARCHAR", "parent_pos": "BIGINT"},
    "refs": {"name": "VARCHAR", "kind": "VARCHAR", "target": "VARCHAR", "commit": "VARCHAR"},
    "snapshots": {"id": "VARCHAR", "files": "INTEGER", "tensors": "INTEGER", "bytes": "BIGINT"},
    "tensors": {
        "snapshot": "VARCHAR",
        "path": "VARCHAR",
        "name": "VARCHAR",
        "dtype": "VARCHAR",
        "shape": "BIGINT[]",
        "nbytes": "BIGINT",
        "blob": "VARCHAR",
    },
    "provenance": {
        "commit": "VARCHAR",
        "base_model": "VARCHAR",
        "base_model_revision": "VARCHAR",
        "base_model_path": "VARCHAR",
        "base_model_fingerprint": "VARCHAR",
        "fingerprint_mode": "VARCHAR",
        "dataset_uri": "VARCHAR",
        "dataset_digest": "VARCHAR",
        "peft_type": "VARCHAR",
        "code_commit": "VARCHAR",
        "code_dirty": "BOOLEAN",
        "python": "VARCHAR",
        "torch": "VARCHAR",
        "peft": "VARCHAR",
        "transformers": "VARCHAR",
        "json": "VARCHAR",
    },
    "evals": {
        "id": "VARCHAR",
        "commit": "VARCHAR",
        "seq": "INTEGER",
        "metric": "VARCHAR",
        "value": "DOUBLE",
        "suite": "VARCHAR",
        "dataset": "VARCHAR",
        "evaluator": "VARCHAR",
        "timestamp": "BIGINT",
        "details": "VARCHAR",
        # The commit's chain label, copied: "best --branch" filters evals by ancestry
        # without joining the (large) commits table.
        "chain": "VARCHAR",
        "pos": "BIGINT",
    },
    "meta": {"key": "VARCHAR", "value": "VARCHAR"},
}

# Point-lookup indexes, created after a bulk load (cheaper than maintaining them during it).
INDEXES = {
    "commits_id": ("commits", "id"),
    "commits_chain": ("commits", "chain"),
    "parents_commit": ("parents", "commit"),
    "parents_parent": ("parents", "parent"),
    "evals_commit": ("evals", "commit"),
    "snapshots_id": ("snapshots", "id"),
}


def arrow_type(duck_type: str):
    import pyarrow as pa

    return {
        "VARCHAR": pa.string(), "BIGINT": pa.int64(), "INTEGER": pa.int32(), "DOUBLE": pa.float64(),
        "BOOLEAN": pa.bool_(), "BIGINT[]": pa.list_(pa.int64()),
    }[duck_type]


def arrow_schema(table: str):
    import pyarrow as pa

    return pa.schema([(c, arrow_type(t)) for c, t in TABLES[table].items()])


def empty_rows(table: str) -> dict[str, list]:
    return {col: [] for col in TABLES[table]}


def to_arrow(table: str, rows: dict[str, list]):
    import pyarrow as pa

    return pa.Table.from_pydict(rows, schema=arrow_schema(table))


def create_tables(con) -> None:
    for name, cols in TABLES.items():
        body = ", ".join(f'"{c}" {t}' for c, t in cols.items())
        con.execute(f"CREATE TABLE IF NOT EXISTS {name} ({body})")


def create_indexes(con) -> None:
    for index, (table, col) in INDEXES.items():
        con.execute(f'CREATE INDEX IF NOT EXISTS {index} ON {table} ("{col}")')


def insert_arrow(con, table: str, data) -> None:
    """Bulk insert through Arrow (zero-copy scan of the Arrow table by DuckDB)."""
    if data.num_rows == 0:
        return
    con.register("_ah_bulk", data)
    try:
        cols = ", ".join(f'"{c}"' for c in TABLES[table])
        con.execute(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM _ah_bulk")
    finally:
        con.unregister("_ah_bulk")


# Tables compared by `reindex` tests and dumped by `rows()`: all but meta.
DATA_TABLES = [t for t in TABLES if t != "meta"]
