"""Encoding 5: snapshots and commits as bare zstd frames whose dictionary is named by an
8-byte id prefix. Every blob matching the prefix is a candidate (tried, result hashed),
gc keeps every match, and bad input (missing, ambiguous, damaged, self-referencing
dictionaries; truncated or oversized frames) is a CorruptObject naming what is wrong."""

from __future__ import annotations

import os
import time

import pytest
import zstandard

from adapterhub import codec
from adapterhub.errors import CorruptObject
from adapterhub.gc import collect_garbage
from adapterhub.importer import structured_dictionary
from adapterhub.objects import BLOB, COMMIT, SNAPSHOT, hash_object, header
from adapterhub.provenance import shared_context
from adapterhub.registry import Registry
from adapterhub.store import LooseObjectStore
from ah_testkit import write_adapter
from adapters import sha256_tree

BODY = b'{"author":"A <a@example.com>","message":"import user0000042","parents":[],"timestamp":1}'
RAW_DICT = b'{"author":"A <a@example.com>","message":"import user0000001","parents":[],"timestamp":1}'
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _canonical(body: bytes = BODY, obj_type: str = COMMIT) -> bytes:
    return header(obj_type, len(body)) + body


def _store(tmp_path) -> LooseObjectStore:
    (tmp_path / "objects").mkdir(exist_ok=True)
    return LooseObjectStore(tmp_path / "objects")


def _with_record(tmp_path, zdict: bytes = RAW_DICT, body: bytes = BODY):
    """(store, dictionary id, object id) with the object stored as encoding 5."""
    store = _store(tmp_path)
    dict_id = store.put(BLOB, zdict)
    oid = hash_object(COMMIT, body)
    store._write_record(oid, codec.encode_with_dict([_canonical(body)], dict_id, zdict))
    return store, dict_id, oid


def _twin_id(dict_id: str, last: str = "0") -> str:
    """An id sharing the dictionary's 8-byte prefix (and differing from it)."""
    twin = dict_id[: 2 * codec.DICT_PREFIX_BYTES] + last * (64 - 2 * codec.DICT_PREFIX_BYTES)
    assert twin != dict_id
    return twin


def test_record_layout_prefix_and_bare_frame(tmp_path):
    store, dict_id, oid = _with_record(tmp_path)
    record = store._read_record(oid)
    magic, enc, raw_len = codec.RECORD_HEADER.unpack_from(record)
    assert (magic, enc, raw_len) == (codec.MAGIC, codec.ENC_DICT_PREFIX, len(_canonical()))
    start = codec.RECORD_HEADER.size
    assert record[start : start + codec.DICT_PREFIX_BYTES] == bytes.fromhex(dict_id)[: codec.DICT_PREFIX_BYTES]
    frame = record[start + codec.DICT_PREFIX_BYTES :]
    assert not frame.startswith(ZSTD_MAGIC)
    # Smaller than a standard frame with the same dictionary (magic and content size gone).
    std = zstandard.ZstdCompressor(level=3, dict_data=zstandard.ZstdCompressionDict(RAW_DICT), write_content_size=True)
    assert len(frame) < len(std.compress(_canonical()))
    assert LooseObjectStore(store.root).read(oid) == (COMMIT, BODY)
    assert store.dependencies_of(oid) == (dict_id,)


def test_a_trained_dictionary_with_entropy_tables_round_trips(tmp_path):
    samples = [_canonical(BODY.replace(b"42", b"%d" % i)) for i in range(200)]
    trained = zstandard.train_dictionary(4096, samples).as_bytes()
    assert trained.startswith(b"\x37\xa4\x30\xec")  # zstd's dictionary magic: a full dictionary
    store, dict_id, oid = _with_record(tmp_path, trained + b"appended raw content")
    assert LooseObjectStore(store.root).read(oid) == (COMMIT, BODY)


def test_missing_dictionary(tmp_path):
    store, dict_id, oid = _with_record(tmp_path)
    store.remove(dict_id)
    prefix = dict_id[: 2 * codec.DICT_PREFIX_BYTES]
    fresh = LooseObjectStore(store.root)
    with pytest.raises(CorruptObject, match=f"{oid}.*compression dictionary {prefix}\\.\\.\\. is missing"):
        fresh.read(oid)
    with pytest.raises(CorruptObject, match="is missing"):
        fresh.dependencies_of(oid)


