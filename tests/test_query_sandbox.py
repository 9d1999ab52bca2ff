"""`ah query`: one read-only SELECT, no file or network access, settings locked."""

from __future__ import annotations

import csv
import io
import json

import duckdb
import pytest

from adapterhub.index.db import connect, index_path
from adapterhub.index.update import sync
from adapterhub.index.sql import SANDBOX_CONFIG, QueryFailed, QueryRefused, run_query

from ah_testkit import ah, index_rows, make_registry


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    monkeypatch.setenv("AH_AUTHOR", "Tester <t@example.com>")
    monkeypatch.setenv("AH_HOME", str(tmp_path / "home"))


@pytest.fixture()
def reg(tmp_path):
    r, ids = make_registry(tmp_path, 2)
    r.add_eval(ids[0], {"acc": 0.5, "loss": 2.0}, suite="s")
    sync(r)  # writes leave the index to the next read; build it so refused queries meet a real one
    return r


def test_select_runs_and_formats(reg):
    res = run_query(reg, "SELECT metric, value FROM evals ORDER BY metric")
    assert res.columns == ["metric", "value"] and res.rows == [("acc", 0.5), ("loss", 2.0)]
    text = ah(reg.root, "query", "SELECT metric, value FROM evals ORDER BY metric").stdout
    assert "metric" in text and "acc" in text and "(2 rows)" in text
    js = json.loads(ah(reg.root, "query", "SELECT name, shape FROM tensors ORDER BY name LIMIT 1", "--format", "json").stdout)
    assert js == [{"name": "base_model.model.layers.0.q_proj.lora_A.weight", "shape": [4, 16]}]
    rows = list(csv.reader(io.StringIO(ah(reg.root, "query", "SELECT metric, value FROM evals ORDER BY 1", "--format", "csv").stdout)))
    assert rows == [["metric", "value"], ["acc", "0.5"], ["loss", "2.0"]]


@pytest.mark.parametrize(
    "sql, what",
    [
        ("COPY commits TO '{tmp}/out.csv'", "COPY"),
        ("COPY (SELECT * FROM commits) TO '{tmp}/out.parquet' (FORMAT parquet)", "COPY"),
        ("ATTACH '{tmp}/other.duckdb' AS o", "ATTACH"),
        ("INSTALL httpfs", "LOAD"),
        ("LOAD httpfs", "LOAD"),
        ("SET enable_external_access = true", "SET"),
        ("PRAGMA enable_profiling", "PRAGMA"),
        ("CREATE TABLE x AS SELECT 1", "CREATE"),
        ("DELETE FROM commits", "DELETE"),
        ("SELECT 1; DROP TABLE commits", "exactly one"),
        ("CALL pragma_version()", "CALL"),
    ],
)
def test_statements_refused(reg, tmp_path, sql, what):
    with pytest.raises(QueryRefused, match=what):
        run_query(reg, sql.format(tmp=tmp_path))
    p = ah(reg.root, "query", sql.format(tmp=tmp_path), check=False)
    assert p.returncode == 2 and p.stderr.startswith("error:") and "Traceback" not in p.stderr
    assert not list(tmp_path.glob("out.*")) and not (tmp_path / "other.duckdb").exists()
    assert len(index_rows(reg)["commits"]) == 2


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM read_text('/etc/passwd')",
        "SELECT * FROM read_blob('/etc/hostname')",
        "SELECT * FROM read_parquet('{tmp}/x.parquet')",
        "SELECT * FROM glob('/etc/*')",
    ],
)
def test_file_access_refused_inside_select(reg, tmp_path, sql):
    with pytest.raises(QueryFailed):
        run_query(reg, sql.format(tmp=tmp_path))
    p = ah(reg.root, "query", sql.format(tmp=tmp_path), check=False)
    assert p.returncode == 1 and p.stderr.startswith("error:") and "root:" not in p.stdout


def test_sandbox_connection_holds_without_the_statement_check(reg, tmp_path):
    """Defence in depth: the connection itself refuses what the statement check refuses."""
    run_query(reg, "SELECT 1")  # make sure the index exists
    con = connect(index_path(reg), read_only=True, config=dict(SANDBOX_CONFIG))
    try:
        for sql in (
            f"COPY commits TO '{tmp_path}/leak.csv'",
            "SET enable_external_access = true",
            "SET lock_configuration = false",
            f"ATTACH '{tmp_path}/x.duckdb' AS x",
            "INSTALL httpfs",
            "LOAD httpfs",
            "SELECT * FROM read_csv('/etc/passwd')",
            "DELETE FROM commits",
        ):
            with pytest.raises(duckdb.Error):
                con.execute(sql).fetchall()
    finally:
        con.close()
    assert not (tmp_path / "leak.csv").exists() and not (tmp_path / "x.duckdb").exists()


def test_bad_sql_is_a_clean_error(reg):
    p = ah(reg.root, "query", "SELEC nonsense", check=False)
    assert p.returncode == 1 and p.stderr.startswith("error:") and "Traceback" not in p.stderr
    p = ah(reg.root, "query", "SELECT * FROM no_such_table", check=False)
    assert p.returncode == 1 and "no_such_table" in p.stderr


def test_runaway_query_is_stopped(reg):
    with pytest.raises(QueryFailed, match="longer than"):
        run_query(reg, "SELECT count(*) FROM range(100000000000) a, range(1000) b", timeout_s=0.5)
