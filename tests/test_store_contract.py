"""The object-store contract, as one test class every backend inherits (dulwich style).

`StoreContract` checks what any `ObjectStore` must do: round-trip every object type, name
objects by the BLAKE3 hash of their canonical bytes whatever the storage encoding (zstd
level, tensor byte planes, delta chains), list and look up ids by prefix, and refuse
damaged records with an error naming the object.

A new backend is done when a subclass passes:

    class TestPackObjectStore(StoreContract):
        def make_store(self, tmp_path):
            return PackObjectStore(tmp_path / "objects")

Damaged records are planted through `write_raw_record`, which defaults to the backend's
own `_write_record` primitive under an id the store does not hold yet; a backend that
cannot take arbitrary records that way overrides it.
"""

from __future__ import annotations

import os

import blake3
import numpy as np
import pytest
import zstandard

from adapterhub import codec
from adapterhub.errors import AmbiguousRevision, CorruptObject, ObjectNotFound, UnsupportedFormat
from adapterhub.fsutil import TMP_PREFIX
from adapterhub.objects import (
    BLOB, COMMIT, EVAL, SNAPSHOT, TAG, TENSOR, TYPES, Commit, FileEntry, Snapshot, Tag, TensorEntry,
    canonical_json, hash_object, header,
)
from adapterhub.store import LooseObjectStore, ObjectStore


def canonical(obj_type: str, body: bytes) -> bytes:
    return header(obj_type, len(body)) + body


def record(obj_type: str, body: bytes, *, level: int = 3, content_size: bool = True, enc: int = codec.ENC_ZSTD,
           raw_len: int | None = None) -> bytes:
    """A stored record built by hand, so tests can vary what `codec.encode` fixes."""
    data = canonical(obj_type, body)
    payload = zstandard.ZstdCompressor(level=level, write_content_size=content_size).compress(data)
    return codec.RECORD_HEADER.pack(codec.MAGIC, enc, len(data) if raw_len is None else raw_len) + payload


def sample_bodies() -> dict[str, bytes]:
    """One valid body per object type (structured ones canonical, so `get` parses them)."""
    t = hash_object(TENSOR, b"\x00\x01" * 8)
    b = hash_object(BLOB, b"{}")
    snap = Snapshot(
        (
            FileEntry("adapter_config.json", "file", 2, b),
            FileEntry("adapter_model.safetensors", "safetensors", 96, b, (TensorEntry("w", "F16", (2, 4), t),)),
        )
    )
    s = hash_object(SNAPSHOT, snap.serialize())
    commit = Commit(s, (), "A <a@example.com>", 1_700_000_000, "first", {"base_model": {"name": "tiny"}})
    c = hash_object(COMMIT, commit.serialize())
    tag = Tag(c, COMMIT, "v1", "A <a@example.com>", 1_700_000_001, "release")
    return {
        TENSOR: b"\x00\x01" * 8,
        BLOB: b"{}",
        SNAPSHOT: snap.serialize(),
        COMMIT: commit.serialize(),
        TAG: tag.serialize(),
        EVAL: canonical_json({"commit": c, "metric": "acc", "value": 0.5}),
    }


def colliding_pair(prefix_len: int = 6) -> tuple[tuple[bytes, str], tuple[bytes, str]]:
    """Two blob bodies whose ids share their first `prefix_len` hex digits (found by search)."""
    seen: dict[str, tuple[bytes, str]] = {}
    i = 0
    while True:
        body = b"collide %d" % i
        oid = hash_object(BLOB, body)
        hit = seen.get(oid[:prefix_len])
        if hit is not None:
            return hit, (body, oid)
        seen[oid[:prefix_len]] = (body, oid)
        i += 1