def test_damaged_dictionary_is_named(tmp_path):
    store, dict_id, oid = _with_record(tmp_path)
    store._write_record(dict_id, codec.encode([header(BLOB, 5), b"wrong"]))
    with pytest.raises(CorruptObject, match=f"{oid}.*{dict_id}.*does not hash"):
        LooseObjectStore(store.root).read(oid)


def test_ambiguous_prefix_tries_every_candidate_and_keeps_the_one_that_hashes(tmp_path):
    store, dict_id, oid = _with_record(tmp_path)
    # Two other objects under ids sharing the prefix: a blob record that does not hash
    # to its id, and a tensor-like non-blob. Whatever order they are listed in, the read
    # finds the real dictionary; dependencies name all three (gc keeps them all).
    twin_a, twin_b = _twin_id(dict_id, "0"), _twin_id(dict_id, "f")
    store._write_record(twin_a, codec.encode([header(BLOB, len(RAW_DICT)), RAW_DICT]))
    store._write_record(twin_b, codec.encode([header(COMMIT, 2), b"{}"]))
    fresh = LooseObjectStore(store.root)
    assert fresh.read(oid) == (COMMIT, BODY)
    assert sorted(fresh.dependencies_of(oid)) == sorted([dict_id, twin_a, twin_b])


def test_ambiguous_prefix_where_no_candidate_decodes_names_them_all(tmp_path):
    store, dict_id, oid = _with_record(tmp_path)
    twin = _twin_id(dict_id)
    store._write_record(twin, codec.encode([header(BLOB, len(RAW_DICT)), RAW_DICT]))
    store.remove(dict_id)
    with pytest.raises(CorruptObject, match=f"no blob whose id starts with .*{twin}"):
        LooseObjectStore(store.root).read(oid)


def test_a_candidate_blob_that_decodes_to_other_content_is_passed_over():
    # Two genuine blobs with one prefix cannot be made (it takes a 64-bit collision), so
    # the codec is driven directly: the first candidate inflates, but not to the object.
    oid = hash_object(COMMIT, BODY)
    real_id = hash_object(BLOB, RAW_DICT)
    record = codec.encode_with_dict([_canonical()], real_id, RAW_DICT)
    other = RAW_DICT.replace(b"A <a@example.com>", b"B <b@example.com>")
    verify = lambda data: hash_object(COMMIT, data[len(header(COMMIT, len(BODY))):]) == oid  # noqa: E731
    prefix = real_id[: 2 * codec.DICT_PREFIX_BYTES]
    seen = []

    def candidates(p):
        seen.append(p)
        yield _twin_id(real_id), other
        yield real_id, RAW_DICT

    assert codec.decode(oid, record, dict_candidates=candidates, verify=verify) == _canonical()
    assert seen == [prefix]
    with pytest.raises(CorruptObject, match="decodes to other content"):
        codec.decode(oid, record, dict_candidates=lambda p: [(_twin_id(real_id), other)], verify=verify)
    with pytest.raises(CorruptObject, match="cannot be read here"):
        codec.decode(oid, record)


def test_a_dictionary_that_needs_a_dictionary_is_refused_without_recursing(tmp_path):
    store = _store(tmp_path)
    # A "dictionary" stored as encoding 5 naming its own prefix: reading it would need
    # itself. The candidate is skipped as not self-contained; the error says so.
    dict_id = hash_object(BLOB, RAW_DICT)
    store._write_record(dict_id, codec.encode_with_dict([_canonical(RAW_DICT, BLOB)], dict_id, RAW_DICT))
    oid = hash_object(COMMIT, BODY)
    store._write_record(oid, codec.encode_with_dict([_canonical()], dict_id, RAW_DICT))
    with pytest.raises(CorruptObject, match="needs another object"):
        LooseObjectStore(store.root).read(oid)


