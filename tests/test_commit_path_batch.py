"""The commit path's batched steps do what their one-by-one forms did.

put_tensors checks existence, writes records and teaches the base cache for a whole
file's tensors at once (PackedObjectStore._stored_many, _write_records, PackWriter.add_many,
BaseCache.add_written), and a store lists its packs by name (pack_names, Pack.iter_ids in
blocks). Each must leave the same bytes on disk and give the same answers.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from adapterhub import codec
from adapterhub.encoding.chain import DeltaBase
from adapterhub.objects import BLOB, TENSOR, hash_object, header
from adapterhub.pack import ADD_BUFFER_BYTES, PackWriter
from adapterhub.packstore import PackedObjectStore
from adapterhub.store import BaseCache


def _records(n: int, size: int, seed: int = 0) -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        body = rng.integers(0, 256, size + i * 7, dtype=np.uint8).tobytes()
        out.append((hash_object(BLOB, body), codec.encode([header(BLOB, len(body)), body])))
    return out


def _files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("size", [100, 40_000, ADD_BUFFER_BYTES // 3, ADD_BUFFER_BYTES - 30, ADD_BUFFER_BYTES + 5])
def test_add_many_writes_the_pack_add_writes(tmp_path, size):
    recs = _records(20, size)
    one, many = tmp_path / "one", tmp_path / "many"
    with PackWriter(one, dedup=False) as w:
        for oid, rec in recs:
            assert w.add(oid, rec)
        w.finish()
    with PackWriter(many, dedup=False) as w:
        w.add(*recs[0])  # one at a time and many at once mix
        w.add_many(bytes.fromhex("".join(oid for oid, _ in recs[1:12])), [memoryview(r) for _, r in recs[1:12]])
        w.add_many(bytes.fromhex("".join(oid for oid, _ in recs[12:])), [r for _, r in recs[12:]])
        w.add_many(b"", [])
        w.finish()
    assert _files(many) == _files(one)


def test_add_many_with_dedup_skips_repeats_as_add_does(tmp_path):
    recs = _records(4, 500)
    twice = recs + recs[:2]
    one, many = tmp_path / "one", tmp_path / "many"
    with PackWriter(one) as w:
        for oid, rec in twice:
            w.add(oid, rec)
        w.finish()
    with PackWriter(many) as w:
        w.add_many(bytes.fromhex("".join(oid for oid, _ in twice)), [r for _, r in twice])
        w.finish()
    assert _files(many) == _files(one)


@pytest.mark.parametrize("dedup", [False, True])
def test_add_many_refuses_ids_that_do_not_match_the_records(tmp_path, dedup):
    with PackWriter(tmp_path, dedup=dedup) as w:
        with pytest.raises(ValueError):
            w.add_many(b"\x01" * 31, [b"x"])
        with pytest.raises(ValueError):  # an id too many: with dedup it was ignored
            w.add_many(b"\x01" * 64, [b"x"])
        assert len(w) == 0
        w.abort()
    assert not [p for p in tmp_path.iterdir() if p.suffix in (".pack", ".idx")]


def _store(path) -> PackedObjectStore:
    (path / "pack").mkdir(parents=True)
    return PackedObjectStore(path)


def test_stored_many_answers_as_stored_one_by_one(tmp_path):
    store = _store(tmp_path / "objects")
    packed, loose, pending, absent, same_fan = _records(5, 300, seed=1)
    with store.writer() as w:
        w.add(*packed)
        w.finish()
    store.add_pack_written()
    store.loose._write_record(*loose)
    # An absent id in the fan-out folder of a loose one: its folder is listed, its file is not there.
    absent_near = loose[0][:2] + absent[0][2:]
    ids = [packed[0], loose[0], pending[0], absent[0], absent_near, same_fan[0], loose[0]]
    with store.batch():
        store._write_record(*pending)
        assert store._stored_many(ids) == [store._stored(oid) for oid in ids] == [True, True, True, False, False, False, True]
    assert store._stored_many([]) == []


def test_stored_many_asks_every_path_when_the_folder_cannot_be_listed(tmp_path, monkeypatch):
    store = _store(tmp_path / "objects")
    (oid, rec), (other, _) = _records(2, 300, seed=2)
    store.loose._write_record(oid, rec)
    store.packs()
    listdir = os.listdir

    def refuse(path="."):
        if os.fspath(path) == os.fspath(store.root):
            raise PermissionError(path)
        return listdir(path)

    monkeypatch.setattr(os, "listdir", refuse)
    assert store._stored_many([other, oid]) == [False, True]


def test_base_cache_add_written_keeps_what_add_keeps():
    one, many = BaseCache(max_bytes=2000), BaseCache(max_bytes=2000)
    data = bytes(range(256)) * 8
    # b is over a quarter of the cache, a comes twice, f pushes a out.
    items = [("a", memoryview(data)[:400], 0, None), ("b", data[:501], 1, "a"), ("a", data[:10], 3, None),
             ("c", memoryview(data)[100:550], 2, "b"), ("d", data[:480], 0, None), ("e", data[:490], 0, None),
             ("f", data[:300], 1, "e")]
    for oid, body, depth, base in items:
        one.add(oid, bytes(body), depth, base)
    many.add_written(items)
    assert list(many._items) == list(one._items) == ["c", "d", "e", "f"] and many._bytes == one._bytes
    for oid in list(one._items):
        assert many.get(oid) == one.get(oid) and type(many.get(oid)[0]) is bytes


def test_base_cache_keeps_views_of_a_small_file_and_counts_the_file_once():
    cache = BaseCache(max_bytes=4000)
    data = bytes(range(256)) * 6  # 1536 bytes: at most half the budget, so views stay views
    view = memoryview(data)
    cache.add_written([("a", view[:400], 0, None), ("b", view[400:900], 1, "a"), ("c", view[900:1400], 2, "b")])
    assert all(cache.get(k)[0].obj is data for k in "abc")
    assert cache.get("b")[0] == data[400:900]
    assert cache._bytes == len(data)  # the whole file, once, whatever its entries add up to
    # Bytes push the oldest entries out; the file leaves the budget with its last view only.
    cache.add("d", bytes(1000), 0)
    cache.add("e", bytes(1000), 0)
    assert cache._bytes == len(data) + 2000 and len(cache._items) == 5
    cache.add("f", bytes(1000), 0)  # over budget: a goes, b and c still hold the file, then they go
    assert list(cache._items) == ["d", "e", "f"] and cache._bytes == 3000 and not cache._held
    # A view of a bytes object over half the budget, or of a bytearray, is copied.
    big, mutable = bytes(2100), bytearray(100)
    cache.add_written([("g", memoryview(big)[:500], 0, None), ("h", memoryview(mutable)[:50], 0, None)])
    assert type(cache.get("g")[0]) is bytes and type(cache.get("h")[0]) is bytes
    mutable[:50] = b"x" * 50
    assert cache.get("h")[0] == bytes(50)
    cache.clear()
    assert cache._bytes == 0 and not cache._held


def test_base_cache_copies_what_would_pin_a_mostly_unused_file_and_keeps_its_own_views():
    cache = BaseCache(max_bytes=4000)
    data = bytes(range(256)) * 6
    view = memoryview(data)
    # a quarter of the file enters (the rest of its tensors exist already): copied
    cache.add_written([("a", view[:384], 0, None)])
    assert type(cache.get("a")[0]) is bytes and cache._bytes == 384 and not cache._held
    # most of it enters: viewed, and later views of a held owner join it whatever their size
    cache.add_written([("b", view[384:1200], 0, None)])
    cache.add_written([("c", view[1200:1300], 0, None)])
    assert cache.get("b")[0].obj is data and cache.get("c")[0].obj is data
    assert cache._bytes == 384 + len(data)
    # the cache's view outlives the caller's
    with view[1300:1536] as piece:
        cache.add_written([("d", piece, 0, None)])
    assert cache.get("d")[0] == data[1300:1536]
    # a view of other than bytes (format "f": len() counts floats) is copied
    floats = memoryview(bytes(1600)).cast("f")
    cache.add_written([("e", floats, 0, None)])
    assert type(cache.get("e")[0]) is bytes and len(cache.get("e")[0]) == 1600


def test_a_commit_leaves_its_tensors_in_the_cache_as_views_of_the_file(tmp_path):
    store = _store(tmp_path / "objects")
    rng = np.random.default_rng(3)
    data = rng.standard_normal(6000).astype(np.float32).tobytes()
    view = memoryview(data)
    items = [(view[:12000], "F32", None), (view[12000:], "F32", None)]
    with store.batch():
        stored = store.put_tensors(items)
    for (oid, created), (body, _, _) in zip(stored, items):
        cached = store.base_cache.get(oid)[0]
        assert created and cached.obj is data and cached == body
        assert store.read_tensor(oid) == body


def test_native_jobs_are_the_same_from_the_cache():
    rng = np.random.default_rng(5)
    body = rng.standard_normal(3000).astype(np.float32).tobytes()
    prev = rng.standard_normal(3000).astype(np.float32).tobytes()
    head = header(TENSOR, len(body))
    bases = [None, DeltaBase("ab" * 32, prev, 1), DeltaBase("cd" * 32, prev, 2, prev, "ef" * 32),
             DeltaBase("cd" * 32, prev[:-4], 0), DeltaBase("cd" * 32, prev, codec.MAX_CHAIN)]
    for dtype in ("F32", "BF16", "F64", "U8", None):
        for base in bases:
            codec._PLAIN_JOBS.clear()
            first = codec._native_job(head, body, dtype, base)
            again = codec._native_job(head, body, dtype, base)
            assert first == again
    codec._PLAIN_JOBS.clear()
    assert codec._native_job(head, body[:100], "F32", None) is None  # small: plain zstd is tried too


def test_pack_names_and_ids_list_what_they_listed_one_by_one(tmp_path):
    from adapterhub.pack import Pack, pack_names, pack_paths

    recs = _records(4, 100, seed=4)
    folder = tmp_path / "pack"
    for i, (oid, rec) in enumerate(recs):
        with PackWriter(folder) as w:
            w.add(oid, rec)
            w.finish()
    (folder / "pack-x.idx.tmp").write_bytes(b"")
    (folder / ".tmp-1.idx").write_bytes(b"")
    (folder / "pack-y.pack").write_bytes(b"")
    (folder / "notpack-z.idx").write_bytes(b"")
    want = sorted(p for p in folder.iterdir() if p.suffix == ".idx" and p.name.startswith("pack-"))
    assert pack_paths(folder) == want and pack_names(folder) == [p.name for p in want] and len(want) == 4
    assert pack_names(tmp_path / "missing") == [] and pack_paths(tmp_path / "missing") == []
    with PackWriter(tmp_path / "big") as w:  # more ids than iter_ids hexes at a time
        for i in range(4100):
            w.add(hash_object(BLOB, b"%d" % i), b"record %d" % i)  # the writer does not decode
        idx = w.finish()
    pack = Pack(idx)
    assert list(pack.iter_ids()) == [pack._id(i).hex() for i in range(pack.count)]
    pack.close()


def test_a_commit_pack_is_found_and_a_later_rescan_still_lists_other_packs(tmp_path):
    objects = tmp_path / "objects"
    store = _store(objects)
    store.packs()
    recs = _records(20, 300, seed=3)
    with store.batch():
        for oid, rec in recs[:17]:
            store._write_record(oid, rec)
    assert len(store.packs()) == 1
    assert all(store._stored(oid) and store.has(oid) for oid, _ in recs[:17])
    assert all(store._read_record(oid) == rec for oid, rec in recs[:17])
    # Another process's pack, written meanwhile: found once looked for, as before.
    other = PackedObjectStore(objects)
    with other.writer() as w:
        for oid, rec in recs[17:]:
            w.add(oid, rec)
        w.finish()
    assert store.has(recs[18][0]) and store._read_record(recs[19][0]) == recs[19][1]
    assert len(store.packs()) == 2
