"""`ah query SQL`: power-user SQL over the index, in a sandbox.

The index is derived data, but DuckDB can do far more than read it: write files (COPY ...
TO), read any file the user can (read_csv('/etc/passwd')), attach other databases,
install and load extensions, change its own settings. So a query runs:

* on a read-only connection (no writes to the index, whatever the statement);
* with enable_external_access=false (no files, no network, no ATTACH of paths),
  autoload/autoinstall of extensions off, and lock_configuration=true so the query cannot
  switch any of that back on with SET or PRAGMA;
* after a statement check: exactly one statement, and it must be a SELECT (EXPLAIN
  included); COPY, ATTACH, INSTALL, LOAD, SET, PRAGMA, CREATE, ... are refused before they
  run, with a message saying so.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from ..errors import AhError, UsageError
from .update import open_fresh

SANDBOX_CONFIG = {
    "enable_external_access": False,
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    "allow_community_extensions": False,
    "allow_unsigned_extensions": False,
    "lock_configuration": True,
}
DEFAULT_TIMEOUT_S = 60.0


class QueryRefused(UsageError):
    """A statement `ah query` does not run (not a single read-only SELECT)."""


class QueryFailed(AhError):
    """DuckDB rejected or failed the query."""


@dataclass(frozen=True)
class QueryResult:
    """Rows of a query.

    Attributes:
        columns: column names.
        rows: rows as tuples of Python values.
    """

    columns: list[str]
    rows: list[tuple]


def check_statement(sql: str) -> None:
    import duckdb

    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryFailed(f"query does not parse: {exc}") from None
    if len(statements) != 1:
        raise QueryRefused(f"give exactly one SQL statement (got {len(statements)})")
    kind = statements[0].type
    allowed = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}
    if kind not in allowed:
        name = getattr(kind, "name", str(kind))
        raise QueryRefused(f"only SELECT queries run in `ah query` (this is a {name} statement); the index is read-only")


def run_query(reg, sql: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> QueryResult:
    import duckdb

    check_statement(sql)
    con = open_fresh(reg, config=dict(SANDBOX_CONFIG))
    timer = threading.Timer(timeout_s, con.interrupt)
    timer.start()
    try:
        cur = con.execute(sql)
        columns = [d[0] for d in cur.description or []]
        return QueryResult(columns, cur.fetchall())
    except duckdb.InterruptException:
        raise QueryFailed(f"query took longer than {timeout_s:g} s and was stopped") from None
    except duckdb.Error as exc:
        raise QueryFailed(str(exc).splitlines()[0]) from None
    finally:
        timer.cancel()
        con.close()
