"""Packs and the loose+pack store: the store contract, index lookups, and damaged packs."""

from __future__ import annotations

import os
import struct
import threading

import pytest

from adapterhub import codec
from adapterhub.errors import CorruptObject, ObjectNotFound
from adapterhub.objects import BLOB, TENSOR, hash_object, header
from adapterhub.pack import ENTRY_BYTES, FANOUT, IDX_HEAD, IDX_HEAD_V1, IDX_MAGIC, LARGE, Pack, PackWriter, pack_paths
from adapterhub.packstore import PackedObjectStore
from test_store_contract import StoreContract


def _record(obj_type: str, body: bytes) -> tuple[str, bytes, int]:
    return hash_object(obj_type, body), codec.encode([header(obj_type, len(body)), body]), len(header(obj_type, len(body))) + len(body)


class PackOnlyStore(PackedObjectStore):
    """Writes every record into its own pack, so the contract exercises pack reads only.

    A record written again replaces the pack holding the old one (the contract's damage
    tests rewrite records that way). Writes are serialised, and a racing writer of the
    very same record leaves the existing pack alone: deleting a pack another thread has
    just written and is reading from is a race of this test double, not of the store.
    """

    _write_lock = threading.Lock()

    def _write_record(self, oid, record):
        with self._write_lock:
            self._replace_record(oid, record)

    def _replace_record(self, oid, record):
        for pack in self.packs():
            if pack.find(oid) is not None:
                if pack.read_record(oid) == record:
                    return
                pack.idx_path.unlink()
                pack.path.unlink()
        self.add_pack_written()
        with self.writer() as w:
            w.add(oid, record)
            w.finish()
        self.add_pack_written()


class TestPackedObjectStoreLoose(StoreContract):
    def make_store(self, tmp_path):
        (tmp_path / "objects").mkdir()
        return PackedObjectStore(tmp_path / "objects")


class TestPackedObjectStorePacks(StoreContract):
    def make_store(self, tmp_path):
        (tmp_path / "objects").mkdir()
        return PackOnlyStore(tmp_path / "objects")


# --- pack files --------------------------------------------------------------------------


@pytest.fixture
def packed(tmp_path):
    """A store with 600 objects in one pack and one loose object."""
    (tmp_path / "objects").mkdir()
    store = PackedObjectStore(tmp_path / "objects")
    bodies = {}
    with store.writer() as w:
        for i in range(600):
            body = b"object %d " % i * (i % 7 + 1)
            oid, rec, raw = _record(BLOB, body)
            assert w.add(oid, rec)
            assert not w.add(oid, rec)  # duplicates are skipped
            bodies[oid] = body
        w.finish()
    store.add_pack_written()
    loose = store.put(BLOB, b"fresh write")
    bodies[loose] = b"fresh write"
    return store, bodies, loose


def test_pack_round_trip_and_lookup(packed):
    store, bodies, loose = packed
    (pack,) = store.packs()
    assert pack.count == 600
    assert store.loose.has(loose) and pack.find(loose) is None
    for oid, body in bodies.items():
        assert store.has(oid)
        assert store.read(oid) == (BLOB, body)
    assert list(store.iter_ids()) == sorted(bodies)
    missing = hash_object(BLOB, b"never stored")
    assert not store.has(missing)
    with pytest.raises(ObjectNotFound):
        store.read(missing)
    some = sorted(bodies)[17]
    assert some in store.find_prefix(some[:3])
    assert store.find_prefix(some[:3]) == sorted(o for o in bodies if o.startswith(some[:3]))
    entries = list(pack.iter_entries())
    assert [e.oid for e in entries] == sorted(o for o in bodies if o != loose)
    assert all(e.raw_len == len(header(BLOB, len(bodies[e.oid]))) + len(bodies[e.oid]) for e in entries)
    pack.verify()


