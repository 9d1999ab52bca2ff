"""The derived DuckDB index: incremental updates equal a rebuild, it heals itself, and a
locked index never fails a write."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

import duckdb
import pytest

from adapterhub.index.build import rebuild
from adapterhub.index.queries import BadFilter, best, log_where, parse_where
from adapterhub.index.update import FRESH, REBUILT, UPDATED, sync
from adapterhub.registry import Registry

from ah_testkit import ah, index_rows, make_registry, rebuilt_rows, write_adapter


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    monkeypatch.setenv("AH_AUTHOR", "Tester <t@example.com>")
    monkeypatch.setenv("AH_HOME", str(tmp_path / "home"))
    # Every write catches the index up, so that each step below tests an incremental sync
    # (the default, lazy, leaves that to the next read: see test_lazy_writes_...).
    monkeypatch.setenv("AH_INDEX", "eager")


def _clock(monkeypatch):
    """Distinct, increasing commit times, so order-dependent output is deterministic."""
    t = [1_700_000_000]

    def tick():
        t[0] += 10
        monkeypatch.setenv("AH_COMMIT_TIME", str(t[0]))
    return tick


def test_commit_updates_index_incrementally(tmp_path):
    reg, ids = make_registry(tmp_path, 3)
    rows = index_rows(reg)
    assert sorted(r[0] for r in rows["commits"]) == sorted(ids)
    assert len(rows["parents"]) == 2 and len(rows["tensors"]) == 6 and len(rows["provenance"]) == 3
    assert {r[0] for r in rows["refs"]} == {"HEAD", "refs/heads/main"}
    assert sync(reg) == FRESH
    reg.add_eval("HEAD", {"acc": 0.5})
    assert [r[3:5] for r in index_rows(reg)["evals"]] == [("acc", 0.5)]
    assert sync(reg) == FRESH


def test_scenario_incremental_equals_rebuild(tmp_path, monkeypatch):
    """Forks (chain splits), merges, tags, evals, deletions (chain merges), forced moves."""
    tick = _clock(monkeypatch)
    reg = Registry.init(tmp_path / "reg")
    n = [0]

    def commit(msg, **kw):
        n[0] += 1
        tick()
        return reg.commit(write_adapter(tmp_path / f"ad{n[0]}", seed=n[0]), msg, **kw).id

    a = [commit(f"main {i}") for i in range(4)]
    reg.create_branch("feat", a[1])
    f1 = commit("feat 1", branch="feat")
    f2 = commit("feat 2", branch="feat")
    reg.create_branch("exp/x", a[1])
    x1 = commit("exp 1", branch="exp/x")
    m = commit("merge feat", extra_parents=("feat",))
    reg.create_tag("v1", a[0])
    reg.create_tag("v2", f2, message="annotated")
    reg.add_eval(f1, {"acc": 0.8, "loss": 1.5}, suite="s")
    reg.add_eval(m, {"acc": 0.9}, dataset="d")
    checkpoints = [index_rows(reg)]
    assert checkpoints[-1] == rebuilt_rows(reg, tmp_path)
    # Deleting exp/x leaves a[1] with one first-parent child again: its chains merge back.
    reg.delete_branch("exp/x")
    assert x1 not in {r[0] for r in index_rows(reg)["commits"]}
    assert index_rows(reg) == rebuilt_rows(reg, tmp_path)
    # A fork whose only other side is deleted: the parent's chain absorbs the survivor.
    reg.create_branch("side", a[3])
    commit("side 1", branch="side")
    chains_before = {r[0]: r[6:8] for r in index_rows(reg)["commits"]}
    assert chains_before[m] == (m, 0)  # m now starts its own chain
    reg.delete_branch("side")
    rows = index_rows(reg)
    assert {r[0]: r[6:8] for r in rows["commits"]}[m] != (m, 0)
    assert rows == rebuilt_rows(reg, tmp_path)
    # Forced move backwards, tag deletion, detached HEAD, switch.
    reg.create_branch("feat", a[0], force=True)
    reg.delete_tag("v2")
    reg.switch("feat")
    tick()
    commit("on moved feat")
    reg.refs.set_head_detached(a[2])
    reg._index_sync()
    assert index_rows(reg) == rebuilt_rows(reg, tmp_path)
    # The eval of a commit that dropped out comes back with the commit.
    reg.refs.set_head_symbolic("refs/heads/main")
    reg.create_branch("again", f1)
    assert any(r[1] == f1 for r in index_rows(reg)["evals"])
    assert index_rows(reg) == rebuilt_rows(reg, tmp_path)
    assert m in {r[0] for r in index_rows(reg)["commits"]}


def test_random_histories_incremental_equals_rebuild_and_ancestry(tmp_path, monkeypatch):
    tick = _clock(monkeypatch)
    rnd = random.Random(7)
    reg = Registry.init(tmp_path / "reg")
    n = 0
    branches = ["main"]
    for step in range(40):
        op = rnd.random()
        existing = [b.name for b in reg.branches()]
        if op < 0.55 or not existing:
            n += 1
            tick()
            b = rnd.choice(branches)
            extra = ()
            if existing and rnd.random() < 0.2:
                extra = (rnd.choice(existing),)
            try:
                reg.commit(write_adapter(tmp_path / f"a{n}", seed=n), f"c{n}", branch=b, extra_parents=extra)
            except Exception:
                pass
        elif op < 0.75:
            name = f"b{step}"
            reg.create_branch(name, rnd.choice(existing))
            branches.append(name)
        elif op < 0.85 and len(existing) > 1:
            victim = rnd.choice([b for b in existing if b != reg.current_branch()])
            reg.delete_branch(victim)
        elif op < 0.95:
            reg.add_eval(rnd.choice(existing), {"acc": round(rnd.random(), 3)}, suite=rnd.choice(["a", "b"]))
        else:
            reg.create_branch(rnd.choice(existing), rnd.choice(existing), force=True)
        if step % 8 == 7:
            assert index_rows(reg) == rebuilt_rows(reg, tmp_path), f"step {step}"
    assert index_rows(reg) == rebuilt_rows(reg, tmp_path)
    # Chain-label ancestry equals walking the objects, for every branch.
    for b in reg.branches():
        assert [i.id for i in log_where(reg, b.name)] == [i.id for i in reg.log(b.name)]


def test_reindex_command_yields_the_same_rows(tmp_path):
    reg, ids = make_registry(tmp_path, 3)
    reg.create_branch("dev", ids[0])
    reg.add_eval(ids[1], {"acc": 0.7})
    before = index_rows(reg)
    out = ah(reg.root, "reindex").stdout
    assert "Reindexed 3 commits" in out and "1 evals" in out
    assert index_rows(reg) == before


@pytest.mark.parametrize("damage", ["garbage", "truncate", "empty", "delete", "wal", "meta"])
def test_damaged_or_missing_index_is_rebuilt(tmp_path, damage):
    reg, ids = make_registry(tmp_path, 2)
    reg.add_eval("HEAD", {"acc": 0.5})
    good = index_rows(reg)
    path = reg.ah_dir / "index.duckdb"
    if damage == "garbage":
        path.write_bytes(b"not a database" * 1000)
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:5000])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "delete":
        path.unlink()
    elif damage == "wal":
        (reg.ah_dir / "index.duckdb.wal").write_bytes(b"\x00garbage wal" * 100)
    else:
        con = duckdb.connect(str(path))
        con.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
        con.close()
    # A read path heals it...
    assert [i.id for i in log_where(reg, "HEAD", [parse_where("metric:acc>=0.5")])] == [ids[1]]
    assert index_rows(reg) == good
    # ...and so does a write path, through the CLI, with exit code 0.
    path.write_bytes(b"junk" * 10)
    c = ah(reg.root, "commit", str(write_adapter(tmp_path / "new", seed=99)), "-m", "after damage")
    assert c.returncode == 0
    assert len(index_rows(reg)["commits"]) == 3


def test_stale_index_is_caught_up(tmp_path, monkeypatch):
    reg, ids = make_registry(tmp_path, 1)
    monkeypatch.setenv("AH_INDEX", "off")  # writes skip the index, like a crashed or busy sync
    new = reg.commit(write_adapter(tmp_path / "x", seed=5), "unindexed").id
    reg.add_eval(new, {"acc": 0.3})
    assert new not in {r[0] for r in index_rows(reg)["commits"]}
    monkeypatch.setenv("AH_INDEX", "eager")
    assert [b.info.id for b in best(reg, "acc")] == [new]
    assert index_rows(reg) == rebuilt_rows(reg, tmp_path)


def test_truncated_journal_forces_rebuild(tmp_path):
    reg, ids = make_registry(tmp_path, 1)
    reg.add_eval("HEAD", {"acc": 0.5})
    reg.add_eval("HEAD", {"f1": 0.4})
    (reg.ah_dir / "evals" / "journal").write_bytes(b"")
    assert sync(reg) == REBUILT
    assert len(index_rows(reg)["evals"]) == 2


HOLD_LOCK = """
import sys, time, duckdb
con = duckdb.connect(sys.argv[1])
con.execute("SELECT count(*) FROM commits").fetchall()
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
"""


def test_locked_index_never_fails_a_commit(tmp_path):
    reg, ids = make_registry(tmp_path, 1)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(reg.ah_dir / "index.duckdb"), "60"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        p = ah(reg.root, "commit", str(write_adapter(tmp_path / "b", seed=3)), "-m", "while locked")
        new = p.stdout.split()[-1]
        assert reg.resolve("HEAD") == new
        ah(reg.root, "eval", "add", "HEAD", "--metric", "acc=0.6")
        ah(reg.root, "branch", "side")
        assert sync.__name__  # the API path: a busy index is skipped, not raised
        reg.create_tag("t1")
    finally:
        holder.kill()
        holder.wait()
    # The next command catches up: the commit, its eval, the branch and the tag are all there.
    assert sync(reg) == UPDATED
    rows = index_rows(reg)
    assert new in {r[0] for r in rows["commits"]}
    assert {"refs/heads/side", "refs/tags/t1"} <= {r[0] for r in rows["refs"]}
    assert [r[3] for r in rows["evals"]] == ["acc"]
    assert rows == rebuilt_rows(reg, tmp_path)


def test_reader_waits_for_writer_lock(tmp_path):
    reg, _ = make_registry(tmp_path, 1)
    reg.add_eval("HEAD", {"acc": 0.1})
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(reg.ah_dir / "index.duckdb"), "1.5"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        out = ah(reg.root, "best", "acc")
        assert "acc=0.1" in out.stdout and time.monotonic() - t0 >= 0.5
    finally:
        holder.kill()
        holder.wait()


def test_log_where_filters_and_best(tmp_path, monkeypatch):
    tick = _clock(monkeypatch)
    reg = Registry.init(tmp_path / "reg")
    ids = []
    for i, (base, author) in enumerate([("org/a", "Ann <a@x>"), ("org/b", "Bob <b@x>"), ("org/a", "Bob <b@x>")]):
        tick()
        ids.append(reg.commit(write_adapter(tmp_path / f"ad{i}", seed=i, base=base), f"c{i}", author=author).id)
    reg.add_eval(ids[0], {"acc": 0.95, "loss": 0.5})
    reg.add_eval(ids[1], {"acc": 0.85, "loss": 0.3})
    reg.add_eval(ids[2], {"acc": 0.90, "loss": 0.9})
    reg.create_branch("old", ids[0])

    def where(*exprs, rev="HEAD"):
        return [i.id for i in log_where(reg, rev, [parse_where(e) for e in exprs])]

    assert where("base_model=org/a") == [ids[2], ids[0]]
    assert where("base_model=org/a", "author=Bob <b@x>") == [ids[2]]
    assert where("author~Bob") == [ids[2], ids[1]]
    assert where("base_model!=org/a") == [ids[1]]
    assert where("metric:acc>=0.9") == [ids[2], ids[0]]
    assert where("metric:acc > 0.9") == [ids[0]]
    assert where("metric:loss<0.5") == [ids[1]]
    assert where("metric:acc>=0.9", rev="old") == [ids[0]]
    assert where(f"timestamp>={reg.commit_info(ids[1]).timestamp}") == [ids[2], ids[1]]
    assert [b.info.id for b in best(reg, "acc")] == [ids[0]]
    assert [b.info.id for b in best(reg, "loss", minimize=True, n=3)] == [ids[1], ids[0], ids[2]]
    assert [b.info.id for b in best(reg, "acc", rev="old")] == [ids[0]]
    assert best(reg, "nope") == []
    # Via the CLI, and JSON output.
    out = json.loads(ah(reg.root, "log", "--where", "metric:acc>=0.9", "--where", "base_model=org/a",
                        "-n", "1", "--format", "json").stdout)
    assert [c["id"] for c in out] == [ids[2]] and out[0]["evals"][0]["metric"] == "acc"
    b = json.loads(ah(reg.root, "best", "loss", "--min", "--branch", "main", "--format", "json").stdout)
    assert b[0]["id"] == ids[1] and b[0]["eval"]["value"] == 0.3
    for bad in ("nosuch=1", "metric:acc>=high", "metric:acc>=nan", "timestamp>=soon", "author>x"):
        with pytest.raises(BadFilter):
            parse_where(bad)
        p = ah(reg.root, "log", "--where", bad, check=False)
        assert p.returncode == 2 and p.stderr.startswith("error:")


INJECTIONS = [
    "x' OR '1'='1",
    "x'; DROP TABLE commits; --",
    "') OR 1=1 --",
    "\" OR \"\"=\"",
    "%",
    "_",
]


@pytest.mark.parametrize("payload", INJECTIONS)
def test_filter_values_and_metric_names_are_literal(tmp_path, payload):
    reg, ids = make_registry(tmp_path, 2)
    reg.add_eval(ids[0], {"acc": 0.5})
    assert log_where(reg, "HEAD", [parse_where(f"author={payload}")]) == []
    assert log_where(reg, "HEAD", [parse_where(f"base_model={payload}")]) == []
    assert log_where(reg, "HEAD", [parse_where(f"metric:{payload.replace('=', '')}>=0")]) == []
    assert best(reg, payload.replace("=", "") or "x") == []
    # A metric literally named like an injection is found by exactly that name.
    name = payload.replace("=", "").strip() or "q"
    reg.add_eval(ids[1], {name: 1.0})
    assert [b.info.id for b in best(reg, name)] == [ids[1]]
    rows = index_rows(reg)
    assert len(rows["commits"]) == 2 and len(rows["evals"]) == 2


def test_log_without_where_does_not_touch_duckdb(tmp_path):
    reg, ids = make_registry(tmp_path, 2)
    (reg.ah_dir / "index.duckdb").unlink()
    code = (
        "import sys\nfrom adapterhub.cli.main import cli\n"
        "try:\n    cli(['--registry', sys.argv[1], 'log', '--format', 'json'], prog_name='ah')\n"
        "except SystemExit as e:\n    assert e.code == 0, e.code\n"
        "print('DUCKDB' if 'duckdb' in sys.modules else 'CLEAN', file=sys.stderr)\n"
    )
    p = subprocess.run([sys.executable, "-c", code, str(reg.root)], capture_output=True, text=True, timeout=60)
    assert p.stderr.strip().endswith("CLEAN"), p.stderr
    assert [c["id"] for c in json.loads(p.stdout)] == ids[::-1]
    assert not (reg.ah_dir / "index.duckdb").exists()
    h = subprocess.run([sys.executable, "-c", "import sys\nimport adapterhub.cli.main\nprint('duckdb' in sys.modules)"],
                       capture_output=True, text=True, timeout=60)
    assert h.stdout.strip() == "False"


def test_lazy_writes_leave_the_index_to_the_next_read(tmp_path, monkeypatch):
    """The default: commits, evals and branch moves never touch DuckDB; the first query
    catches up everything written since, and gives what a rebuild gives."""
    monkeypatch.delenv("AH_INDEX")
    tick = _clock(monkeypatch)
    reg, ids = make_registry(tmp_path, 2)
    assert not (reg.ah_dir / "index.duckdb").exists()
    assert [b.info.id for b in best(reg, "acc")] == []  # first read builds it
    tick()
    new = reg.commit(write_adapter(tmp_path / "lazy", seed=11), "lazy commit").id
    reg.add_eval(new, {"acc": 0.7})
    reg.create_branch("side", ids[0])
    assert new not in {r[0] for r in index_rows(reg)["commits"]}  # the write left it behind
    assert [b.info.id for b in best(reg, "acc")] == [new]
    assert index_rows(reg) == rebuilt_rows(reg, tmp_path)
    assert "refs/heads/side" in {r[0] for r in index_rows(reg)["refs"]}


def test_index_off_switch(tmp_path, monkeypatch):
    monkeypatch.setenv("AH_INDEX", "off")
    reg, _ = make_registry(tmp_path, 2)
    assert not (reg.ah_dir / "index.duckdb").exists()


def test_dangling_revision_is_a_clear_error(tmp_path):
    reg, ids = make_registry(tmp_path, 2)
    reg.create_branch("tmp", ids[0])
    reg.switch("tmp")
    reg.commit(write_adapter(tmp_path / "z", seed=9), "dangling soon")
    dangling = reg.resolve("HEAD")
    reg.switch("main")
    reg.delete_branch("tmp")
    with pytest.raises(Exception, match="not reachable"):
        log_where(reg, dangling, [])


def test_stat_signature_fast_path_still_sees_ref_moves(tmp_path, monkeypatch):
    from adapterhub.index import extract
    from adapterhub.refs import HEADS

    monkeypatch.setattr(extract, "RACY_NS", 0)  # trust every signature, to exercise the fast path
    reg, ids = make_registry(tmp_path, 2)
    assert sync(reg) == FRESH
    time.sleep(0.05)
    # Move refs behind the registry's back (no sync), as another tool or a crash would.
    reg.refs.update(HEADS + "side", ids[0], expected=None, who="t", message="raw")
    assert sync(reg) == UPDATED
    assert "refs/heads/side" in {r[0] for r in index_rows(reg)["refs"]}
    time.sleep(0.05)
    reg.refs.set_head_detached(ids[0])
    assert sync(reg) == UPDATED
    time.sleep(0.05)
    reg.refs.delete(HEADS + "side", expected=ids[0])
    assert sorted(i.id for i in log_where(reg, "main")) == sorted(ids)
    assert "refs/heads/side" not in {r[0] for r in index_rows(reg)["refs"]}
    assert index_rows(reg) == rebuilt_rows(reg, tmp_path)


def test_best_ranks_commits_not_records(tmp_path, monkeypatch):
    tick = _clock(monkeypatch)
    reg, ids = make_registry(tmp_path, 3)
    for i in range(12):  # many high records on one commit must not crowd out the others
        tick()
        reg.add_eval(ids[0], {"acc": 0.9 + i / 1000})
    reg.add_eval(ids[1], {"acc": 0.5})
    reg.add_eval(ids[2], {"acc": 0.7})
    got = best(reg, "acc", n=3)
    assert [b.info.id for b in got] == [ids[0], ids[2], ids[1]]
    assert got[0].eval.record.value == 0.911
    assert [b.info.id for b in best(reg, "acc", n=3, minimize=True)] == [ids[1], ids[2], ids[0]]
    assert [b.info.id for b in best(reg, "acc", rev=ids[1], n=5)] == [ids[0], ids[1]]


def test_torn_journal_tail_does_not_keep_the_index_stale(tmp_path):
    reg, ids = make_registry(tmp_path, 1)
    reg.add_eval("HEAD", {"acc": 0.5})
    with open(reg.ah_dir / "evals" / "journal", "ab") as fh:
        fh.write(b"\n" + ids[0][:20].encode())  # a crash mid-append
    assert sync(reg) == UPDATED
    assert sync(reg) == FRESH  # the partial line is remembered, not re-read forever
    reg.add_eval("HEAD", {"f1": 0.25})  # the next append still lands on its own line
    assert sorted(r[3] for r in index_rows(reg)["evals"]) == ["acc", "f1"]
    assert index_rows(reg) == rebuilt_rows(reg, tmp_path)


def test_same_snapshot_committed_twice_and_evals_caught_up(tmp_path, monkeypatch):
    reg, ids = make_registry(tmp_path, 1)
    monkeypatch.setenv("AH_INDEX", "off")
    again = reg.commit(tmp_path / "ad0", "same folder again").id  # reuses an indexed snapshot
    reg.add_eval(ids[0], {"acc": 0.1})
    reg.add_eval(again, {"acc": 0.2})
    monkeypatch.setenv("AH_INDEX", "eager")
    assert sync(reg) == UPDATED
    rows = index_rows(reg)
    assert len(rows["snapshots"]) == 1 and len(rows["evals"]) == 2
    assert rows == rebuilt_rows(reg, tmp_path)


HOLD_READ = """
import sys, time, duckdb
con = duckdb.connect(sys.argv[1], read_only=True)
con.execute("SELECT count(*) FROM commits").fetchall()
print("reading", flush=True)
time.sleep(float(sys.argv[2]))
"""


def test_a_long_reader_elsewhere_never_yields_a_stale_answer(tmp_path, monkeypatch):
    """Another process reading the index blocks our catch-up: we wait, never serve stale rows."""
    reg, ids = make_registry(tmp_path, 1)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_READ, str(reg.ah_dir / "index.duckdb"), "2"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "reading"
        new = reg.commit(write_adapter(tmp_path / "n", seed=8), "while read").id  # its sync is skipped
        reg.add_eval(new, {"acc": 0.4})
        got = best(reg, "acc")  # waits for the reader to go, then catches up
        assert [b.info.id for b in got] == [new]
    finally:
        holder.kill()
        holder.wait()
    from adapterhub.index import update

    monkeypatch.setattr(update, "READ_WAIT_S", 0.3)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_READ, str(reg.ah_dir / "index.duckdb"), "30"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "reading"
        reg.add_eval(new, {"acc": 0.9, "f1": 0.5})
        from adapterhub.index.db import IndexBusy

        with pytest.raises(IndexBusy, match="try again"):
            best(reg, "f1")
    finally:
        holder.kill()
        holder.wait()
    assert [b.eval.record.value for b in best(reg, "acc")] == [0.9]
