"""Tables of the derived index `.ah/index.duckdb` and their Arrow schemas (docs/index.md).

One place names every table and column, so the full build, the incremental update and the
tests agree on them. Bump SCHEMA_VERSION on any change: an index of another version is
rebuilt, never read.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1
INDEX_FILE = "index.duckdb"

# Column name -> Arrow type, in table order. DuckDB types follow from the Arrow types.
TABLES: dict[str, dict[str, pa.DataType]] = {
    "commits": {
        "id": pa.string(),
        "snapshot": pa.string(),
        "author": pa.string(),
        "timestamp": pa.int64(),
        "message": pa.string(),
        "n_parents": pa.int32(),
        # First-parent chain labels (see chains.py): ancestry queries without a walk.
        "chain": pa.string(),
        "pos": pa.int64(),
    },
    "parents": {"commit": pa.string(), "parent": pa.string(), "position": pa.int32()},
    "links": {"chain": pa.string(), "pos": pa.int64(), "parent_chain": pa.string(), "parent_pos": pa.int64()},
    "refs": {"name": pa.string(), "kind": pa.string(), "target": pa.string(), "commit": pa.string()},
    "snapshots": {"id": pa.string(), "files": pa.int32(), "tensors": pa.int32(), "bytes": pa.int64()},
    "tensors": {
        "snapshot": pa.string(),
        "path": pa.string(),
        "name": pa.string(),
        "dtype": pa.string(),
        "shape": pa.list_(pa.int64()),
        "nbytes": pa.int64(),
        "blob": pa.string(),
    },
    "provenance": {
        "commit": pa.string(),
        "base_model": pa.string(),
        "base_model_revision": pa.string(),
        "base_model_path": pa.string(),
        "base_model_fingerprint": pa.string(),
        "fingerprint_mode": pa.string(),
        "dataset_uri": pa.string(),
        "dataset_digest": pa.string(),
        "peft_type": pa.string(),
        "code_commit": pa.string(),
        "code_dirty": pa.bool_(),
        "python": pa.string(),
        "torch": pa.string(),
        "peft": pa.string(),
        "transformers": pa.string(),
        "json": pa.string(),
    },
    "evals": {
        "id": pa.string(),
        "commit": pa.string(),
        "seq": pa.int32(),
        "metric": pa.string(),
        "value": pa.float64(),
        "suite": pa.string(),
        "dataset": pa.string(),
        "evaluator": pa.string(),
        "timestamp": pa.int64(),
        "details": pa.string(),
    },
    "meta": {"key": pa.string(), "value": pa.string()},
}

_DUCK = {
    pa.string(): "VARCHAR",
    pa.int64(): "BIGINT",
    pa.int32(): "INTEGER",
    pa.float64(): "DOUBLE",
    pa.bool_(): "BOOLEAN",
    pa.list_(pa.int64()): "BIGINT[]",
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


def arrow_schema(table: str) -> pa.Schema:
    return pa.schema(list(TABLES[table].items()))


def empty_rows(table: str) -> dict[str, list]:
    return {col: [] for col in TABLES[table]}


def to_arrow(table: str, rows: dict[str, list]) -> pa.Table:
    return pa.Table.from_pydict(rows, schema=arrow_schema(table))


def create_tables(con) -> None:
    for name, cols in TABLES.items():
        body = ", ".join(f'"{c}" {_DUCK[t]}' for c, t in cols.items())
        con.execute(f"CREATE TABLE IF NOT EXISTS {name} ({body})")


def create_indexes(con) -> None:
    for index, (table, col) in INDEXES.items():
        con.execute(f'CREATE INDEX IF NOT EXISTS {index} ON {table} ("{col}")')


def insert_arrow(con, table: str, data: pa.Table) -> None:
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