@pytest.mark.parametrize(
    "cut, declared, match",
    [
        (codec.RECORD_HEADER.size + 3, None, "no dictionary id prefix"),
        (-4, None, "does not decompress"),
        (None, -1, "does not decompress|inflated to"),  # frame longer than declared: refused
        (None, +1, "inflated to"),
        (None, 4 << 30, "more than its .*-byte frame can hold"),  # refused before allocating 4 GiB
    ],
)
def test_truncated_or_mis_sized_records(tmp_path, cut, declared, match):
    store, dict_id, oid = _with_record(tmp_path)
    record = bytearray(store._read_record(oid))
    if declared is not None:
        codec.RECORD_HEADER.pack_into(record, 0, codec.MAGIC, codec.ENC_DICT_PREFIX, len(_canonical()) + declared)
    if cut is not None:
        record = record[:cut]
    store._write_record(oid, bytes(record))
    with pytest.raises(CorruptObject, match=match):
        LooseObjectStore(store.root).read(oid)


# --- through a registry: commit, gc, checkout -------------------------------------------
def _registry_with_dictionary(tmp_path):
    """A registry whose second commit (and its snapshot) is stored as encoding 5, with the
    first commit's objects as the dictionary (as import's fallback dictionary is)."""
    reg = Registry.init(tmp_path / "reg")
    first = reg.commit(write_adapter(tmp_path / "a", seed=3), "first").id
    commit_body = reg.store.read(first)[1]
    zdict = reg.store.read(reg.store.get_commit(first).snapshot)[1] + commit_body
    dict_id = reg.store.put(BLOB, zdict)
    reg.store.structured_dict = (dict_id, zdict)
    folder = write_adapter(tmp_path / "b", seed=4)
    cid = reg.commit(folder, "second").id
    return reg, dict_id, cid, folder


def test_gc_keeps_every_object_matching_a_dictionary_prefix(tmp_path):
    reg, dict_id, cid, folder = _registry_with_dictionary(tmp_path)
    snap = reg.store.get_commit(cid).snapshot
    for oid in (cid, snap):
        assert reg.store._read_record(oid)[4] == codec.ENC_DICT_PREFIX
    twin = _twin_id(dict_id)
    reg.store.loose._write_record(twin, codec.encode([header(BLOB, 3), b"abc"]))
    old = time.time() - 30 * 86400
    for dirpath, _dirs, files in os.walk(reg.ah_dir / "objects"):
        for f in files:
            os.utime(os.path.join(dirpath, f), (old, old))
    stray = reg.store.put(BLOB, b"unreachable")  # a control: this one goes
    os.utime(reg.store.loose._path(stray), (old, old))
    result = collect_garbage(reg.ah_dir, reg.store, reg.refs, grace_s=0)
    assert result.pruned >= 1
    again = Registry.open(reg.root)
    assert again.store.has(dict_id) and again.store.has(twin) and not again.store.has(stray)
    out = tmp_path / "out"
    again.checkout(cid, out)
    assert sha256_tree(out) == sha256_tree(folder)


def test_structured_dictionary_is_trained_and_ends_with_the_recurring_ids(tmp_path):
    from adapterhub.importer import _encode, _init_worker, _Task

    reg = Registry.init(tmp_path / "reg")
    _init_worker(str(reg.store.root), shared_context())
    sample = []
    for i in range(40):
        folder = write_adapter(tmp_path / f"u{i:03d}", seed=i)  # own tensors, one shared config file
        sample.append(_encode(_Task(str(folder), None, "A <a@example.com>", 1, f"import u{i:03d}")))
    dict_id, data, record = structured_dictionary(sample)
    assert data.startswith(b"\x37\xa4\x30\xec") and hash_object(BLOB, data) == dict_id
    assert codec.decode(dict_id, record) == header(BLOB, len(data)) + data
    counts: dict[str, int] = {}
    for enc in sample:
        for b in _snapshot_of(enc).blob_ids():
            counts[b] = counts.get(b, 0) + 1
    recurring = {b for b, n in counts.items() if n > 1}
    config_id = hash_object(BLOB, (tmp_path / "u000" / "adapter_config.json").read_bytes())
    assert config_id in recurring and len(recurring) < 4  # the config (and shared structure), no tensors
    tail = data[-64 * len(recurring) :].decode()
    assert {tail[i : i + 64] for i in range(0, len(tail), 64)} == recurring


