"""Refs: compare-and-swap updates, locks, hierarchical names, reflog, deletion, name rules,
and concurrent commits that must never lose a commit that reported success."""

from __future__ import annotations

import multiprocessing
import os
import traceback
from pathlib import Path

import pytest
from ah_testkit import write_adapter
from conftest import TEST_AUTHOR, run_ah

from adapterhub import provenance
from adapterhub.errors import BadRefName, CorruptObject, RefConflict, RefExists, RefLocked, UnknownRevision, UsageError
from adapterhub.refs import HEADS, TAGS, ZERO_ID, check_ref_name
from adapterhub.registry import Registry

@pytest.fixture
def reg(registry, tmp_path) -> Registry:
    """main: first - second."""
    registry.commit(write_adapter(tmp_path / "a1", 1), "first")
    registry.commit(write_adapter(tmp_path / "a2", 2), "second")
    return registry


def _ids(reg: Registry) -> tuple[str, str]:
    log = reg.log("main")
    return log[1].id, log[0].id  # (first, second)


def _locks(reg: Registry) -> list[str]:
    return sorted(p.relative_to(reg.ah_dir).as_posix() for p in reg.ah_dir.rglob("*.lock"))


# --- compare-and-swap ----------------------------------------------------------------------


def test_update_with_expected_moves_ref(reg):
    first, second = _ids(reg)
    reg.refs.update(HEADS + "main", first, expected=second)
    assert reg.refs.read(HEADS + "main") == first


def test_update_with_wrong_expected_is_refused(reg):
    first, second = _ids(reg)
    with pytest.raises(RefConflict) as exc:
        reg.refs.update(HEADS + "main", first, expected=first)
    assert "refs/heads/main" in str(exc.value)
    assert second[:12] in str(exc.value)  # says where the ref really is
    assert reg.refs.read(HEADS + "main") == second
    assert _locks(reg) == []


def test_update_expected_none_on_existing_is_refused(reg):
    first, second = _ids(reg)
    with pytest.raises(RefExists, match="refs/heads/main already exists"):
        reg.refs.update(HEADS + "main", first, expected=None)
    assert reg.refs.read(HEADS + "main") == second
    assert _locks(reg) == []


def test_update_expected_id_on_missing_is_refused(reg):
    first, _ = _ids(reg)
    with pytest.raises(RefConflict):
        reg.refs.update(HEADS + "nope", first, expected=first)
    assert reg.refs.read(HEADS + "nope") is None


def test_create_branch_twice_is_refused(reg):
    first, second = _ids(reg)
    reg.create_branch("dev", first)
    with pytest.raises(RefExists):
        reg.create_branch("dev", second)
    assert reg.refs.read(HEADS + "dev") == first
    reg.create_branch("dev", second, force=True)
    assert reg.refs.read(HEADS + "dev") == second


def test_ref_file_is_whole_id_and_newline(reg):
    _, second = _ids(reg)
    assert (reg.ah_dir / "refs/heads/main").read_text() == second + "\n"


# --- locks --------------------------------------------------------------------------------


def test_stale_lock_is_reported_with_its_path(reg):
    first, second = _ids(reg)
    lock = reg.ah_dir / "refs" / "heads" / "main.lock"
    lock.write_text("")
    with pytest.raises(RefLocked) as exc:
        reg.refs.update(HEADS + "main", first, expected=second)
    assert str(lock) in str(exc.value)
    assert "remove that file" in str(exc.value)
    assert reg.refs.read(HEADS + "main") == second
    assert lock.exists()  # someone else's lock is never removed by the loser
    # A commit on that branch is refused the same way, and stores no ref move.
    with pytest.raises(RefLocked):
        reg.commit(write_adapter(reg.root.parent / "a3", 3), "third")
    assert reg.refs.read(HEADS + "main") == second
    lock.unlink()
    reg.refs.update(HEADS + "main", first, expected=second)
    assert reg.refs.read(HEADS + "main") == first


