"""Full rebuild of the index from objects and refs (`ah reindex`, and any unusable index).

Walks every commit reachable from a ref or HEAD (reading each object, so each is
re-verified), turns them into rows with index.extract, and loads each table in one Arrow
bulk insert into a temporary database file, which is then renamed over
`.ah/index.duckdb`: a killed rebuild leaves the old index or the new one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..evals import EvalLists
from ..fsutil import fsync_dir
from .chains import label_all
from .db import index_path, remove_index, write_meta
from .extract import (
    add_eval_rows,
    add_parent_rows,
    add_provenance_row,
    add_snapshot_rows,
    refs_rows,
    refs_signature,
    refs_state,
)
from .schema import TABLES, create_indexes, create_tables, empty_rows, insert_arrow, to_arrow


# Row order of a rebuild (the rows are the same in any order): DuckDB keeps min/max per
# row group, so clustered rows let "metric = ? ORDER BY value" and chain lookups skip
# most of a large table (3x faster `best` at a million commits).
LOAD_ORDER = {"evals": ("metric", "value"), "commits": ("chain", "pos"), "tensors": ("snapshot",)}


@dataclass(frozen=True)
class BuildStats:
    """What a rebuild indexed.

    Attributes:
        commits / snapshots / tensors / evals / refs: row counts.
        seconds: wall time.
    """

    commits: int
    snapshots: int
    tensors: int
    evals: int
    refs: int
    seconds: float


def collect_rows(reg, state) -> dict[str, dict[str, list]]:
    """Rows of every table for the commits reachable from `state.tips`."""
    commits = {}
    stack = sorted(state.tips)
    while stack:
        oid = stack.pop()
        if oid in commits:
            continue
        c = reg.store.get_commit(oid)
        commits[oid] = c
        stack.extend(p for p in c.parents if p not in commits)
    labels, links = label_all({oid: c.parents for oid, c in commits.items()})
    rows = {t: empty_rows(t) for t in TABLES if t != "meta"}
    rows["links"] = links
    rows["refs"] = refs_rows(state)
    seen_snaps: set = set()
    for oid in sorted(commits):
        c = commits[oid]
        r = rows["commits"]
        chain, pos = labels[oid]
        for k, v in (("id", oid), ("snapshot", c.snapshot), ("author", c.author), ("timestamp", c.timestamp),
                     ("message", c.message), ("n_parents", len(c.parents)), ("chain", chain), ("pos", pos)):
            r[k].append(v)
        add_parent_rows(rows["parents"], oid, c.parents)
        add_provenance_row(rows["provenance"], oid, c.provenance)
        if c.snapshot not in seen_snaps:
            seen_snaps.add(c.snapshot)
            add_snapshot_rows(rows["snapshots"], rows["tensors"], c.snapshot, reg.store.get_snapshot(c.snapshot))
        add_eval_rows(rows["evals"], reg, oid, chain, pos)
    return rows


def write_index(path, tables: dict, refs_digest: str, journal_offset: int, signature: str | None = None) -> None:
    """Bulk-load `tables` (name -> Arrow table) into a new file and rename it over `path`."""
    from .db import connect

    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    remove_index(tmp)
    try:
        con = connect(tmp)
        try:
            create_tables(con)
            for name, data in tables.items():
                insert_arrow(con, name, data)
            create_indexes(con)
            write_meta(con, refs_digest, journal_offset, signature)
            con.execute("CHECKPOINT")
        finally:
            con.close()
        remove_index(path)  # the old file and, above all, any WAL left next to it
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        remove_index(tmp)


def rebuild(reg) -> BuildStats:
    import time

    t0 = time.perf_counter()
    # Watermark first: anything that moves while we read is caught up by the next sync.
    journal_offset = EvalLists(reg.ah_dir).journal_size()
    signature = refs_signature(reg)
    state = refs_state(reg)
    rows = collect_rows(reg, state)
    tables = {t: to_arrow(t, r) for t, r in rows.items()}
    for t, keys in LOAD_ORDER.items():
        tables[t] = tables[t].sort_by([(k, "ascending") for k in keys])
    write_index(index_path(reg), tables, state.digest, journal_offset, signature)
    return BuildStats(
        len(rows["commits"]["id"]), len(rows["snapshots"]["id"]), len(rows["tensors"]["name"]),
        len(rows["evals"]["id"]), len(rows["refs"]["name"]), time.perf_counter() - t0,
    )
