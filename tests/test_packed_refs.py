"""Packed refs: one sorted file consulted after loose refs, binary-searched, CAS intact."""

from __future__ import annotations

import os
import time

import pytest

from adapterhub.errors import CorruptObject, RefConflict, RefExists, RefLocked, UnknownRevision
from adapterhub.objects import BLOB, hash_object
from adapterhub.packed_refs import HEADER_V1, HEADER_V2, render
from adapterhub.refs import HEADS, TAGS, RefStore
from adapterhub.registry import Registry
from conftest import run_ah


def _id(i: int) -> str:
    return hash_object(BLOB, b"%d" % i)


@pytest.fixture
def refs(tmp_path):
    return Registry.init(tmp_path / "reg").refs


def test_pack_refs_moves_loose_refs_into_one_sorted_file(refs):
    names = [HEADS + "main", HEADS + "users/alice/main", HEADS + "users/bob/x", TAGS + "v1"]
    for i, n in enumerate(names):
        refs.update(n, _id(i), expected=None)
    assert refs.pack_refs() == 4
    assert not (refs.ah_dir / HEADS / "main").exists()
    assert not (refs.ah_dir / HEADS / "users").exists()  # emptied folders pruned
    data = (refs.ah_dir / "packed-refs").read_bytes()
    assert data.startswith(HEADER_V2) and all(bytes.fromhex(_id(i)) in data for i in range(4))
    for i, n in enumerate(names):
        assert refs.read(n) == _id(i)
    assert list(refs.list(HEADS)) == sorted((n, _id(i)) for i, n in enumerate(names) if n.startswith(HEADS))
    assert list(refs.list(HEADS + "users/alice/")) == [(HEADS + "users/alice/main", _id(1))]
    assert refs.read(HEADS + "users") is None and refs.read(HEADS + "mai") is None


def test_update_of_a_packed_ref_is_cas_and_writes_loose(refs):
    refs.update(HEADS + "main", _id(1), expected=None)
    refs.pack_refs()
    with pytest.raises(RefConflict):
        refs.update(HEADS + "main", _id(3), expected=_id(2))
    with pytest.raises(RefExists):
        refs.update(HEADS + "main", _id(3), expected=None)
    refs.update(HEADS + "main", _id(2), expected=_id(1))
    assert (refs.ah_dir / HEADS / "main").read_text().strip() == _id(2)
    assert refs.packed.get(HEADS + "main") == _id(1)  # shadowed, not rewritten
    assert refs.read(HEADS + "main") == _id(2) and list(refs.list(HEADS)) == [(HEADS + "main", _id(2))]
    refs.pack_refs()
    assert refs.packed.get(HEADS + "main") == _id(2) and refs.read(HEADS + "main") == _id(2)


def test_delete_removes_packed_and_loose_under_the_lock(refs):
    refs.update(HEADS + "a", _id(1), expected=None)
    refs.update(HEADS + "b", _id(2), expected=None)
    refs.pack_refs()
    refs.update(HEADS + "a", _id(3), expected=_id(1))  # now loose and packed
    with pytest.raises(RefConflict):
        refs.delete(HEADS + "a", expected=_id(1))
    refs.delete(HEADS + "a", expected=_id(3))
    assert refs.read(HEADS + "a") is None  # the stale packed value does not come back
    refs.delete(HEADS + "b", expected=_id(2))
    assert refs.read(HEADS + "b") is None and list(refs.list("refs/")) == []
    with pytest.raises(UnknownRevision):
        refs.delete(HEADS + "b")


def test_a_held_packed_refs_lock_blocks_deleting_a_packed_ref(refs):
    refs.update(HEADS + "a", _id(1), expected=None)
    refs.pack_refs()
    (refs.ah_dir / "packed-refs.lock").write_text("")
    with pytest.raises(RefLocked, match="packed-refs"):
        refs.delete(HEADS + "a")
    assert refs.read(HEADS + "a") == _id(1)


def test_name_folder_conflicts_with_packed_refs(refs):
    refs.update(HEADS + "a/b", _id(1), expected=None)
    refs.update(HEADS + "c", _id(2), expected=None)
    refs.pack_refs()
    with pytest.raises(RefExists, match="refs exist below it"):
        refs.update(HEADS + "a", _id(3), expected=None)
    with pytest.raises(RefExists, match="parent folders"):
        refs.update(HEADS + "c/d", _id(3), expected=None)


def test_create_packed_is_all_or_nothing(refs):
    refs.update(HEADS + "taken", _id(0), expected=None)
    with pytest.raises(RefExists):
        refs.create_packed({HEADS + "new1": _id(1), HEADS + "taken": _id(2)})
    assert refs.read(HEADS + "new1") is None
    refs.create_packed({HEADS + f"u{i}": _id(i) for i in range(10)}, who="me", message="import")
    assert refs.read(HEADS + "u7") == _id(7) and refs.read(HEADS + "taken") == _id(0)
    assert (refs.ah_dir / "logs" / "packed-refs").read_text().count("\n") == 10


