"""Eval records: the object format, the per-commit list, the API and `ah eval`."""

from __future__ import annotations

import json
import math

import pytest

from adapterhub.errors import CorruptObject, UnknownRevision
from adapterhub.evals import (
    LIST_HEADER,
    BadEval,
    EvalLists,
    EvalRecord,
    parse_metric_args,
)
from adapterhub.objects import EVAL, canonical_json, parse_object

from ah_testkit import ah, make_registry


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("AH_AUTHOR", "Tester <t@example.com>")
    monkeypatch.setenv("AH_COMMIT_TIME", "1700000000")


def test_add_and_list_roundtrip(tmp_path):
    reg, ids = make_registry(tmp_path, 2)
    out = reg.add_eval(ids[0], {"acc": 0.91, "loss": 1.2}, suite="S", dataset="d1", details={"n": 100})
    assert [e.record.metric for e in out] == ["acc", "loss"]
    listed = reg.evals(ids[0])
    assert [e.id for e in listed] == [e.id for e in out]
    rec = listed[0].record
    assert (rec.commit, rec.value, rec.suite, rec.dataset, rec.evaluator, rec.timestamp, rec.details) == (
        ids[0], 0.91, "S", "d1", "Tester <t@example.com>", 1700000000, {"n": 100})
    assert reg.evals(ids[1]) == []
    assert reg.evals() == []  # HEAD is ids[1]
    # Objects are ordinary store objects: verified on read, parsed to EvalRecord.
    assert isinstance(reg.store.get(out[1].id, EVAL), EvalRecord)


def test_same_eval_twice_is_one_object_one_list_entry(tmp_path):
    reg, ids = make_registry(tmp_path, 1)
    a = reg.add_eval("HEAD", {"acc": 0.5})
    b = reg.add_eval("HEAD", {"acc": 0.5})
    assert a[0].id == b[0].id
    assert len(reg.evals()) == 1


def test_integer_values_become_floats_canonically(tmp_path):
    reg, _ = make_registry(tmp_path, 1)
    e = reg.add_eval("HEAD", {"steps": 3})[0]
    assert e.record.value == 3.0 and isinstance(e.record.value, float)
    body = reg.store.read(e.id)[1]
    assert b'"value":3.0' in body
    # The same record with an int in the body is a second encoding: refused.
    with pytest.raises(CorruptObject):
        parse_object("x" * 64, EVAL, body.replace(b'"value":3.0', b'"value":3'))


@pytest.mark.parametrize("bad", ["nan", "NaN", "inf", "-inf", "1e400", "abc", "", "0x10", "true"])
def test_bad_metric_values_refused(tmp_path, bad):
    with pytest.raises(BadEval):
        parse_metric_args([f"acc={bad}"])


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, True, None, "x", [1]])
def test_bad_values_refused_by_api_and_nothing_written(tmp_path, value):
    reg, _ = make_registry(tmp_path, 1)
    before = set(reg.store.iter_ids())
    with pytest.raises(BadEval):
        reg.add_eval("HEAD", {"ok": 1.0, "bad": value})
    assert set(reg.store.iter_ids()) == before
    assert reg.evals() == []


@pytest.mark.parametrize("name", ["", " acc", "a=b", "a\nb", "x" * 129])
def test_bad_metric_names_refused(tmp_path, name):
    reg, _ = make_registry(tmp_path, 1)
    with pytest.raises(BadEval):
        reg.add_eval("HEAD", {name: 1.0})


def test_sql_looking_metric_name_is_just_a_name(tmp_path):
    reg, _ = make_registry(tmp_path, 1)
    name = "acc'); DROP TABLE evals; --"
    reg.add_eval("HEAD", {name: 0.7})
    assert reg.evals()[0].record.metric == name


def test_eval_on_unknown_revision(tmp_path):
    reg, _ = make_registry(tmp_path, 1)
    with pytest.raises(UnknownRevision):
        reg.add_eval("no-such-branch", {"acc": 1.0})
    with pytest.raises(UnknownRevision):
        reg.add_eval("f" * 64, {"acc": 1.0})
    assert not (reg.ah_dir / "evals").exists() or not any((reg.ah_dir / "evals").glob("*/*"))


def test_list_file_format_and_journal(tmp_path):
    reg, ids = make_registry(tmp_path, 1)
    out = reg.add_eval("HEAD", {"acc": 0.1, "f1": 0.2})
    path = reg.ah_dir / "evals" / ids[0][:2] / ids[0][2:]
    assert path.read_text() == "\n".join([LIST_HEADER, out[0].id, out[1].id]) + "\n"
    lists = EvalLists(reg.ah_dir)
    changed, end = lists.journal_since(0)
    assert changed == {ids[0]} and end == lists.journal_size()
    # A torn journal line (crash mid-append) never hides the next entry.
    with open(lists.journal_path, "ab") as fh:
        fh.write(b"\nab12")
    reg.add_eval("HEAD", {"f2": 0.3})
    changed, _ = lists.journal_since(end)
    assert changed == {ids[0]}


def test_corrupt_list_and_mismatched_eval_are_errors(tmp_path):
    reg, ids = make_registry(tmp_path, 2)
    reg.add_eval(ids[0], {"acc": 0.1})
    path = reg.ah_dir / "evals" / ids[0][:2] / ids[0][2:]
    path.write_text("garbage\n")
    with pytest.raises(CorruptObject):
        reg.evals(ids[0])
    # An eval of commit 1 listed under commit 0 is caught, not shown as commit 0's.
    other = reg.add_eval(ids[1], {"acc": 0.2})[0]
    path.write_text(f"{LIST_HEADER}\n{other.id}\n")
    with pytest.raises(Exception, match="listed under commit"):
        reg.evals(ids[0])