def test_stale_lock_on_delete(reg):
    first, _ = _ids(reg)
    reg.create_branch("dev", first)
    lock = reg.ah_dir / "refs" / "heads" / "dev.lock"
    lock.write_text("")
    with pytest.raises(RefLocked, match=str(lock)):
        reg.delete_branch("dev")
    assert reg.refs.read(HEADS + "dev") == first


def test_lock_files_are_not_listed_as_refs(reg):
    (reg.ah_dir / "refs" / "heads" / "ghost.lock").write_text(ZERO_ID + "\n")
    assert [b.name for b in reg.branches()] == ["main"]


def test_cli_stale_lock(reg):
    lock = reg.ah_dir / "refs" / "heads" / "main.lock"
    lock.write_text("")
    rc, _, err = run_ah("--registry", reg.root, "commit", write_adapter(reg.root.parent / "a3", 3), "-m", "x")
    assert rc == 1, err
    assert err.startswith("error: ") and err.count("\n") == 1 and str(lock) in err


# --- hierarchical names -----------------------------------------------------------------


def test_hierarchical_branch(reg):
    first, second = _ids(reg)
    reg.create_branch("users/alice/main", first)
    reg.create_branch("users/bob/main", second)
    assert (reg.ah_dir / "refs/heads/users/alice/main").is_file()
    assert [b.name for b in reg.branches()] == ["main", "users/alice/main", "users/bob/main"]
    assert reg.resolve("users/alice/main") == first
    assert reg.resolve("refs/heads/users/bob/main") == second
    reg.switch("users/alice/main")
    assert reg.current_branch() == "users/alice/main"
    res = reg.commit(write_adapter(reg.root.parent / "a3", 3), "alice's")
    assert res.branch == "users/alice/main" and res.parents == (first,)
    assert reg.refs.read(HEADS + "main") == second


def test_branch_vs_sub_branch_conflict(reg):
    first, _ = _ids(reg)
    reg.create_branch("a", first)
    with pytest.raises(RefExists, match="cannot create refs/heads/a/b"):
        reg.create_branch("a/b", first)
    assert reg.refs.read(HEADS + "a") == first
    assert _locks(reg) == []


def test_sub_branch_vs_branch_conflict(reg):
    first, _ = _ids(reg)
    reg.create_branch("x/y", first)
    with pytest.raises(RefExists, match=r"cannot create refs/heads/x: refs exist below it"):
        reg.create_branch("x", first)
    assert reg.refs.read(HEADS + "x/y") == first
    # Once x/y is gone (and its empty folder pruned), x can be created.
    reg.delete_branch("x/y")
    assert not (reg.ah_dir / "refs/heads/x").exists()
    reg.create_branch("x", first)
    assert reg.resolve("x") == first
    assert [(e.old, e.new) for e in reg.refs.reflog(HEADS + "x")] == [(ZERO_ID, first)]
    # ... and back again: x/y after x was deleted.
    reg.delete_branch("x")
    reg.create_branch("x/y", first)
    assert [(e.old, e.new) for e in reg.refs.reflog(HEADS + "x/y")] == [(ZERO_ID, first)]


def test_cli_branch_conflict_is_one_error_line(reg):
    first, _ = _ids(reg)
    reg.create_branch("a", first)
    rc, _, err = run_ah("--registry", reg.root, "branch", "a/b")
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert "refs/heads/a/b" in err


# --- reflog -------------------------------------------------------------------------------


def test_reflog_records_every_move(reg):
    first, second = _ids(reg)
    log = reg.refs.reflog(HEADS + "main")
    assert [(e.old, e.new) for e in log] == [(ZERO_ID, first), (first, second)]
    assert log[0].message == "commit (initial): first"
    assert log[1].message == "commit: second"
    assert all(e.who == TEST_AUTHOR and e.timestamp > 0 for e in log)

    reg.create_branch("dev", first)
    reg.create_branch("dev", second, force=True)
    dev = reg.refs.reflog(HEADS + "dev")
    assert [(e.old, e.new) for e in dev] == [(ZERO_ID, first), (first, second)]
    assert dev[0].message == "branch: created from " + first
    # As in git, a deleted branch takes its reflog with it (docs/format/refs.md).
    reg.delete_branch("dev")
    assert reg.refs.reflog(HEADS + "dev") == []
    assert not (reg.ah_dir / "logs/refs/heads/dev").exists()