def test_writes_go_loose_and_a_pack_written_by_another_process_is_found(packed, tmp_path):
    store, bodies, _ = packed
    other = PackedObjectStore(tmp_path / "objects")
    assert other.read(sorted(bodies)[0])[0] == BLOB
    with store.writer() as w:
        oid, rec, raw = _record(TENSOR, b"\x01\x02" * 64)
        w.add(oid, rec)
        w.finish()
    # `other` listed the packs before this one existed: a miss re-lists the folder.
    assert other.read(oid) == (TENSOR, b"\x01\x02" * 64)


def test_put_may_store_again_what_another_process_packed_but_has_is_exact(packed, tmp_path):
    # put's existence check skips the re-list of the packs that `has` makes (one system
    # call less per new tensor): an object another process packed since this store looked
    # is stored again, a duplicate copy readers and gc accept, never lost.
    store, bodies, _ = packed
    other = PackedObjectStore(tmp_path / "objects")
    store.has(sorted(bodies)[0])  # lists the packs
    body = b"\x03\x04" * 64
    with other.writer() as w:
        oid, rec, raw = _record(TENSOR, body)
        w.add(oid, rec)
        w.finish()
    assert store.put(TENSOR, body) == oid  # may write a loose copy: never an error
    assert store.has(oid) and store.read(oid) == (TENSOR, body)
    again = PackedObjectStore(tmp_path / "objects")
    assert again.read(oid) == (TENSOR, body)
    # An object this store already knows (listed pack, loose, or its own batch) is not
    # written twice.
    before = sorted(os.listdir(tmp_path / "objects"))
    assert store.put_ex(BLOB, bodies[sorted(bodies)[5]])[1] is False
    assert sorted(os.listdir(tmp_path / "objects")) == before


def test_empty_writer_and_aborted_writer_leave_nothing(tmp_path):
    with PackWriter(tmp_path / "pack") as w:
        assert w.finish() is None
    with pytest.raises(RuntimeError):
        with PackWriter(tmp_path / "pack") as w:
            oid, rec, raw = _record(BLOB, b"x")
            w.add(oid, rec)
            raise RuntimeError("killed")
    assert list((tmp_path / "pack").iterdir()) == []


# --- damage -------------------------------------------------------------------------------


def _only_pack(store):
    (idx,) = pack_paths(store.pack_dir)
    return idx, idx.with_suffix(".pack")


def _fresh(store):
    return PackedObjectStore(store.root)


