"""Incremental update: catch the index up with objects and refs since its watermark.

The watermark (table `meta`) is the digest of all refs and HEAD plus the byte offset read
so far in the eval journal (docs/format/evals.md). When both match, the index is fresh
and nothing is read. Otherwise, in one DuckDB transaction:

1. refs: the `refs` table is replaced; commits reachable from a new tip but not indexed
   are found by walking parents until indexed commits, and added parents first (a batch
   larger than BULK_LIMIT is cheaper as a full rebuild);
2. if a tip was dropped (branch deleted, forced move), commits no longer reachable from
   any ref are removed, with their rows in every table;
3. evals: the lists of the commits named in the journal after the offset are re-read.

A missing, unreadable or other-version index is rebuilt; a write lock held by another
process raises IndexBusy, which writers ignore (the next command catches up).
"""

from __future__ import annotations

import time

from ..errors import AhError
from ..evals import EvalLists
from .build import rebuild
from .chains import REACH_CTE, label_new, locate, merge_after_prune, topo_order
from .db import (
    IndexBusy,
    IndexCorrupt,
    connect,
    READ_WAIT_S,
    connect_waiting,
    index_path,
    is_lock_error,
    read_meta,
    remove_index,
    write_meta,
)
from .extract import (
    add_eval_rows,
    add_parent_rows,
    add_provenance_row,
    add_snapshot_rows,
    refs_rows,
    refs_signature,
    refs_state,
)
from .schema import empty_rows, insert_arrow, to_arrow

BULK_LIMIT = 20_000

FRESH, UPDATED, REBUILT = "fresh", "updated", "rebuilt"


class _NeedRebuild(Exception):
    pass


def _indexed(con, oids: list[str]) -> set[str]:
    if not oids:
        return set()
    rows = con.execute("SELECT id FROM commits WHERE id IN (SELECT unnest(?::VARCHAR[]))", [oids]).fetchall()
    return {r[0] for r in rows}


def _new_commits(con, reg, tips) -> dict:
    """Commits reachable from `tips` that the index lacks: {id: Commit}."""
    found: dict = {}
    frontier = sorted(set(tips) - _indexed(con, sorted(tips)))
    while frontier:
        nxt = set()
        for oid in frontier:
            if oid in found:
                continue
            c = reg.store.get_commit(oid)
            found[oid] = c
            nxt.update(p for p in c.parents if p not in found)
            if len(found) > BULK_LIMIT:
                raise _NeedRebuild()
        nxt = sorted(nxt)
        frontier = sorted(set(nxt) - _indexed(con, nxt))
    return found