def test_a_large_packed_refs_file_resolves_fast(tmp_path):
    reg = Registry.init(tmp_path / "reg")
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    commit = reg.commit(folder, "one").id
    n = 200_000
    reg.refs.create_packed({HEADS + f"users/{i:07d}/main": commit for i in range(n)})
    fresh = Registry.open(reg.root)
    start = time.perf_counter()
    for i in range(0, n, n // 100):
        assert fresh.resolve(f"users/{i:07d}/main") == commit
    per_lookup = (time.perf_counter() - start) / 100
    assert per_lookup < 0.005, per_lookup
    assert fresh.refs.read(HEADS + "users/0000001/mai") is None
    assert [n for n, _ in fresh.refs.list(HEADS + "users/0012345/")] == [HEADS + "users/0012345/main"]
    rc, out, err = run_ah("--registry", reg.root, "log", "-n", "1", "users/0199999/main")
    assert rc == 0 and commit in out


@pytest.mark.parametrize(
    "content, match",
    [
        (b"garbage\n", "does not start with"),
        (HEADER_V1 + b"0" * 64 + b" refs/heads/a", "truncated"),
        (HEADER_V1 + b"zz" * 32 + b" refs/heads/a\n", "object id"),
        (HEADER_V1 + b"short refs/heads/a\n", "malformed line"),
    ],
)
def test_damaged_version_1_packed_refs_file_is_refused(refs, content, match):
    (refs.ah_dir / "packed-refs").write_bytes(content)
    with pytest.raises(CorruptObject, match=match):
        RefStore(refs.ah_dir).read(HEADS + "a")


def test_unsorted_version_1_packed_refs_file_is_refused_when_listed(refs):
    (refs.ah_dir / "packed-refs").write_bytes(HEADER_V1 + b"%s refs/heads/b\n%s refs/heads/a\n" % (_id(1).encode(), _id(2).encode()))
    with pytest.raises(CorruptObject, match="not sorted"):
        list(RefStore(refs.ah_dir).list(HEADS))


def test_render_refuses_duplicates():
    with pytest.raises(ValueError):
        render([("refs/heads/a", _id(1)), ("refs/heads/a", _id(2))])


def test_cli_pack_refs_and_gc_pack_refs(tmp_path):
    reg = Registry.init(tmp_path / "reg")
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    c = reg.commit(folder, "one").id
    reg.create_branch("feature")
    rc, out, err = run_ah("--registry", reg.root, "pack-refs")
    assert rc == 0 and "packed 2 refs" in out
    assert not (reg.ah_dir / HEADS / "main").exists()
    rc, out, err = run_ah("--registry", reg.root, "log", "--format", "json", "feature")
    assert rc == 0 and c in out
    reg.create_branch("later")
    rc, out, err = run_ah("--registry", reg.root, "gc")
    assert rc == 0, err
    assert not (reg.ah_dir / HEADS / "later").exists() and Registry.open(reg.root).resolve("later") == c


def test_a_packed_name_damaged_out_of_refs_stops_gc_and_rewrites_and_loses_nothing(tmp_path):
    """A flipped bit turning `refs/heads/a` into `rdfs/heads/a` once hid that ref and the
    ones after it from every listing under refs/: gc pruned their history and a rewrite
    of the file dropped them. gc, pack-refs and deletes now read every record and refuse."""
    reg = Registry.init(tmp_path / "reg")
    ids = []
    for i in range(20):
        folder = tmp_path / f"a{i}"
        folder.mkdir()
        (folder / "adapter_config.json").write_text('{"i": %d}' % i)
        ids.append(reg.commit(folder, f"adapter {i}", branch=f"b{i:02d}" if i else None).id)
        if i == 0:
            for j in range(1, 20):
                reg.refs.update(HEADS + f"b{j:02d}", ids[0], expected=None)
    # each later branch's only commit is reachable from it alone
    reg.refs.pack_refs()
    path = reg.ah_dir / "packed-refs"
    data = bytearray(path.read_bytes())
    assert data[len(HEADER_V2) + 2 : len(HEADER_V2) + 7] == b"refs/"  # shared 0, length, then the name
    data[len(HEADER_V2) + 3] ^= 0x01  # "refs/" -> "rdfs/"
    path.write_bytes(bytes(data))
    old = time.time() - 90 * 86400
    objects = sorted(p for p in (reg.ah_dir / "objects").rglob("*") if p.is_file())
    for p in objects:
        os.utime(p, (old, old))
    rc, out, err = run_ah("--registry", reg.root, "gc", "--prune", "now")
    assert rc != 0 and "packed-refs" in err and "not under refs/" in err
    assert sorted(p for p in (reg.ah_dir / "objects").rglob("*") if p.is_file()) == objects
    with pytest.raises(CorruptObject, match="not under refs/"):
        reg.refs.pack_refs()
    with pytest.raises(CorruptObject, match="not under refs/"):
        reg.refs.delete(HEADS + "b18")  # a ref the damage does not hide
    assert path.read_bytes() == bytes(data)