def test_truncated_index_is_refused(packed):
    store, bodies, _ = packed
    idx, _ = _only_pack(store)
    data = idx.read_bytes()
    for cut in (0, 10, IDX_HEAD.size + FANOUT.size // 2, len(data) - ENTRY_BYTES, len(data) - 1):
        idx.write_bytes(data[:cut])
        with pytest.raises(CorruptObject, match=r"pack pack-.*\.idx.*(truncated|magic)"):
            _fresh(store).read(sorted(bodies)[0])


def test_damaged_index_is_refused(packed):
    store, bodies, _ = packed
    idx, _ = _only_pack(store)
    data = bytearray(idx.read_bytes())
    target = sorted(o for o in bodies if store.loose.has(o) is False)[0]
    data[IDX_HEAD.size + FANOUT.size + 5] ^= 1  # one byte of the first (lowest) id
    idx.write_bytes(bytes(data))
    fresh = _fresh(store)
    (pack,) = fresh.packs()
    with pytest.raises(CorruptObject, match="index checksum does not match"):
        pack.verify()
    # Reads do not hash the index on open, yet never return wrong data: the damaged id is
    # simply not found, and every other object still reads and re-hashes.
    with pytest.raises(ObjectNotFound):
        fresh.read(target)
    for oid in sorted(bodies)[1:50]:
        assert fresh.read(oid) == (BLOB, bodies[oid])


def test_damaged_index_offset_never_returns_wrong_data(packed):
    import struct

    store, bodies, loose = packed
    idx, _ = _only_pack(store)
    data = bytearray(idx.read_bytes())
    count = struct.unpack_from("<Q", data, 8)[0]
    off_at = IDX_HEAD.size + FANOUT.size + 32 * count
    first, second = struct.unpack_from("<II", data, off_at)
    struct.pack_into("<I", data, off_at, second)  # entry 0 now points at entry 1's record
    idx.write_bytes(bytes(data))
    target = sorted(o for o in bodies if o != loose)[0]
    with pytest.raises(CorruptObject, match=target):
        _fresh(store).read(target)


def test_truncated_pack_is_refused(packed):
    store, bodies, _ = packed
    _, pack_file = _only_pack(store)
    data = pack_file.read_bytes()
    for cut in (0, 6, len(data) // 2, len(data) - 1):
        pack_file.write_bytes(data[:cut])
        with pytest.raises(CorruptObject, match=r"pack pack-.*\.pack.*(truncated)"):
            _fresh(store).read(sorted(bodies)[0])


def test_missing_pack_file_is_refused(packed):
    store, bodies, loose = packed
    _, pack_file = _only_pack(store)
    pack_file.unlink()
    fresh = _fresh(store)
    target = sorted(o for o in bodies if o != loose)[0]
    with pytest.raises(CorruptObject, match="pack file .* is missing"):
        fresh.read(target)
    assert not fresh.has(target)  # not readable here: a new write stores it again


def test_an_unreadable_pack_leaves_the_rest_of_the_store_readable_and_writable(packed):
    """One truncated pack must not stop every read and every commit (each used to fail
    listing the packs): its objects read as damaged, naming it; the others read, and new
    writes, of its objects too, land."""
    store, bodies, loose = packed
    idx, pack_file = _only_pack(store)
    for ok in ("pack-00", "pack-ff"):  # sound packs on either side of it in the listing
        with PackWriter(store.pack_dir) as w:
            body = ok.encode() * 100
            w.add(hash_object(BLOB, body), codec.encode([header(BLOB, len(body)), body]))
            w.finish()
    pack_file.write_bytes(pack_file.read_bytes()[: pack_file.stat().st_size // 2])
    fresh = _fresh(store)
    target = sorted(o for o in bodies if o != loose)[0]
    with pytest.raises(CorruptObject, match=r"cannot be read: pack pack-.*\.pack.*truncated"):
        fresh.read(target)
    assert fresh.read(loose) == (BLOB, bodies[loose])
    for ok in ("pack-00", "pack-ff"):
        body = ok.encode() * 100
        assert fresh.read(hash_object(BLOB, body)) == (BLOB, body)
    assert list(fresh.unreadable_packs) == [idx.name] and len(fresh.packs()) == 2
    assert fresh.put(BLOB, bodies[target]) == target  # written again, loose
    assert fresh.read(target) == (BLOB, bodies[target])


def test_pack_entry_whose_bytes_hash_to_another_id(tmp_path):
    (tmp_path / "objects").mkdir()
    store = PackedObjectStore(tmp_path / "objects")
    real_id, _, _ = _record(BLOB, b"what the id promises")
    _, other_rec, raw = _record(BLOB, b"something else entirely")
    with store.writer() as w:
        w.add(real_id, other_rec)  # an index entry pointing at another object's record
        w.finish()
    with pytest.raises(CorruptObject, match=f"{real_id}.*does not hash to its id"):
        _fresh(store).read(real_id)


def test_flipped_byte_inside_a_packed_record(packed):
    store, bodies, _ = packed
    _, pack_file = _only_pack(store)
    pack = Pack(pack_file.with_suffix(".idx"))
    target = sorted(bodies)[5]
    if pack.find(target) is None:
        target = sorted(bodies)[6]
    e = pack.entry(pack.find(target))
    pack.close()
    data = bytearray(pack_file.read_bytes())
    data[e.offset + e.length - 3] ^= 0x40
    pack_file.write_bytes(bytes(data))
    reopened = Pack(pack_file.with_suffix(".idx"))
    with pytest.raises(CorruptObject, match="pack checksum does not match"):
        reopened.verify()
    with pytest.raises(CorruptObject, match=target):
        _fresh(store).read(target)


def test_entry_pointing_past_the_pack_end(tmp_path):
    """An index whose checksum was recomputed over a bad offset still cannot read past the data."""
    import blake3
    import struct

    (tmp_path / "objects").mkdir()
    store = PackedObjectStore(tmp_path / "objects")
    oid, rec, raw = _record(BLOB, b"payload")
    with store.writer() as w:
        w.add(oid, rec)
        idx_path = w.finish()
    data = bytearray(idx_path.read_bytes())
    off_at = IDX_HEAD.size + FANOUT.size + 32
    struct.pack_into("<I", data, off_at, 1 << 20)
    body = bytes(data[:-32])
    idx_path.write_bytes(body + blake3.blake3(body).digest())
    with pytest.raises(CorruptObject, match="points outside the pack"):
        _fresh(store).read(oid)
    assert os.path.exists(idx_path)


def _rewrite_index(idx_path, version: int, escape: bool = False) -> None:
    """Rewrite a pack's index as version 1 (u64 columns plus raw lengths), or as version 2
    with every offset escaped to the large table (what a pack over 2 GiB gets)."""
    import struct

    import blake3

    pack = Pack(idx_path)
    entries = list(pack.iter_entries())
    checksum = pack.checksum
    pack.close()
    n = len(entries)
    fan = [sum(1 for e in entries if bytes.fromhex(e.oid)[0] <= b) for b in range(256)]
    ids = b"".join(bytes.fromhex(e.oid) for e in entries)
    if version == 1:
        body = (IDX_HEAD_V1.pack(IDX_MAGIC, 1, n) + FANOUT.pack(*fan) + ids
                + struct.pack(f"<{n}Q", *(e.offset for e in entries))
                + struct.pack(f"<{n}Q", *(e.length for e in entries))
                + struct.pack(f"<{n}Q", *(e.raw_len for e in entries)) + checksum)
    else:
        offs = [LARGE + i for i in range(n)] if escape else [e.offset for e in entries]
        large = [e.offset for e in entries] if escape else []
        body = (IDX_HEAD.pack(IDX_MAGIC, 2, n, len(large)) + FANOUT.pack(*fan) + ids
                + struct.pack(f"<{n}I", *offs) + struct.pack(f"<{n}I", *(e.length for e in entries))
                + struct.pack(f"<{len(large)}Q", *large) + checksum)
    idx_path.write_bytes(body + blake3.blake3(body).digest())


@pytest.mark.parametrize("version, escape", [(1, False), (2, True)])
def test_version_1_indexes_and_large_offsets_read_the_same(packed, version, escape):
    store, bodies, loose = packed
    idx, _ = _only_pack(store)
    before = list(Pack(idx).iter_entries())
    _rewrite_index(idx, version, escape)
    pack = Pack(idx)
    assert pack.version == version
    assert list(pack.iter_entries()) == before
    offsets, lengths = pack.location_arrays()
    assert [int(x) for x in offsets] == [e.offset for e in before]
    assert [int(x) for x in lengths] == [e.length for e in before]
    assert [int(x) for x in pack.raw_length_array()] == [e.raw_len for e in before]
    pack.verify()
    fresh = _fresh(store)
    for oid, body in bodies.items():
        assert fresh.read(oid) == (BLOB, body)


def test_index_is_40_bytes_an_object(packed):
    store, _, _ = packed
    idx, _ = _only_pack(store)
    assert ENTRY_BYTES == 40
    assert idx.stat().st_size == IDX_HEAD.size + FANOUT.size + 600 * ENTRY_BYTES + 64


def test_a_writer_without_dedup_refuses_a_repeated_id(tmp_path):
    oid, rec, _ = _record(BLOB, b"twice")
    with pytest.raises(ValueError, match="same id twice"):
        with PackWriter(tmp_path / "pack", dedup=False) as w:
            assert w.add(oid, rec) and w.add(bytes.fromhex(oid), rec)
            w.finish()
    assert list((tmp_path / "pack").iterdir()) == []


def _adapter(folder, seed: int, elems: int):
    import numpy as np
    from safetensors.numpy import save_file

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    save_file({f"layer{i}.lora_A.weight": rng.standard_normal(elems).astype(np.float32) for i in range(8)},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    return folder


def test_a_big_commit_lands_in_one_pack_and_a_small_one_stays_loose(tmp_path):
    from adapterhub.registry import Registry

    reg = Registry.init(tmp_path / "reg")
    small = reg.commit(_adapter(tmp_path / "small", 0, 64), "small")
    assert reg.store.packs() == [] and reg.store.loose.has(small.id)
    big = reg.commit(_adapter(tmp_path / "big", 1, 1 << 16), "big")  # 8 x 256 kB
    packs = Registry.open(reg.root).store.packs()
    assert len(packs) == 1
    pack = packs[0]
    snap = reg.store.get_snapshot(reg.store.get_commit(big.id).snapshot)
    new = {big.id, reg.store.get_commit(big.id).snapshot} | set(snap.blob_ids())
    # Every object the big commit wrote is in the pack (none loose), and the pack is whole.
    assert set(pack.iter_ids()) == new - set(reg.store.loose.iter_ids())
    assert big.id in set(pack.iter_ids()) and not reg.store.loose.has(big.id)
    pack.verify()
    out = tmp_path / "out"
    Registry.open(reg.root).checkout(big.id, out)
    assert (out / "adapter_model.safetensors").read_bytes() == (tmp_path / "big" / "adapter_model.safetensors").read_bytes()


def test_a_failed_commit_writes_nothing(tmp_path, monkeypatch):
    from adapterhub import registry as registry_mod
    from adapterhub.registry import Registry

    reg = Registry.init(tmp_path / "reg")
    before = sorted(os.listdir(reg.ah_dir / "objects"))

    def boom(*a, **k):
        raise RuntimeError("provenance failed")

    monkeypatch.setattr(registry_mod.prov, "collect", boom)
    with pytest.raises(RuntimeError):
        reg.commit(_adapter(tmp_path / "big", 1, 1 << 16), "big")
    assert sorted(os.listdir(reg.ah_dir / "objects")) == before and list(reg.store.iter_ids()) == []


@pytest.mark.parametrize("n", [1, 2, 3, 300, 5000])
@pytest.mark.parametrize("large", [None, 4000])
def test_index_tables_are_the_same_from_python_and_numpy(monkeypatch, n, large):
    """Small packs (a commit's) build their index in plain Python, big ones with numpy:
    the same bytes either way, large-value escapes and duplicate ids included."""
    import random
    from array import array

    from adapterhub import pack

    if large is not None:
        monkeypatch.setattr(pack, "LARGE", large)
    rng = random.Random(n)
    ids = bytearray(b"".join(rng.randbytes(32) for _ in range(n)))
    offsets = array("Q", sorted(rng.randrange(0, 9000) for _ in range(n)))
    lengths = array("Q", (rng.randrange(1, 6000) for _ in range(n)))
    python = pack._index_tables_python(ids, offsets, lengths)
    assert python == pack._index_tables_numpy(ids, offsets, lengths)
    fan, sorted_ids, _, _, escaped = python
    assert struct.unpack_from("<256I", fan)[-1] == n and len(sorted_ids) == 32 * n
    assert (large is None) == (escaped == []) or n < 3
    if n > 1:
        twice = ids + ids[:32]
        offsets.append(1)
        lengths.append(1)
        assert pack._index_tables_python(twice, offsets, lengths) is None
        assert pack._index_tables_numpy(twice, offsets, lengths) is None