def test_reflog_message_is_one_line(reg):
    res = reg.commit(write_adapter(reg.root.parent / "a3", 3), "multi\nline\tmessage")
    last = reg.refs.reflog(HEADS + "main")[-1]
    assert last.new == res.id and last.message == "commit: multi"
    raw = (reg.ah_dir / "logs/refs/heads/main").read_text().splitlines()
    assert len(raw) == 3


def test_failed_update_writes_no_reflog(reg):
    first, _ = _ids(reg)
    before = reg.refs.reflog(HEADS + "main")
    with pytest.raises(RefConflict):
        reg.refs.update(HEADS + "main", first, expected=first)
    assert reg.refs.reflog(HEADS + "main") == before


def test_tag_reflog(reg):
    first, _ = _ids(reg)
    reg.create_tag("v1", first)
    assert [(e.old, e.new) for e in reg.refs.reflog(TAGS + "v1")] == [(ZERO_ID, first)]


# --- delete --------------------------------------------------------------------------------


def test_delete_branch(reg):
    first, _ = _ids(reg)
    reg.create_branch("dev", first)
    info = reg.delete_branch("dev")
    assert info.commit == first
    assert reg.refs.read(HEADS + "dev") is None
    with pytest.raises(UnknownRevision):
        reg.resolve("dev")
    with pytest.raises(UnknownRevision, match="branch 'dev' not found"):
        reg.delete_branch("dev")
    # The commit itself is not lost: it is still reachable from main.
    assert first in [c.id for c in reg.log("main")]


def test_delete_current_branch_refused(reg):
    with pytest.raises(UsageError, match="HEAD points at it"):
        reg.delete_branch("main")
    assert reg.refs.read(HEADS + "main") is not None


def test_delete_with_wrong_expected_is_refused(reg):
    first, second = _ids(reg)
    reg.create_branch("dev", first)
    with pytest.raises(RefConflict):
        reg.refs.delete(HEADS + "dev", expected=second)
    assert reg.refs.read(HEADS + "dev") == first
    assert _locks(reg) == []


def test_delete_tag(reg):
    first, _ = _ids(reg)
    reg.create_tag("v1", first)
    reg.delete_tag("v1")
    assert reg.tags() == []
    with pytest.raises(UnknownRevision):
        reg.delete_tag("v1")


# --- name rules -----------------------------------------------------------------------------

BAD_NAMES = [
    "", "..", "a..b", "a/../b", "~", "a~1", "^", "a^", ":", "a:b", "a b", " a", "a ",
    "a\tb", "a\nb", "a\x00b", "a\x01b", "a\x7fb", "?", "a*", "a[b", "a\\b", "x.lock", "a/b.lock",
    ".hidden", "a/.b", "@{", "a@{1}", "@", "/a", "a/", "a//b", "a.", "HEAD", "refs/heads/x", "x" * 201,
]
GOOD_NAMES = ["main", "users/alice/main", "v1.0", "feature-x_y", "a@b", "a.lock.b", "ü-unicode", "x" * 200]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_ref_names_refused(reg, name):
    with pytest.raises(BadRefName) as exc:
        check_ref_name(name)
    assert repr(name) in str(exc.value)
    before = sorted(p.relative_to(reg.ah_dir).as_posix() for p in (reg.ah_dir / "refs").rglob("*"))
    for call in (
        lambda: reg.create_branch(name),
        lambda: reg.create_tag(name),
        lambda: reg.switch(name, create=True),
        lambda: reg.delete_branch(name),
        lambda: reg.commit(reg.root.parent / "a1", "x", branch=name),
    ):
        with pytest.raises(BadRefName):
            call()
    after = sorted(p.relative_to(reg.ah_dir).as_posix() for p in (reg.ah_dir / "refs").rglob("*"))
    assert after == before


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_good_ref_names_accepted(reg, name):
    check_ref_name(name)
    info = reg.create_branch(name, force=True)
    assert reg.resolve(name) == info.commit