def _add_commit(con, reg, oid, c) -> None:
    chain, pos, links = label_new(con, oid, c.parents)
    con.execute("INSERT INTO commits VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [oid, c.snapshot, c.author, c.timestamp, c.message, len(c.parents), chain, pos])
    if links:
        con.executemany("INSERT INTO links VALUES (?, ?, ?, ?)", [list(x) for x in links])
    rows = {t: empty_rows(t) for t in ("parents", "provenance", "snapshots", "tensors", "evals")}
    add_parent_rows(rows["parents"], oid, c.parents)
    add_provenance_row(rows["provenance"], oid, c.provenance)
    if not con.execute("SELECT 1 FROM snapshots WHERE id = ?", [c.snapshot]).fetchall():
        add_snapshot_rows(rows["snapshots"], rows["tensors"], c.snapshot, reg.store.get_snapshot(c.snapshot))
    add_eval_rows(rows["evals"], reg, oid, chain, pos)
    for table, r in rows.items():
        insert_arrow(con, table, to_arrow(table, r))


def _prune(con) -> None:
    """Remove commits no ref reaches any more, and every row that hangs off them."""
    tips = [r[0] for r in con.execute("SELECT DISTINCT commit FROM refs WHERE commit IS NOT NULL").fetchall()]
    con.execute("CREATE OR REPLACE TEMP TABLE _keep AS " + REACH_CTE +
                "SELECT c.id FROM commits c JOIN reach ON c.chain = reach.chain AND c.pos <= reach.pos", [tips])
    con.execute("CREATE OR REPLACE TEMP TABLE _gone AS SELECT id FROM commits WHERE id NOT IN (SELECT id FROM _keep)")
    if con.execute("SELECT count(*) FROM _gone").fetchall()[0][0] == 0:
        return
    first_parents = [r[0] for r in con.execute(
        "SELECT DISTINCT parent FROM parents WHERE position = 0 AND commit IN (SELECT id FROM _gone) "
        "AND parent NOT IN (SELECT id FROM _gone)").fetchall()]
    con.execute("DELETE FROM commits WHERE id IN (SELECT id FROM _gone)")
    for table in ("parents", "provenance", "evals"):
        con.execute(f"DELETE FROM {table} WHERE commit IN (SELECT id FROM _gone)")
    con.execute("DELETE FROM links WHERE NOT EXISTS "
                "(SELECT 1 FROM commits c WHERE c.chain = links.chain AND c.pos = links.pos)")
    con.execute("DELETE FROM snapshots WHERE id NOT IN (SELECT snapshot FROM commits)")
    con.execute("DELETE FROM tensors WHERE snapshot NOT IN (SELECT id FROM snapshots)")
    merge_after_prune(con, sorted(first_parents))


def _apply_refs(con, reg, state) -> None:
    old_tips = {r[0] for r in con.execute("SELECT DISTINCT commit FROM refs WHERE commit IS NOT NULL").fetchall()}
    con.execute("DELETE FROM refs")
    insert_arrow(con, "refs", to_arrow("refs", refs_rows(state)))
    new = _new_commits(con, reg, state.tips)
    for oid in topo_order({k: v.parents for k, v in new.items()}):
        _add_commit(con, reg, oid, new[oid])
    # A dropped tip that is a parent of a new commit is still reachable (a fast-forward):
    # only a tip that vanished otherwise can leave commits unreachable.
    new_parents = {p for c in new.values() for p in c.parents}
    if old_tips - state.tips - new_parents:
        _prune(con)


def _reload_evals(con, reg, commits) -> None:
    for oid in sorted(_indexed(con, sorted(commits))):
        con.execute("DELETE FROM evals WHERE commit = ?", [oid])
        rows = empty_rows("evals")
        add_eval_rows(rows, reg, oid, *locate(con, oid))
        insert_arrow(con, "evals", to_arrow("evals", rows))


def sync(reg) -> str:
    """Make the index match objects and refs: FRESH, UPDATED or REBUILT. May raise IndexBusy."""
    import duckdb

    path = index_path(reg)
    if not path.exists():
        rebuild(reg)
        return REBUILT
    try:
        con = connect(path)
    except IndexCorrupt:
        remove_index(path)
        rebuild(reg)
        return REBUILT
    try:
        meta = read_meta(con)
        lists = EvalLists(reg.ah_dir)
        journal_size = lists.journal_size()
        offset = int(meta.get("journal_offset", "x"))
        if journal_size < offset:
            raise _NeedRebuild()
        journal_same = str(journal_size) == meta.get("journal_size")
        signature = refs_signature(reg)  # before reading refs: a later move changes it
        if signature and signature == meta.get("refs_signature") and journal_same:
            return FRESH
        state = refs_state(reg)
        if state.digest == meta.get("refs_digest") and journal_same:
            if signature:  # refs unchanged, stats moved or were too young: remember the new stats
                con.execute("UPDATE meta SET value = ? WHERE key = 'refs_signature'", [signature])
            return FRESH
        con.execute("BEGIN TRANSACTION")
        try:
            if state.digest != meta.get("refs_digest"):
                _apply_refs(con, reg, state)
            changed, end = lists.journal_since(offset)
            _reload_evals(con, reg, changed)
            write_meta(con, state.digest, end, signature, max(journal_size, end))
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        return UPDATED
    except (_NeedRebuild, IndexCorrupt, ValueError):
        pass
    except duckdb.Error as exc:
        if is_lock_error(exc):
            raise IndexBusy(str(exc)) from None
        # Anything else from DuckDB means the file cannot be trusted: rebuild below.
    finally:
        con.close()
    remove_index(path)
    rebuild(reg)
    return REBUILT


def _freshness(con, reg) -> tuple[bool, bool]:
    """(index matches refs and journal, its stats signature needs recording).

    The stats signature answers in one stat per refs folder; when it is missing, too young
    or different, the refs digest decides (it reads every ref).
    """
    meta = read_meta(con)
    if meta.get("journal_size") != str(EvalLists(reg.ah_dir).journal_size()):
        return False, False
    signature = refs_signature(reg)
    if signature and signature == meta.get("refs_signature"):
        return True, False
    return refs_state(reg).digest == meta.get("refs_digest"), bool(signature)


def open_fresh(reg, config: dict | None = None):
    """A read-only connection to an index that matches objects and refs, or IndexBusy.

    The common case (nothing changed since the last write) costs one read-only open and
    the stats check. Otherwise catch up first. If another process holds the lock (a
    writer catching up, or a long reader), wait and check again: a stale index is never
    returned; after READ_WAIT_S the caller gets IndexBusy ("try again").
    """
    path = index_path(reg)
    deadline = time.monotonic() + READ_WAIT_S
    delay = 0.02
    while True:
        con = None
        if path.exists():
            try:
                con = connect_waiting(path, read_only=True, config=config)
            except IndexCorrupt:
                con = None
        if con is not None:
            try:
                fresh, record = _freshness(con, reg)
            except IndexCorrupt:
                fresh, record = False, False
            if fresh and not record:
                return con
            con.close()
            if fresh:  # right, but remember the cheap signature for next time (best effort)
                try:
                    sync(reg)
                except IndexBusy:
                    pass
                return connect_waiting(path, read_only=True, config=config)
        try:
            sync(reg)
        except IndexBusy:
            if time.monotonic() > deadline:
                raise IndexBusy(f"the index {path} is behind and another process holds its lock; try again") from None
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
            continue
        try:  # caught up just now: as of this moment the index is the truth
            return connect_waiting(path, read_only=True, config=config)
        except IndexCorrupt as exc:
            raise AhError(f"the index {path} cannot be opened: {exc}") from None


def sync_after_write(reg) -> None:
    """After a write command: catch the index up, but never fail the command for it.

    Skipped when the index is busy; the next command that needs the index catches it
    up. Only called when writes are eager (`adapterhub.index.eager`). Object or ref damage found on the way is
    left to the command that reads it (and to `ah fsck`).
    """
    import duckdb

    try:
        sync(reg)
    except (IndexBusy, AhError, OSError, duckdb.Error):
        pass
