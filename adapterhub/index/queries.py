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
        # evals carry their commit's chain label: restrict them to the ancestors directly.
        return (f"c.id IN (SELECT e.commit FROM evals e JOIN reach r ON e.chain = r.chain AND e.pos <= r.pos "
                f"WHERE e.metric = {bind(f.metric)} AND e.value {NUM_OPS[f.op]} {bind(f.value)})")
    column, kind = FIELDS[f.field]
    if kind == "text" and f.op == "~":
        return f"contains({column}, {bind(f.value)})"
    if kind == "text" and f.op == "!=":
        return f"{column} IS DISTINCT FROM {bind(f.value)}"
    return f"{column} {(TEXT_OPS if kind == 'text' else NUM_OPS)[f.op]} {bind(f.value)}"


def log_sql(tip: str, filters: list[Filter] = (), n: int | None = None) -> tuple[str, list]:
    """(SQL, parameters) for the ancestors of commit `tip` matching `filters`, newest first."""
    bind = _Params([tip])  # $1: REACH_CTE's tips
    conds = [_condition(f, bind) for f in filters]
    needs_prov = any(f.field != "metric" and FIELDS[f.field][0].startswith("p.") for f in filters)
    # Materialising the ancestors first keeps DuckDB from planning the filters against the
    # whole commits table (5x faster at a million commits).
    sql = (REACH_CTE + ", anc AS MATERIALIZED (SELECT c.* FROM commits c JOIN reach"
           " ON c.chain = reach.chain AND c.pos <= reach.pos) SELECT c.id FROM anc c" +
           (" LEFT JOIN provenance p ON p.commit = c.id" if needs_prov else "") +
           (" WHERE " + " AND ".join(conds) if conds else "") +
           " ORDER BY c.timestamp DESC, c.id")
    if n is not None:
        sql += f" LIMIT {bind(n)}"
    return sql, bind.values


def best_sql(metric: str, *, tip: str | None = None, minimize: bool = False, suite: str | None = None,
             limit: int = 4) -> tuple[str, list]:
    """(SQL, parameters) for the best eval records of `metric`, best first (see `best`)."""
    bind = _Params([tip]) if tip is not None else _Params()
    order = "ASC" if minimize else "DESC"
    where = f"e.metric = {bind(metric)}" + (f" AND e.suite = {bind(suite)}" if suite is not None else "")
    head = (REACH_CTE + "SELECT e.commit, e.id FROM evals e JOIN reach ON e.chain = reach.chain AND e.pos <= reach.pos"
            if tip is not None else "SELECT e.commit, e.id FROM evals e")
    sql = f"{head} WHERE {where} ORDER BY e.value {order}, e.timestamp DESC, e.id LIMIT {bind(limit)}"
    return sql, bind.values


def _require_indexed(con, tip: str, rev: str) -> None:
    if not con.execute("SELECT 1 FROM commits WHERE id = $1", [tip]).fetchall():
        raise AhError(f"{rev} ({tip[:12]}) is not reachable from any branch or tag, so the index does not cover it")


def log_where(reg, rev: str = "HEAD", filters: list[Filter] = (), n: int | None = None) -> list:
    """CommitInfo of the ancestors of `rev` matching every filter, newest first."""
    if n is not None and n < 0:
        raise UsageError("-n must be zero or more")
    tip = reg.resolve(rev)
    con = open_fresh(reg)
    try:
        _require_indexed(con, tip, rev)
        ids = [r[0] for r in con.execute(*log_sql(tip, filters, n)).fetchall()]
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
            _require_indexed(con, tip, rev)
        # Records best first; a commit ranks by its first (best) record. Fetch a few more
        # records than commits wanted, and more again if commits repeat.
        limit = 4 * n
        while True:
            records = con.execute(*best_sql(metric, tip=tip, minimize=minimize, suite=suite, limit=limit)).fetchall()
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