def test_stale_lock_reports_clearly(tmp_path, monkeypatch):
    from adapterhub import evals as evals_mod
    from adapterhub.errors import RefLocked

    monkeypatch.setattr(evals_mod, "LOCK_WAIT_S", 0.1)
    reg, ids = make_registry(tmp_path, 1)
    reg.add_eval("HEAD", {"acc": 0.1})
    lock = reg.ah_dir / "evals" / ids[0][:2] / (ids[0][2:] + ".lock")
    lock.write_text("")
    with pytest.raises(RefLocked, match="locked"):
        reg.add_eval("HEAD", {"acc": 0.2})
    assert len(reg.evals()) == 1


def test_parse_rejects_noncanonical_and_missing_fields():
    rec = EvalRecord("a" * 64, "acc", 0.5, "S", "me", 1)
    body = rec.serialize()
    assert parse_object("x", EVAL, body) == rec
    d = json.loads(body)
    del d["suite"]
    with pytest.raises(CorruptObject):
        parse_object("x", EVAL, canonical_json(d))
    d = json.loads(body)
    d["version"] = 2
    with pytest.raises(CorruptObject, match="version"):
        parse_object("x", EVAL, canonical_json(d))
    with pytest.raises(CorruptObject):
        parse_object("x", EVAL, body.replace(b'"value":0.5', b'"value":NaN'))


def test_cli_eval_add_and_list(tmp_path):
    reg, ids = make_registry(tmp_path, 1)
    root = reg.root
    p = ah(root, "eval", "add", "HEAD", "--metric", "acc=0.91", "--metric", "loss=1.2", "--suite", "S",
           "--dataset", "D", "--evaluator", "ci", "--detail", "n=5")
    assert "acc=0.91" in p.stdout and "loss=1.2" in p.stdout
    data = json.loads(ah(root, "eval", "list", "--format", "json").stdout)
    assert [(d["metric"], d["value"], d["suite"], d["dataset"], d["evaluator"], d["details"]) for d in data] == [
        ("acc", 0.91, "S", "D", "ci", {"n": 5}), ("loss", 1.2, "S", "D", "ci", {"n": 5})]
    assert all(d["commit"] == ids[0] for d in data)
    for args in (["--metric", "acc=nan"], ["--metric", "acc=inf"], ["--metric", "acc=high"], ["--metric", "acc"]):
        bad = ah(root, "eval", "add", "HEAD", *args, check=False)
        assert bad.returncode == 2 and bad.stderr.startswith("error:") and "Traceback" not in bad.stderr
    bad = ah(root, "eval", "add", "nope", "--metric", "acc=1", check=False)
    assert bad.returncode == 2 and "unknown revision" in bad.stderr
    assert len(json.loads(ah(root, "eval", "list", "--format", "json").stdout)) == 2


def test_show_and_log_json_carry_evals(tmp_path):
    reg, ids = make_registry(tmp_path, 2)
    reg.add_eval(ids[0], {"acc": 0.25}, suite="glue")
    text = ah(reg.root, "show", ids[0]).stdout
    assert "Evals:" in text and "acc=0.25" in text and "suite=glue" in text
    assert "Evals:" not in ah(reg.root, "show", ids[1]).stdout
    js = json.loads(ah(reg.root, "show", ids[0], "--format", "json").stdout)
    assert [(e["metric"], e["value"], e["suite"]) for e in js["evals"]] == [("acc", 0.25, "glue")]
    log = json.loads(ah(reg.root, "log", "--format", "json").stdout)
    assert [len(c["evals"]) for c in log] == [0, 1] and log[1]["evals"][0]["commit"] == ids[0]


def test_evals_travel_with_their_objects(tmp_path):
    """What a transport does: send the commit's eval objects, relink them on arrival."""
    from adapterhub.evals import eval_ids_of, link_received
    from adapterhub.registry import Registry

    src, ids = make_registry(tmp_path, 1)
    sent = src.add_eval("HEAD", {"acc": 0.9, "loss": 0.1}, suite="s")
    dst = Registry.init(tmp_path / "dst")
    wanted = eval_ids_of(EvalLists(src.ah_dir), ids)
    assert wanted == [e.id for e in sent]
    for oid in wanted:  # copy the objects as a transport would
        obj_type, body = src.store.read(oid)
        dst.store.put(obj_type, body)
    lists = EvalLists(dst.ah_dir)
    assert link_received(dst.store, lists, wanted) == 2
    assert link_received(dst.store, lists, wanted) == 0  # idempotent
    assert lists.read(ids[0]) == wanted


@pytest.mark.parametrize("damaged", ["\v", "\f", "\x1c", "\x1e"])
def test_a_newline_damaged_into_another_line_break_is_caught(tmp_path, damaged):
    """The list is written with "\\n" only; read with splitlines(), a newline turned into
    \\v, \\f or \\x1c-\\x1e by a flipped bit read the same and went unseen (helper-25)."""
    reg, ids = make_registry(tmp_path, 1)
    reg.add_eval(ids[0], {"acc": 0.9, "loss": 1.0})
    lists = EvalLists(reg.ah_dir)
    path = lists._path(ids[0])
    text = path.read_text()
    assert text.count("\n") == 3 and text.endswith("\n")
    assert len(lists.read(ids[0])) == 2
    path.write_text(text.replace("\n", damaged, 2).replace(damaged, "\n", 1))  # the second newline only
    with pytest.raises(CorruptObject, match="not an object id"):
        lists.read(ids[0])