def test_init_refuses_bad_default_branch(tmp_path):
    with pytest.raises(BadRefName):
        Registry.init(tmp_path / "r", default_branch="bad name")
    assert not (tmp_path / "r" / ".ah").exists()


@pytest.mark.parametrize("name", ["a..b", "x.lock", "a b", "@{"])
def test_cli_bad_ref_name(reg, name):
    for args in (["branch", name], ["tag", name], ["switch", "-c", name]):
        rc, _, err = run_ah("--registry", reg.root, *args)
        assert rc == 2, (args, err)
        assert err.startswith("error: invalid ") and err.count("\n") == 1


# --- races -----------------------------------------------------------------------------------


def test_commit_detects_branch_moved_during_commit(reg, monkeypatch):
    """Deterministic race: another commit lands while ours is being built."""
    _, second = _ids(reg)
    real_collect = provenance.collect
    inner: list[str] = []

    def collect_and_race(*args, **kwargs):
        if not inner:
            inner.append("running")
            inner[0] = reg.commit(write_adapter(reg.root.parent / "rival", 77), "rival").id
        return real_collect(*args, **kwargs)

    monkeypatch.setattr(provenance, "collect", collect_and_race)
    with pytest.raises(RefConflict, match="refs/heads/main"):
        reg.commit(write_adapter(reg.root.parent / "loser", 78), "loser")
    rival = inner[0]
    assert reg.refs.read(HEADS + "main") == rival
    assert [c.message for c in reg.log("main")] == ["rival", "second", "first"]
    assert reg.log("main")[1].id == second


def test_commit_on_detached_head_detects_a_race(reg, monkeypatch):
    """The same race with a detached HEAD: HEAD moves by compare-and-swap too, so neither a
    concurrent commit nor a concurrent switch back to a branch is overwritten."""
    first, second = _ids(reg)
    reg.refs.set_head_detached(first)
    real_collect = provenance.collect
    rival: list[str] = []

    def collect_and_race(*args, **kwargs):
        if not rival:
            rival.append("running")  # the rival's own collect() call must not race again
            rival[0] = reg.commit(write_adapter(reg.root.parent / "rival", 77), "rival on detached").id
        return real_collect(*args, **kwargs)

    monkeypatch.setattr(provenance, "collect", collect_and_race)
    with pytest.raises(RefConflict, match="HEAD"):
        reg.commit(write_adapter(reg.root.parent / "loser", 78), "loser")
    assert reg.refs.read_head() == (None, rival[0])
    assert reg.store.get_commit(rival[0]).parents == (first,)

    # A switch that lands meanwhile is not undone either.
    def collect_and_switch(*args, **kwargs):
        reg.switch("main")
        return real_collect(*args, **kwargs)

    monkeypatch.setattr(provenance, "collect", collect_and_switch)
    with pytest.raises(RefConflict, match="HEAD"):
        reg.commit(write_adapter(reg.root.parent / "loser2", 79), "loser 2")
    assert reg.refs.read_head() == (HEADS + "main", second)


def _commit_worker(root: str, folder_base: str, worker: int, rounds: int, barrier, queue) -> None:
    """Commit `rounds` adapters to main; report ("ok", id) or (error type, message) for each."""
    try:
        os.environ["AH_AUTHOR"] = f"Worker {worker} <w{worker}@example.com>"
        reg = Registry.open(root)
        for i in range(rounds):
            folder = write_adapter(Path(folder_base) / f"w{worker}-{i}", 1000 * worker + i)
            barrier.wait(timeout=60)
            try:
                res = reg.commit(folder, f"worker {worker} round {i}")
                queue.put((worker, i, "ok", res.id))
            except (RefConflict, RefLocked) as exc:
                queue.put((worker, i, type(exc).__name__, str(exc)))
    except BaseException:  # surfaced to the test, never swallowed
        queue.put((worker, -1, "crash", traceback.format_exc()))


