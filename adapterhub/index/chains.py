"""First-parent chain labels: ancestry in one query instead of a walk.

Walking parents one commit at a time costs one lookup per ancestor, and a recursive SQL
join over a million-row parents table costs a table scan per step. Instead every commit
gets a label (chain, pos): a *chain* is a maximal run of commits in which each one is the
only first-parent child of the one before; `chain` is the id of the run's first commit
and `pos` the distance from it. The ancestors of a commit at (c, p) are then the commits
of chain c with pos <= p, plus, recursively, the ancestors named by the `links` of those
commits (the first parent of a chain's start, and every merge parent). Linear histories
have one chain per branch segment, so the recursion takes a few steps whatever the
history's length.

The labels are a pure function of the commit graph, so the incremental update and a full
rebuild produce the same rows:

* a commit starts a chain iff it has no parents, or its first parent has two or more
  first-parent children; otherwise it continues its first parent's chain at pos + 1;
* `links` holds one row per parent edge except the continuation edges:
  (chain, pos) of the child -> (chain, pos) of the parent.
"""

from __future__ import annotations

from ..objects import ObjectId

# Ancestors of the commits whose ids are in the list parameter $1, as (chain, max pos).
REACH_CTE = """
WITH RECURSIVE r(chain, pos) AS (
    SELECT chain, pos FROM commits WHERE id IN (SELECT unnest($1::VARCHAR[]))
    UNION
    SELECT l.parent_chain, l.parent_pos FROM links l JOIN r ON l.chain = r.chain AND l.pos <= r.pos
), reach AS (SELECT chain, max(pos) AS pos FROM r GROUP BY chain)
"""


def topo_order(parents_of: dict[ObjectId, tuple]) -> list[ObjectId]:
    """The commits of `parents_of`, each after those of its parents that are in the dict."""
    order: list[ObjectId] = []
    state: dict = {}  # 1: on the stack, 2: placed
    for start in sorted(parents_of):
        if start in state:
            continue
        state[start] = 1
        stack = [(start, iter(parents_of[start]))]
        while stack:
            node, it = stack[-1]
            for p in it:
                if p in parents_of and p not in state:
                    state[p] = 1
                    stack.append((p, iter(parents_of[p])))
                    break
            else:
                stack.pop()
                state[node] = 2
                order.append(node)
    return order


def label_all(parents_of: dict[ObjectId, tuple]) -> tuple[dict, dict[str, list]]:
    """Labels {id: (chain, pos)} and the `links` rows for a whole graph."""
    fp_children: dict[ObjectId, int] = {}
    for ps in parents_of.values():
        if ps:
            fp_children[ps[0]] = fp_children.get(ps[0], 0) + 1
    labels: dict = {}
    links = {"chain": [], "pos": [], "parent_chain": [], "parent_pos": []}
    for oid in topo_order(parents_of):
        ps = parents_of[oid]
        if ps and fp_children[ps[0]] == 1:
            chain, pos = labels[ps[0]]
            labels[oid] = (chain, pos + 1)
            rest = ps[1:]
        else:
            labels[oid] = (oid, 0)
            rest = ps
        c, p = labels[oid]
        for q in rest:
            qc, qp = labels[q]
            links["chain"].append(c)
            links["pos"].append(p)
            links["parent_chain"].append(qc)
            links["parent_pos"].append(qp)
    return labels, links


def _shift(con, old_chain: str, after: int, new_chain: str, delta: int) -> None:
    """Relabel commits of `old_chain` with pos > `after` to `new_chain`, pos + delta."""
    for table in ("commits", "evals"):  # evals carry a copy of their commit's label
        con.execute(f"UPDATE {table} SET chain = $3, pos = pos + $4 WHERE chain = $1 AND pos > $2",
                    [old_chain, after, new_chain, delta])
    con.execute("UPDATE links SET chain = $3, pos = pos + $4 WHERE chain = $1 AND pos > $2",
                [old_chain, after, new_chain, delta])
    con.execute(
        "UPDATE links SET parent_chain = $3, parent_pos = parent_pos + $4 WHERE parent_chain = $1 AND parent_pos > $2",
        [old_chain, after, new_chain, delta],
    )


def locate(con, oid: str) -> tuple[str, int]:
    # fetchall, not fetchone: a half-read result blocks the next Arrow registration.
    rows = con.execute("SELECT chain, pos FROM commits WHERE id = ?", [oid]).fetchall()
    if not rows:
        raise KeyError(oid)
    return rows[0][0], rows[0][1]


def label_new(con, oid: ObjectId, parents: tuple) -> tuple[str, int, list[tuple]]:
    """Label one new commit whose parents are all indexed; split a chain when it forks.

    Must run before the new commit's own `parents` rows are inserted. Returns (chain,
    pos, links rows).
    """
    if not parents:
        return oid, 0, []
    fp = parents[0]
    fc, fpos = locate(con, fp)
    siblings = [r[0] for r in con.execute(
        "SELECT commit FROM parents WHERE parent = ? AND position = 0", [fp]).fetchall()]
    if not siblings:
        chain, pos, rest = fc, fpos + 1, parents[1:]
    else:
        if len(siblings) == 1:
            # The only child so far continued fp's chain; now fp forks, so it starts its own.
            s = siblings[0]
            _shift(con, fc, fpos, s, -(fpos + 1))
            con.execute("INSERT INTO links VALUES (?, 0, ?, ?)", [s, fc, fpos])
        chain, pos, rest = oid, 0, parents
    links = [(chain, pos, *locate(con, q)) for q in rest]
    return chain, pos, links


def merge_after_prune(con, first_parents: list[str]) -> None:
    """After commits were removed: a parent left with one first-parent child absorbs its chain."""
    for p in first_parents:
        try:
            pc, ppos = locate(con, p)
        except KeyError:
            continue
        kids = [r[0] for r in con.execute(
            "SELECT commit FROM parents WHERE parent = ? AND position = 0", [p]).fetchall()]
        if len(kids) != 1:
            continue
        s = kids[0]
        sc, spos = locate(con, s)
        if sc != s or spos != 0:
            continue
        con.execute("DELETE FROM links WHERE chain = ? AND pos = 0 AND parent_chain = ? AND parent_pos = ?",
                    [s, pc, ppos])
        _shift(con, s, -1, pc, ppos + 1)