class StoreContract:
    """Mixin: subclass as `Test<Backend>` and implement `make_store`."""

    def make_store(self, tmp_path) -> ObjectStore:
        raise NotImplementedError

    def write_raw_record(self, store: ObjectStore, oid: str, raw: bytes) -> None:
        """Plant `raw` as the stored record of `oid` (used to simulate on-disk damage)."""
        store._write_record(oid, raw)

    @pytest.fixture
    def store(self, tmp_path) -> ObjectStore:
        return self.make_store(tmp_path)

    def assert_corrupt(self, store: ObjectStore, oid: str) -> CorruptObject:
        with pytest.raises(CorruptObject) as info:
            store.read(oid)
        assert info.value.oid == oid
        assert oid in str(info.value)
        return info.value

    # --- round trips ------------------------------------------------------------------

    @pytest.mark.parametrize("obj_type", TYPES)
    def test_put_read_roundtrip(self, store, obj_type):
        body = sample_bodies()[obj_type]
        oid = store.put(obj_type, body)
        assert store.has(oid)
        assert store.read(oid) == (obj_type, body)
        assert store.object_type(oid) == obj_type

    def test_get_parses_structured_objects(self, store):
        bodies = sample_bodies()
        ids = {t: store.put(t, b) for t, b in bodies.items()}
        assert store.get_snapshot(ids[SNAPSHOT]).serialize() == bodies[SNAPSHOT]
        assert store.get_commit(ids[COMMIT]).serialize() == bodies[COMMIT]
        assert store.get_tag(ids[TAG]).serialize() == bodies[TAG]
        assert store.get(ids[BLOB]) == bodies[BLOB]
        with pytest.raises(CorruptObject) as info:
            store.get_commit(ids[SNAPSHOT])
        assert info.value.oid == ids[SNAPSHOT]

    def test_put_accepts_memoryview_and_empty_body(self, store):
        data = bytearray(os.urandom(1000))
        oid = store.put(TENSOR, memoryview(data)[100:900])
        assert store.read(oid) == (TENSOR, bytes(data[100:900]))
        empty = store.put(BLOB, b"")
        assert store.read(empty) == (BLOB, b"")

    def test_large_object_roundtrip(self, store):
        # Above hash_object's multithreaded-hash threshold (4 MiB): same id as one thread.
        body = os.urandom(5 << 20)
        oid = store.put(TENSOR, body)
        assert oid == blake3.blake3(canonical(TENSOR, body)).hexdigest()
        assert store.read(oid) == (TENSOR, body)

    def test_put_is_idempotent(self, store):
        oid, created = store.put_ex(BLOB, b"hello")
        assert created
        assert store.put_ex(BLOB, b"hello") == (oid, False)
        assert list(store.iter_ids()) == [oid]

    def test_concurrent_puts_of_the_same_objects(self, store):
        """Commits hash and store tensors on a thread pool; racing writers of one object
        must leave exactly one readable copy and raise nothing."""
        from concurrent.futures import ThreadPoolExecutor

        bodies = [b"shared %d " % i * 50 for i in range(30)]

        def put_all(_):
            return [store.put(BLOB, b) for b in bodies]

        with ThreadPoolExecutor(max_workers=4) as pool:
            results = list(pool.map(put_all, range(4)))
        assert all(r == results[0] for r in results)
        assert sorted(store.iter_ids()) == sorted(set(results[0]))
        assert [store.read(oid) for oid in results[0]] == [(BLOB, b) for b in bodies]

    def test_missing_object(self, store):
        oid = hash_object(BLOB, b"never stored")
        assert not store.has(oid)
        with pytest.raises(ObjectNotFound) as info:
            store.read(oid)
        assert info.value.oid == oid

    # --- ids --------------------------------------------------------------------------

    @pytest.mark.parametrize("obj_type", TYPES)
    def test_id_is_blake3_of_canonical_bytes(self, store, obj_type):
        body = sample_bodies()[obj_type]
        expected = blake3.blake3(obj_type.encode() + b" %d\0" % len(body) + body).hexdigest()
        assert store.put(obj_type, body) == expected

    def test_type_is_part_of_the_id(self, store):
        assert store.put(BLOB, b"same bytes") != store.put(TENSOR, b"same bytes")

    @pytest.mark.parametrize("level,content_size", [(1, True), (19, True), (3, False), (-5, True)])
    def test_id_independent_of_compression(self, store, level, content_size):
        body = b"compressible " * 200
        oid = hash_object(TENSOR, body)
        self.write_raw_record(store, oid, record(TENSOR, body, level=level, content_size=content_size))
        assert store.read(oid) == (TENSOR, body)
        # Putting the same object again neither changes its id nor needs a rewrite.
        assert store.put_ex(TENSOR, body) == (oid, False)

    # --- tensor encodings (hints change storage, never ids) ----------------------------

    @pytest.mark.parametrize("dtype,np_dtype", [("F32", "<f4"), ("F16", "<f2"), ("BF16", "<u2"), ("I64", "<i8")])
    def test_tensor_dtype_hint_keeps_id(self, store, dtype, np_dtype):
        body = (np.random.default_rng(1).standard_normal(999) * 0.02).astype(np_dtype).tobytes()
        oid = store.put(TENSOR, body, dtype=dtype)
        assert oid == hash_object(TENSOR, body)
        assert store.read(oid) == (TENSOR, body)
        assert store.put_ex(TENSOR, body) == (oid, False)

    def test_delta_chain_reads_back_and_stays_bounded(self, store):
        """Twelve training steps, each stored against the one before (as commits do)."""
        rng = np.random.default_rng(2)
        weights = (rng.standard_normal(2048) * 0.02).astype("<f4")
        ids, bodies, prev = [], [], None
        for _ in range(12):
            weights = weights + (rng.standard_normal(2048) * 1e-5).astype("<f4")
            body = weights.tobytes()
            oid = store.put(TENSOR, body, dtype="F32", delta_base=prev)
            assert oid == hash_object(TENSOR, body)
            ids.append(oid)
            bodies.append(body)
            prev = oid
        for oid, body in zip(ids, bodies):
            assert store.read(oid) == (TENSOR, body)
            depth, cur = 0, store.delta_base_of(oid)
            while cur is not None:
                assert cur in ids[: ids.index(oid)]
                depth += 1
                cur = store.delta_base_of(cur)
            assert depth <= codec.MAX_CHAIN

    def test_delta_record_whose_base_is_absent(self, store, tmp_path):
        rng = np.random.default_rng(3)
        a = (rng.standard_normal(2048) * 0.02).astype("<f4")
        b = a + (rng.standard_normal(2048) * 1e-5).astype("<f4")
        ida = store.put(TENSOR, a.tobytes(), dtype="F32")
        idb = store.put(TENSOR, b.tobytes(), dtype="F32", delta_base=ida)
        if store.delta_base_of(idb) != ida:
            pytest.skip("this backend stored the tensor whole")
        (tmp_path / "other").mkdir()
        other = self.make_store(tmp_path / "other")
        self.write_raw_record(other, idb, store._read_record(idb))
        exc = self.assert_corrupt(other, idb)
        assert ida in exc.reason

    # --- listing and prefixes ---------------------------------------------------------

    def test_iter_ids_and_has(self, store):
        assert list(store.iter_ids()) == []
        ids = {store.put(BLOB, b"object %d" % i) for i in range(40)}
        listed = list(store.iter_ids())
        assert len(listed) == len(ids) and set(listed) == ids
        assert all(store.has(oid) for oid in ids)
        assert not store.has(hash_object(BLOB, b"object 40"))

    def test_find_prefix(self, store):
        ids = [store.put(BLOB, b"prefix %d" % i) for i in range(64)]
        for oid in ids[:8]:
            for n in (1, 2, 3, 6, 64):
                expected = sorted(i for i in ids if i.startswith(oid[:n]))
                assert sorted(store.find_prefix(oid[:n])) == expected
        absent = next(p for p in (f"{i:04x}" for i in range(1 << 16)) if not any(i.startswith(p) for i in ids))
        assert store.find_prefix(absent) == []

    def test_resolve_prefix_unique_and_missing(self, store):
        oid = store.put(BLOB, b"only one")
        assert store.resolve_prefix(oid[:6]) == oid
        assert store.resolve_prefix(oid) == oid
        absent = "ffffff" if not oid.startswith("ffffff") else "000000"
        assert store.resolve_prefix(absent) is None

    def test_resolve_prefix_ambiguity_is_an_error(self, store):
        (body_a, id_a), (body_b, id_b) = colliding_pair(6)
        assert store.put(BLOB, body_a) == id_a and store.put(BLOB, body_b) == id_b
        assert sorted(store.find_prefix(id_a[:6])) == sorted([id_a, id_b])
        with pytest.raises(AmbiguousRevision) as info:
            store.resolve_prefix(id_a[:6])
        assert id_a[:12] in str(info.value) and id_b[:12] in str(info.value)
        # One more digit (where they differ) settles it.
        n = next(i for i in range(64) if id_a[i] != id_b[i]) + 1
        assert store.resolve_prefix(id_a[:n]) == id_a
        assert store.resolve_prefix(id_b[:n]) == id_b

    # --- damaged records ----------------------------------------------------------------

    def test_flipped_byte_never_returns_wrong_data(self, store):
        """Flip each bit pattern at each byte: every read is an error naming the id, or the
        exact original object (a payload flip zstd ignores); never other bytes.

        A flipped encoding byte may name another known encoding (CorruptObject when its
        payload does not parse) or an unknown one (UnsupportedFormat)."""
        body = b"payload that is stored once " + bytes(range(64))
        oid = hash_object(BLOB, body)
        good = record(BLOB, body)
        detected = 0
        trials = 0
        for pos in range(len(good)):
            for mask in (0x01, 0x80, 0xFF):
                bad = bytearray(good)
                bad[pos] ^= mask
                self.write_raw_record(store, oid, bytes(bad))
                trials += 1
                try:
                    got = store.read(oid)
                except CorruptObject as exc:
                    assert exc.oid == oid and oid in str(exc)
                    detected += 1
                    continue
                except UnsupportedFormat as exc:
                    assert pos == 4 and oid in str(exc)
                    detected += 1
                    continue
                assert pos >= codec.RECORD_HEADER.size, f"header byte {pos} ^ {mask:#x} went unnoticed"
                assert got == (BLOB, body), f"byte {pos} ^ {mask:#x} gave wrong data"
        assert detected >= trials * 0.9

    def test_unknown_encoding_is_unsupported_format(self, store):
        body = b"y" * 50
        oid = hash_object(TENSOR, body)
        self.write_raw_record(store, oid, record(TENSOR, body, enc=0x7F))
        with pytest.raises(UnsupportedFormat) as info:
            store.read(oid)
        assert oid in str(info.value) and "127" in str(info.value)

    def test_truncated_record(self, store):
        body = os.urandom(48)
        oid = hash_object(TENSOR, body)
        good = record(TENSOR, body)
        for cut in range(len(good)):
            self.write_raw_record(store, oid, good[:cut])
            self.assert_corrupt(store, oid)

    def test_record_of_another_object(self, store):
        """A well-formed record whose bytes hash to another id (a swapped file)."""
        oid_a = hash_object(BLOB, b"object A")
        self.write_raw_record(store, oid_a, record(BLOB, b"object B"))
        exc = self.assert_corrupt(store, oid_a)
        assert "hash" in exc.reason
        # Same bytes but another type in the header: also another id.
        oid_t = hash_object(TENSOR, b"object A")
        self.write_raw_record(store, oid_t, record(BLOB, b"object A"))
        self.assert_corrupt(store, oid_t)

    def test_bad_canonical_header(self, store):
        for name, data in {
            "no NUL": b"blob 5hello",
            "unknown type": b"bogus 5\0hello",
            "wrong length": b"blob 6\0hello",
            "padded length": b"blob 05\0hello",
        }.items():
            oid = blake3.blake3(data).hexdigest()
            payload = zstandard.ZstdCompressor().compress(data)
            self.write_raw_record(store, oid, codec.RECORD_HEADER.pack(codec.MAGIC, codec.ENC_ZSTD, len(data)) + payload)
            self.assert_corrupt(store, oid)

    def test_bad_magic(self, store):
        oid = hash_object(BLOB, b"magic")
        good = record(BLOB, b"magic")
        self.write_raw_record(store, oid, b"GIT1" + good[4:])
        self.assert_corrupt(store, oid)

    def test_frame_declaring_more_than_raw_len(self, store):
        """Decompression bomb: a tiny frame that claims (and would produce) 64 MiB."""
        body = b"bomb"
        oid = hash_object(BLOB, body)
        frame = zstandard.ZstdCompressor(level=1).compress(bytes(64 << 20))
        assert len(frame) < 64 << 10
        raw = codec.RECORD_HEADER.pack(codec.MAGIC, codec.ENC_ZSTD, len(canonical(BLOB, body))) + frame
        self.write_raw_record(store, oid, raw)
        exc = self.assert_corrupt(store, oid)
        assert "declares" in exc.reason

    def test_frame_without_size_inflating_past_raw_len(self, store):
        body = b"bomb"
        oid = hash_object(BLOB, body)
        frame = zstandard.ZstdCompressor(level=1, write_content_size=False).compress(bytes(64 << 20))
        raw = codec.RECORD_HEADER.pack(codec.MAGIC, codec.ENC_ZSTD, len(canonical(BLOB, body))) + frame
        self.write_raw_record(store, oid, raw)
        self.assert_corrupt(store, oid)

    def test_raw_len_over_limit(self, store):
        body = b"huge claim"
        oid = hash_object(BLOB, body)
        self.write_raw_record(store, oid, record(BLOB, body, raw_len=codec.MAX_RAW_LEN + 1))
        exc = self.assert_corrupt(store, oid)
        assert "limit" in exc.reason

    def test_raw_len_smaller_than_frame(self, store):
        body = b"q" * 300
        oid = hash_object(BLOB, body)
        self.write_raw_record(store, oid, record(BLOB, body, raw_len=10))
        self.assert_corrupt(store, oid)


