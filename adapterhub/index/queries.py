"""Questions users ask without writing SQL: filtered log, best revision by a metric.

User input (field values, metric names, thresholds, revisions) only ever reaches DuckDB
as bound parameters; the SQL text is assembled from fixed fragments chosen by a
whitelist of field names and operators. The index only chooses *which* commits; what is
returned is read from the objects (re-verified), never from the index.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import AhError, UsageError
from .chains import REACH_CTE
from .update import open_fresh


class BadFilter(UsageError):
    """A --where expression that cannot be understood."""


# --where field -> (column, kind). Only these fragments are ever put into SQL text.
FIELDS = {
    "author": ("c.author", "text"),
    "message": ("c.message", "text"),
    "snapshot": ("c.snapshot", "text"),
    "timestamp": ("c.timestamp", "int"),
    "base_model": ("p.base_model", "text"),
    "base_model_revision": ("p.base_model_revision", "text"),
    "fingerprint": ("p.base_model_fingerprint", "text"),
    "dataset": ("p.dataset_uri", "text"),
    "dataset_digest": ("p.dataset_digest", "text"),
    "peft_type": ("p.peft_type", "text"),
    "code_commit": ("p.code_commit", "text"),
}
TEXT_OPS = {"=": "=", "!=": "<>", "~": "contains"}
NUM_OPS = {"=": "=", "==": "=", "!=": "<>", ">": ">", ">=": ">=", "<": "<", "<=": "<="}

_METRIC_RE = re.compile(r"^metric:(?P<name>[^<>=!]+?)\s*(?P<op>>=|<=|!=|==|=|>|<)\s*(?P<value>.+)$", re.S)
_FIELD_RE = re.compile(r"^(?P<field>[a-z_]+)\s*(?P<op>!=|>=|<=|==|=|~|>|<)(?P<value>.*)$", re.S)


@dataclass(frozen=True)
class Filter:
    """One parsed --where condition.

    Attributes:
        field: a FIELDS key, or "metric".
        op: the operator as written.
        value: the value (text, or a float for metrics and timestamps).
        metric: the metric name when field == "metric".
    """

    field: str
    op: str
    value: object
    metric: str | None = None


def parse_where(expr: str) -> Filter:
    """`base_model=org/x`, `author~alice`, `metric:acc>=0.9`, `timestamp>=1700000000`."""
    from ..evals import BadEval, check_metric_name, check_metric_value

    m = _METRIC_RE.match(expr)
    if m:
        name = m["name"].strip()
        try:
            check_metric_name(name)
            value = check_metric_value(name, m["value"])
        except BadEval as exc:
            raise BadFilter(f"--where {expr!r}: {exc}") from None
        return Filter("metric", m["op"], value, name)
    m = _FIELD_RE.match(expr)
    if not m or m["field"] not in FIELDS:
        known = ", ".join(sorted(FIELDS))
        raise BadFilter(
            f"--where {expr!r}: expected FIELD=VALUE, FIELD!=VALUE, FIELD~TEXT or metric:NAME>=NUMBER; fields: {known}"
        )
    field, op, value = m["field"], m["op"], m["value"]
    kind = FIELDS[field][1]
    if kind == "text":
        if op not in TEXT_OPS:
            raise BadFilter(f"--where {expr!r}: {field} takes =, != or ~ (contains)")
        return Filter(field, op, value)
    if op not in NUM_OPS:
        raise BadFilter(f"--where {expr!r}: {field} takes a comparison")
    try:
        return Filter(field, op, int(value))
    except ValueError:
        raise BadFilter(f"--where {expr!r}: {field} needs a whole number") from None


class _Params:
    """Numbered DuckDB parameters ($1, $2, ...): values never enter the SQL text."""

    def __init__(self, *first):
        self.values = list(first)

    def __call__(self, value) -> str:
        self.values.append(value)
        return f"${len(self.values)}"


def _condition(f: Filter, bind: _Params) -> str:
    if f.field == "metric":
        return (f"EXISTS (SELECT 1 FROM evals e WHERE e.commit = c.id AND e.metric = {bind(f.metric)} "
                f"AND e.value {NUM_OPS[f.op]} {bind(f.value)})")
    column, kind = FIELDS[f.field]
    if kind == "text" and f.op == "~":
        return f"contains({column}, {bind(f.value)})"
    if kind == "text" and f.op == "!=":
        return f"{column} IS DISTINCT FROM {bind(f.value)}"
    return f"{column} {(TEXT_OPS if kind == 'text' else NUM_OPS)[f.op]} {bind(f.value)}"


def _ancestors(con, tip: str) -> list[str]:
    """Ids of `tip` and all its ancestors, from the chain labels (no walk)."""
    sql = REACH_CTE + "SELECT c.id FROM commits c JOIN reach ON c.chain = reach.chain AND c.pos <= reach.pos"
    return [r[0] for r in con.execute(sql, [[tip]]).fetchall()]


# Ancestors are computed first and passed back as a list: joining the recursive CTE straight
# into the large evals/provenance tables makes DuckDB hash the big side (10x slower).
_IN_ANCESTORS = "{col} IN (SELECT unnest({param}::VARCHAR[]))"


def _check_indexed(con, oid: str, rev: str) -> None:
    if con.execute("SELECT 1 FROM commits WHERE id = $1", [oid]).fetchone() is None:
        raise AhError(f"{rev} ({oid[:12]}) is not reachable from any branch or tag, so the index does not cover it")


def log_where(reg, rev: str = "HEAD", filters: list[Filter] = (), n: int | None = None) -> list:
    """CommitInfo of the ancestors of `rev` matching every filter, newest first."""
    if n is not None and n < 0:
        raise UsageError("-n must be zero or more")
    tip = reg.resolve(rev)
    con = open_fresh(reg)
    try:
        _check_indexed(con, tip, rev)
        bind = _Params()
        conds = [_IN_ANCESTORS.format(col="c.id", param=bind(_ancestors(con, tip)))]
        conds += [_condition(f, bind) for f in filters]
        needs_prov = any(f.field != "metric" and FIELDS[f.field][0].startswith("p.") for f in filters)
        sql = ("SELECT c.id FROM commits c" +
               (" LEFT JOIN provenance p ON p.commit = c.id" if needs_prov else "") +
               " WHERE " + " AND ".join(conds) +
               " ORDER BY c.timestamp DESC, c.id")
        if n is not None:
            sql += f" LIMIT {bind(n)}"
        ids = [r[0] for r in con.execute(sql, bind.values).fetchall()]
    finally:
        con.close()
    return [reg.commit_info(oid) for oid in ids]


@dataclass(frozen=True)
class BestResult:
    """One ranked commit for `best`.

    Attributes:
        info: the commit (read from its object).
        eval: the eval record that ranked it (read from its object).
    """

    info: object
    eval: object

    def to_json(self) -> dict:
        d = self.info.to_json()
        d["eval"] = self.eval.to_json()
        return d


def best(reg, metric: str, *, rev: str | None = None, minimize: bool = False, suite: str | None = None,
         n: int = 1) -> list[BestResult]:
    """Commits with the highest (lowest with minimize) value of `metric`, best first.

    Over the whole registry, or over the ancestors of `rev` (a branch). A commit with
    several records of the metric ranks by its best one; ties go to the newer record,
    then the smaller eval id.
    """
    from ..evals import EVAL, BadEval, EvalInfo, check_metric_name

    try:
        check_metric_name(metric)
    except BadEval as exc:
        raise BadFilter(str(exc)) from None
    if n < 1:
        raise UsageError("-n must be at least 1")
    tip = reg.resolve(rev) if rev is not None else None
    con = open_fresh(reg)
    try:
        if tip is not None:
            _check_indexed(con, tip, rev)
        bind = _Params()
        order = "ASC" if minimize else "DESC"
        where = f"e.metric = {bind(metric)}" + (f" AND e.suite = {bind(suite)}" if suite is not None else "")
        if tip is not None:
            where += " AND " + _IN_ANCESTORS.format(col="e.commit", param=bind(_ancestors(con, tip)))
        # Records best first; a commit ranks by its first (best) record. Fetch a few more
        # records than commits wanted, and more again if commits repeat.
        sql = f"SELECT e.commit, e.id FROM evals e WHERE {where} ORDER BY e.value {order}, e.timestamp DESC, e.id LIMIT "
        limit = 4 * n
        while True:
            records = con.execute(sql + bind(limit), bind.values).fetchall()
            bind.values.pop()
            rows: dict = {}
            for commit, eid in records:
                rows.setdefault(commit, eid)
            if len(rows) >= n or len(records) < limit:
                break
            limit *= 4
        rows = list(rows.items())[:n]
    finally:
        con.close()
    return [BestResult(reg.commit_info(c), EvalInfo(eid, reg.store.get(eid, EVAL))) for c, eid in rows]