def _snapshot_of(enc):
    from adapterhub.objects import parse_object, split_canonical

    for oid, rec in enc.records:
        obj_type, body = split_canonical(oid, codec.decode(oid, rec))
        if obj_type == SNAPSHOT:
            return parse_object(oid, obj_type, bytes(body))
    raise AssertionError("no snapshot")


def test_too_few_samples_fall_back_to_raw_content(tmp_path, monkeypatch):
    from adapterhub.importer import _encode, _init_worker, _Task

    reg = Registry.init(tmp_path / "reg")
    _init_worker(str(reg.store.root), shared_context())
    folder = write_adapter(tmp_path / "u0", seed=1)
    enc = _encode(_Task(str(folder), None, "A <a@example.com>", 1, "import u0"))

    def refuse(*_a, **_k):
        raise zstandard.ZstdError("not enough samples")

    monkeypatch.setattr(zstandard, "train_dictionary", refuse)
    dict_id, data, _record = structured_dictionary([enc])
    assert not data.startswith(b"\x37\xa4\x30\xec") and b'"files"' in data and b'"message"' in data
    # Raw content still primes encoding 5.
    store = _store(tmp_path)
    store.put(BLOB, data)
    snap_id = next(oid for oid, rec in enc.records if codec.decode(oid, rec).startswith(SNAPSHOT.encode()))
    body = codec.decode(snap_id, dict(enc.records)[snap_id])
    store._write_record(snap_id, codec.encode_with_dict([body], dict_id, data))
    assert LooseObjectStore(store.root).read(snap_id)[0] == SNAPSHOT


def test_a_walk_lists_each_dictionary_prefix_once(tmp_path, monkeypatch):
    from adapterhub.packstore import PackedObjectStore
    from adapterhub.reach import ref_roots, walk

    reg, dict_id, cid, folder = _registry_with_dictionary(tmp_path)
    reg.commit(write_adapter(tmp_path / "c", seed=5), "third")
    calls = []
    listing = PackedObjectStore.find_prefix

    def counted(self, prefix):
        calls.append(prefix)
        return listing(self, prefix)

    monkeypatch.setattr(PackedObjectStore, "find_prefix", counted)
    store = Registry.open(reg.root).store
    result = walk(store, ref_roots(reg.refs), reg.ah_dir)
    assert result.ids.has_key(bytes.fromhex(dict_id)) and result.commits == 3
    assert calls == [dict_id[: 2 * codec.DICT_PREFIX_BYTES]]  # four records, one listing
    assert "find_prefix" not in store.__dict__  # the memo ends with the walk
    store.dependencies_of(cid)
    assert len(calls) == 2


def test_a_frame_header_declaring_a_content_size_is_refused(tmp_path):
    # Damage that turns on the frame's content-size field (header descriptor bits 7-6)
    # must not reach the decompressor, which would allocate whatever size it declares.
    store, dict_id, oid = _with_record(tmp_path)
    record = bytearray(store._read_record(oid))
    record[codec.RECORD_HEADER.size + codec.DICT_PREFIX_BYTES] = 0xC0
    store._write_record(oid, bytes(record))
    with pytest.raises(CorruptObject, match="header descriptor other than 0"):
        LooseObjectStore(store.root).read(oid)