def test_concurrent_commits_never_lose_a_commit(reg, tmp_path):
    workers, rounds = 3, 6
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(workers)
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_commit_worker, args=(str(reg.root), str(tmp_path / "adapters"), w, rounds, barrier, queue))
        for w in range(workers)
    ]
    for p in procs:
        p.start()
    results = [queue.get(timeout=240) for _ in range(workers * rounds)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    crashes = [r for r in results if r[2] == "crash"]
    assert not crashes, crashes[0][3]

    ok = {r[3] for r in results if r[2] == "ok"}
    failed = [r for r in results if r[2] != "ok"]
    assert len(ok) + len(failed) == workers * rounds
    assert ok, "at least the first writer of each round must win"
    for _, _, kind, message in failed:
        assert kind in ("RefConflict", "RefLocked")
        assert "refs/heads/main" in message
    # Every commit that reported success is in history, and history is a clean line.
    history = reg.log("main")
    ids = [c.id for c in history]
    assert ok <= set(ids)
    assert len(ids) == len(ok) + 2
    for child, parent in zip(history, history[1:]):
        assert child.parents == (parent.id,)
    # The reflog saw exactly the winning moves, in order; no lock is left behind.
    moves = reg.refs.reflog(HEADS + "main")
    assert [e.new for e in moves][2:] == list(reversed(ids[:-2]))
    assert _locks(reg) == []
    kinds = [r[2] for r in failed]
    print(f"\nconcurrent commits: {len(ok)} won, {len(failed)} refused "
          f"({kinds.count('RefConflict')} RefConflict, {kinds.count('RefLocked')} RefLocked)")



# --- ref names from files and remotes are checked too ---------------------------------------


@pytest.mark.parametrize(
    "target", ["refs/heads/../../../escape/main", "refs/heads/a/../../../../x", "/tmp/x", "refs/heads/"]
)
def test_hostile_head_never_steers_a_write(reg, tmp_path, target):
    """A HEAD file naming `refs/heads/../../..` (a copied or cloned registry) is refused as
    corrupt; a commit never writes a ref or reflog outside `.ah/refs/`."""
    (reg.ah_dir / "HEAD").write_text(f"ref: {target}\n")
    before = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if "objects" not in p.parts)
    with pytest.raises(CorruptObject, match="HEAD points at a bad ref name"):
        reg.commit(write_adapter(tmp_path / "a3", 3), "steered")
    with pytest.raises(CorruptObject):
        reg.resolve("HEAD")
    after = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if "objects" not in p.parts)
    new = set(after) - set(before)
    assert all(p.startswith("a3") for p in new), new  # only the adapter folder the test wrote
    rc, _, err = run_ah("--registry", reg.root, "log")
    assert rc == 1 and err.startswith("error: corrupt object HEAD")


@pytest.mark.parametrize(
    "refname", ["refs/heads/../../config.json", "refs/heads/../HEAD", "heads/main", "refs/heads/a//b"]
)
def test_bad_full_ref_names(reg, refname):
    first, _ = _ids(reg)
    assert reg.refs.read(refname) is None  # never read through
    assert reg.refs.reflog(refname) == []
    with pytest.raises(BadRefName):
        reg.refs.update(refname, first)
    with pytest.raises(BadRefName):
        reg.refs.delete(refname)
    with pytest.raises(BadRefName):
        reg.refs.create_packed({refname: first})
    with pytest.raises(BadRefName):
        reg.refs.set_head_symbolic(refname)
    with pytest.raises(UnknownRevision):
        reg.resolve(refname)
    assert (reg.ah_dir / "config.json").read_text().startswith("{")
