"""Revision expressions: full and short ids, ambiguity, branches, tags, HEAD, ~N, ^N, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from ah_testkit import write_adapter

from adapterhub.errors import AmbiguousRevision, UnknownRevision
from adapterhub.objects import BLOB, COMMIT, Commit, hash_object
from adapterhub.registry import Registry
from adapterhub.revisions import MIN_ABBREV, split_expression


class History:
    """main: c1 - c2 - m (merge of c2 and side's s1); side: c1 - s1."""

    def __init__(self, reg: Registry, tmp_path: Path):
        self.reg = reg
        self.c1 = reg.commit(write_adapter(tmp_path / "c1", 1), "c1").id
        self.c2 = reg.commit(write_adapter(tmp_path / "c2", 2), "c2").id
        reg.create_branch("side", self.c1)
        self.s1 = reg.commit(write_adapter(tmp_path / "s1", 3), "s1", branch="side").id
        self.m = reg.commit(write_adapter(tmp_path / "m", 4), "merge side", extra_parents=("side",)).id


@pytest.fixture
def h(registry, tmp_path) -> History:
    return History(registry, tmp_path)


def test_history_shape(h):
    assert h.reg.store.get_commit(h.m).parents == (h.c2, h.s1)
    assert h.reg.store.get_commit(h.s1).parents == (h.c1,)
    assert h.reg.store.get_commit(h.c1).parents == ()


# --- ids ------------------------------------------------------------------------------------


def test_full_id(h):
    for oid in (h.c1, h.c2, h.s1, h.m):
        assert h.reg.resolve(oid) == oid
        assert h.reg.resolve(oid.upper()) == oid


@pytest.mark.parametrize("n", [MIN_ABBREV, 7, 12, 40, 63])
def test_abbreviated_id(h, n):
    assert h.reg.resolve(h.c2[:n]) == h.c2
    assert h.reg.resolve(h.c2[:n].upper()) == h.c2


@pytest.mark.parametrize("n", [1, 2, 4, 5])
def test_too_short_id_refused(h, n):
    with pytest.raises(UnknownRevision, match="unknown revision"):
        h.reg.resolve(h.c2[:n])


def test_unknown_ids(h):
    missing = "f" * 64 if not h.c1.startswith("ffffff") else "e" * 64
    for expr in (missing, missing[:10]):
        with pytest.raises(UnknownRevision, match=f"unknown revision '{expr}'"):
            h.reg.resolve(expr)


def test_id_of_non_commit_refused(h):
    snap = h.reg.store.get_commit(h.c1).snapshot
    with pytest.raises(UnknownRevision, match="names a snapshot object, not a commit"):
        h.reg.resolve(snap)
    with pytest.raises(UnknownRevision, match="names a snapshot"):
        h.reg.resolve(snap[:10])


def _colliding_bodies(make, prefix_len: int = MIN_ABBREV, obj_type: str = BLOB) -> tuple[bytes, bytes]:
    """Two bodies whose ids share their first `prefix_len` hex digits (birthday search:
    about 5,000 BLAKE3 hashes of tiny bodies for 6 digits)."""
    seen: dict[str, bytes] = {}
    for i in range(2_000_000):
        body = make(i)
        key = hash_object(obj_type, body)[:prefix_len]
        if key in seen:
            return seen[key], body
        seen[key] = body
    raise AssertionError("no collision found")


def test_ambiguous_short_id_lists_candidates(h):
    a, b = _colliding_bodies(lambda i: b"blob %d" % i)
    ida, idb = h.reg.store.put(BLOB, a), h.reg.store.put(BLOB, b)
    assert ida != idb and ida[:6] == idb[:6]
    with pytest.raises(AmbiguousRevision) as exc:
        h.reg.resolve(ida[:6])
    msg = str(exc.value)
    assert f"short id {ida[:6]} is ambiguous" in msg
    assert ida[:12] in msg and idb[:12] in msg
    # One more digit (where they differ) picks one; it is a blob, so not a revision.
    k = next(i for i in range(6, 64) if ida[i] != idb[i])
    with pytest.raises(UnknownRevision, match="names a blob object"):
        h.reg.resolve(ida[: k + 1])


def test_ambiguous_commits(h):
    snap = h.reg.store.get_commit(h.c1).snapshot

    def commit_body(i: int) -> bytes:
        return Commit(snap, (h.c1,), "Tester <t@example.com>", 1_700_000_000, f"try {i}", {}).serialize()

    a, b = _colliding_bodies(commit_body, obj_type=COMMIT)
    ida, idb = h.reg.store.put(COMMIT, a), h.reg.store.put(COMMIT, b)
    assert ida[:6] == idb[:6]
    with pytest.raises(AmbiguousRevision):
        h.reg.resolve(ida[:6])
    with pytest.raises(AmbiguousRevision):
        h.reg.resolve(ida[:6] + "~1")
    k = next(i for i in range(6, 64) if ida[i] != idb[i])
    assert h.reg.resolve(ida[: k + 1]) == ida
    assert h.reg.resolve(idb[: k + 1] + "^") == h.c1
    assert h.reg.resolve(ida) == ida  # a full id is never ambiguous


# --- names -----------------------------------------------------------------------------------


def test_branches_and_head(h):
    assert h.reg.resolve("main") == h.m
    assert h.reg.resolve("HEAD") == h.m
    assert h.reg.resolve("side") == h.s1
    assert h.reg.resolve("refs/heads/side") == h.s1
    h.reg.switch("side")
    assert h.reg.resolve("HEAD") == h.s1


def test_detached_head(h):
    h.reg.refs.set_head_detached(h.c2)
    assert h.reg.resolve("HEAD") == h.c2
    assert h.reg.resolve("HEAD~1") == h.c1
    assert h.reg.current_branch() is None


def test_unborn_head(registry):
    reg = registry
    with pytest.raises(UnknownRevision, match="HEAD: branch 'main' has no commits yet"):
        reg.resolve("HEAD")
    with pytest.raises(UnknownRevision, match="unknown revision 'main'"):
        reg.resolve("main")


def test_lightweight_tag(h):
    info = h.reg.create_tag("v1", "main~1")
    assert info.commit == info.target == h.c2
    assert h.reg.resolve("v1") == h.c2
    assert h.reg.resolve("refs/tags/v1") == h.c2
    assert h.reg.resolve("v1~1") == h.c1


def test_annotated_tag_peels_to_commit(h):
    info = h.reg.create_tag("v2", "side", message="release 2")
    assert info.commit == h.s1 and info.target != h.s1
    assert h.reg.store.object_type(info.target) == "tag"
    assert h.reg.store.get_tag(info.target).message == "release 2"
    assert h.reg.resolve("v2") == h.s1
    assert h.reg.resolve("v2^") == h.c1
    assert h.reg.resolve(info.target) == h.s1  # the tag object's id peels too
    assert [(t.name, t.commit) for t in h.reg.tags()] == [("v2", h.s1)]


def test_branch_wins_over_tag_and_short_id(h):
    h.reg.create_tag("side", h.c2)
    assert h.reg.resolve("side") == h.s1
    assert h.reg.resolve("refs/tags/side") == h.c2
    short = h.c2[:8]
    h.reg.create_branch(short, h.c1)  # a branch named like a short id
    assert h.reg.resolve(short) == h.c1
    assert h.reg.resolve(h.c2) == h.c2  # a full id present in the store wins over names


# --- ancestry ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "expr, want",
    [
        ("main", "m"), ("main~0", "m"), ("main^0", "m"), ("main~", "c2"), ("main~1", "c2"),
        ("main^", "c2"), ("main^1", "c2"), ("main^2", "s1"), ("main~2", "c1"), ("main^^", "c1"),
        ("main^2^", "c1"), ("main^2~1", "c1"), ("main~1~1", "c1"), ("HEAD^2", "s1"), ("side~1", "c1"),
        ("main^2^0", "s1"), ("main~1^0~1", "c1"),
    ],
)
def test_ancestry(h, expr, want):
    assert h.reg.resolve(expr) == getattr(h, want)
    short = h.m[:7] + expr[len("main"):] if expr.startswith("main") else None
    if short:
        assert h.reg.resolve(short) == getattr(h, want)


@pytest.mark.parametrize(
    "expr, fragment",
    [
        ("main~3", "has no parent"),
        ("main~100", "has no parent"),
        ("side~2", "has no parent"),
        ("main^2^2", "has no parent number 2"),
        ("main^3", "has no parent number 3"),
        ("main~2^", "has no parent number 1"),
        ("main~2^1", "has no parent number 1"),
    ],
)
def test_past_root(h, expr, fragment):
    with pytest.raises(UnknownRevision) as exc:
        h.reg.resolve(expr)
    assert fragment in str(exc.value) and repr(expr) in str(exc.value)


@pytest.mark.parametrize("expr", ["", "~1", "^", "main~x", "main^a", "main~1x", "ma\x01in", "main~-1", "main@{1}"])
def test_malformed_expressions(h, expr):
    with pytest.raises(UnknownRevision):
        h.reg.resolve(expr)


def test_split_expression():
    assert split_expression("main~2^2") == ("main", [("~", 2), ("^", 2)])
    assert split_expression("users/alice/main^") == ("users/alice/main", [("^", 1)])
    assert split_expression("v1^0") == ("v1", [("^", 0)])