class TestLooseObjectStore(StoreContract):
    def make_store(self, tmp_path) -> ObjectStore:
        # Registry.init creates the objects folder; the store itself only adds fan-out folders.
        (tmp_path / "objects").mkdir()
        return LooseObjectStore(tmp_path / "objects")

    # Backend-specific: damage to the real file on disk, not a planted record.

    def test_flipped_byte_in_file_on_disk(self, tmp_path):
        store = self.make_store(tmp_path)
        body = os.urandom(256)
        oid = store.put(TENSOR, body)
        path = tmp_path / "objects" / oid[:2] / oid[2:]
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0x10
        path.write_bytes(bytes(raw))
        self.assert_corrupt(store, oid)

    def test_layout_and_temp_files_ignored(self, tmp_path):
        store = self.make_store(tmp_path)
        oid = store.put(BLOB, b"layout")
        assert (tmp_path / "objects" / oid[:2] / oid[2:]).is_file()
        # A writer killed mid-write leaves a temp file: never listed, never matched.
        (tmp_path / "objects" / oid[:2] / (TMP_PREFIX + "abc123")).write_bytes(b"partial")
        (tmp_path / "objects" / "zz").mkdir()
        assert list(store.iter_ids()) == [oid]
        assert store.find_prefix(oid[:2]) == [oid]

    def test_remove(self, tmp_path):
        store = self.make_store(tmp_path)
        oid = store.put(BLOB, b"gone soon")
        store.remove(oid)
        assert not store.has(oid) and list(store.iter_ids()) == []

    def test_store_on_missing_folder_is_empty(self, tmp_path):
        store = LooseObjectStore(tmp_path / "nothing-here")
        assert list(store.iter_ids()) == [] and store.find_prefix("ab") == []