def test_a_damaged_full_dictionary_is_a_failed_candidate(tmp_path):
    samples = [_canonical(BODY.replace(b"42", b"%d" % i)) for i in range(200)]
    trained = zstandard.train_dictionary(4096, samples).as_bytes()
    store, dict_id, oid = _with_record(tmp_path, trained)
    oid_real = oid
    # Another record, whose dictionary is a blob with zstd's dictionary magic and garbage
    # tables: it is tried and reported, not an uncaught zstd error.
    broken = trained[:8] + bytes(200)
    broken_id = store.put(BLOB, broken)
    body = BODY.replace(b"42", b"43")
    oid = hash_object(COMMIT, body)
    record = bytearray(codec.encode_with_dict([_canonical(body)], dict_id, trained))
    start = codec.RECORD_HEADER.size
    record[start : start + codec.DICT_PREFIX_BYTES] = bytes.fromhex(broken_id)[: codec.DICT_PREFIX_BYTES]
    store._write_record(oid, bytes(record))
    with pytest.raises(CorruptObject, match=f"no blob whose id starts with .*{broken_id}"):
        LooseObjectStore(store.root).read(oid)
    assert LooseObjectStore(store.root).read(oid_real) == (COMMIT, BODY)


def _encoding_3_record(canonical_parts, dict_id: str, dict_data: bytes) -> bytes:
    """A record as writers before encoding 5 made it: whole dictionary id, standard frame."""
    data = b"".join(bytes(p) for p in canonical_parts)
    raw = zstandard.ZstdCompressionDict(dict_data, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    frame = zstandard.ZstdCompressor(level=3, dict_data=raw, write_content_size=True).compress(data)
    return codec.RECORD_HEADER.pack(codec.MAGIC, codec.ENC_DICT, len(data)) + bytes.fromhex(dict_id) + frame


def test_an_old_registry_reads_collects_and_takes_new_imports(tmp_path, monkeypatch):
    """Encoding-3 records and a version-1 packed-refs file, as an older version left them:
    everything reads, gc keeps the old dictionary, and a new import adds encoding-5
    records and rewrites packed-refs as version 2 without losing the old refs."""
    from adapterhub.importer import import_folders
    from adapterhub.packed_refs import HEADER_V1, HEADER_V2
    from adapterhub.refs import HEADS

    reg, dict_id, _cid, _folder = _registry_with_dictionary(tmp_path)  # for its dictionary
    zdict = reg.store.structured_dict[1]
    with monkeypatch.context() as m:  # an old writer
        m.setattr(codec, "encode_with_dict", _encoding_3_record)
        old_folder = write_adapter(tmp_path / "old", seed=7)
        old = reg.commit(old_folder, "old", branch="old-branch").id
    for oid in (old, reg.store.get_commit(old).snapshot):
        assert reg.store._read_record(oid)[4] == codec.ENC_DICT
    refs = sorted((name, oid) for name, oid in reg.refs.list("refs/"))
    for name, oid in refs:
        reg.refs.delete(name, expected=oid)
    (reg.ah_dir / "packed-refs").write_bytes(HEADER_V1 + b"".join(b"%s %s\n" % (o.encode(), n.encode()) for n, o in refs))
    old_age = time.time() - 30 * 86400
    for dirpath, _dirs, files in os.walk(reg.ah_dir / "objects"):
        for f in files:
            os.utime(os.path.join(dirpath, f), (old_age, old_age))

    fresh = Registry.open(reg.root)
    assert sorted(fresh.refs.list("refs/")) == refs
    assert fresh.store.dependencies_of(old) == (dict_id,)
    collect_garbage(fresh.ah_dir, fresh.store, fresh.refs, grace_s=0)
    again = Registry.open(reg.root)
    assert again.store.has(dict_id)
    out = tmp_path / "out-old"
    again.checkout(old, out)
    assert sha256_tree(out) == sha256_tree(old_folder)

    new_folders = [write_adapter(tmp_path / "new" / f"user{i:03d}", seed=100 + i) for i in range(12)]
    import_folders(again.ah_dir, again.store, again.refs, new_folders, prefix="users/", workers=1)
    assert (reg.ah_dir / "packed-refs").read_bytes().startswith(HEADER_V2)
    last = Registry.open(reg.root)
    assert last.resolve("old-branch") == old
    tip = last.resolve("users/user011")
    assert last.store._read_record(tip)[4] in (codec.ENC_DICT_PREFIX, codec.ENC_ZSTD)
    out = tmp_path / "out-new"
    last.checkout(tip, out)
    assert sha256_tree(out) == sha256_tree(new_folders[11])
    assert len(list(last.refs.list(HEADS + "users/"))) == 12
