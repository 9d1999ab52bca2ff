"""Float-aware storage encodings: byte planes, deltas against the parent, and their attacks.

Round trips are checked by property (any bytes, any dtype, any base), the choice of
encoding on real float data, the chain bound through real commits, and every malformed
record (truncated, bomb, missing base, cyclic chain, unknown encoding) by its error.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings, strategies as st
from safetensors.numpy import save_file

from adapterhub import codec
from adapterhub.encoding import frames
from adapterhub.encoding.delta import MAX_CHAIN
from adapterhub.encoding.planes import PlaneLayout, layout_for
from adapterhub.encoding import delta as deltas
from adapterhub.encoding.tensor import DeltaBase, encode_delta
from adapterhub.errors import CorruptObject, UnsupportedFormat
from adapterhub.objects import TENSOR, hash_object, header
from adapterhub.registry import Registry
from adapterhub.store import LooseObjectStore

DTYPES = ["F32", "BF16", "F16", "F64", "I32", "I64", "U16", "U8", None]


def _bf16(x: np.ndarray) -> np.ndarray:
    return (x.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


def _weights(seed: int, n: int = 4096, scale: float = 0.02) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)


def _enc(record: bytes) -> int:
    return record[4]


# --- round trips --------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=600), dtype=st.sampled_from(DTYPES))
def test_any_bytes_round_trip_under_any_dtype(body, dtype):
    h = header(TENSOR, len(body))
    record = codec.encode_tensor(h, body, dtype)
    assert codec.decode("x", record) == h + body


@settings(max_examples=200, deadline=None)
@given(
    body=st.binary(min_size=8, max_size=400),
    flips=st.lists(st.integers(0, 10_000), max_size=20),
    dtype=st.sampled_from(["F32", "BF16", "F16", "I64"]),
)
def test_delta_round_trips_against_any_same_length_base(body, flips, dtype):
    base = bytearray(body)
    for f in flips:
        base[f % len(base)] ^= (f % 251) + 1
    base = bytes(base)
    h = header(TENSOR, len(body))
    record = codec.encode_tensor(h, body, dtype, DeltaBase("ab" * 32, base, 0))
    assert codec.decode("x", record, lambda oid, depth: base) == h + body


@settings(max_examples=150, deadline=None)
@given(
    body=st.binary(min_size=8, max_size=300),
    base=st.binary(min_size=8, max_size=300),
    dtype=st.sampled_from(["F32", "BF16", "F16", "F64", "I32", "U16"]),
    kind=st.sampled_from(deltas.KINDS),
)
def test_both_delta_kinds_round_trip(body, base, dtype, kind):
    n = min(len(body), len(base))
    body, base = body[:n], base[:n]
    h = header(TENSOR, n)
    payload = encode_delta(h, body, layout_for(dtype), DeltaBase("ab" * 32, base, 0), kind)
    record = codec.RECORD_HEADER.pack(codec.MAGIC, codec.ENC_DELTA, len(h) + n) + payload
    assert codec.decode("x", record, lambda oid, depth: base) == h + body


def test_ord_delta_is_small_for_small_steps_across_zero_and_carries():
    x = np.array([0.5, -1e-8, 1e-8, 0.9999999, -3.0] * 200, np.float32)
    y = np.nextafter(x, np.float32(np.inf))  # one ulp up: across zero, across a mantissa carry
    h = header(TENSOR, y.nbytes)
    base = DeltaBase("cd" * 32, x.tobytes(), 0)
    ord_len = len(encode_delta(h, y.tobytes(), layout_for("F32"), base, deltas.ORD))
    xor_len = len(encode_delta(h, y.tobytes(), layout_for("F32"), base, deltas.XOR))
    assert ord_len < 0.5 * xor_len and ord_len < 0.05 * y.nbytes


def test_planes_beat_plain_zstd_on_float_weights():
    w = _weights(0, 1 << 16)
    for arr, dtype in ((w, "F32"), (_bf16(w), "BF16")):
        body = arr.tobytes()
        h = header(TENSOR, len(body))
        plain = codec.encode([h, body])
        chosen = codec.encode_tensor(h, body, dtype)
        assert _enc(chosen) == codec.ENC_PLANES
        assert len(chosen) < 0.95 * len(plain)


def test_delta_chosen_when_a_checkpoint_moved_a_little():
    a = _weights(1, 1 << 15)
    b = a + _weights(2, 1 << 15, scale=1e-4)
    for x, y, dtype in ((a, b, "F32"), (_bf16(a), _bf16(b), "BF16")):
        h = header(TENSOR, y.nbytes)
        planes = codec.encode_tensor(h, y.tobytes(), dtype)
        delta = codec.encode_tensor(h, y.tobytes(), dtype, DeltaBase("cd" * 32, x.tobytes(), 0))
        assert _enc(delta) == codec.ENC_DELTA
        assert len(delta) < 0.8 * len(planes)


def test_incompressible_bytes_fall_back_to_the_smallest_record():
    body = np.random.default_rng(3).integers(0, 256, 1 << 14, dtype=np.uint8).tobytes()
    h = header(TENSOR, len(body))
    record = codec.encode_tensor(h, body, "F32")
    # Random bytes: every plane is stored raw, so the record is barely larger than the body.
    assert len(record) < len(body) + 64
    assert codec.decode("x", record) == h + body


@settings(max_examples=150, deadline=None)
@given(
    zeros=st.integers(0, 4000),
    rare=st.lists(st.integers(0, 255), max_size=300),
    seed=st.integers(0, 2**32 - 1),
)
def test_skewed_sections_round_trip_through_code_mode(zeros, rare, seed):
    data = np.zeros(zeros + len(rare), np.uint8)
    data[np.random.default_rng(seed).permutation(len(data))[: len(rare)]] = rare
    out = bytearray()
    frames.encode_section(out, data.tobytes())
    got, end = frames.decode_section("x", memoryview(bytes(out)), 0, len(data))
    assert bytes(got) == data.tobytes() and end == len(out)


def test_code_mode_beats_huffman_on_a_sparse_plane():
    rng = np.random.default_rng(7)
    data = np.where(rng.random(1 << 16) < 0.93, 0, rng.integers(1, 4, 1 << 16)).astype(np.uint8)
    out = bytearray()
    frames.encode_section(out, data.tobytes())
    assert out[0] == frames.CODES
    assert len(out) < 0.8 * len(frames.compressor().compress(data.tobytes()))


class _CountingCompressor:
    """Wraps the plane compressor, recording the size of every section it is asked to pack."""

    def __init__(self):
        self.inner = frames.plane_compressor()
        self.sizes = []

    def compress(self, data):
        self.sizes.append(len(data))
        return self.inner.compress(data)


def test_random_sections_are_stored_raw_without_a_zstd_trial(monkeypatch):
    counting = _CountingCompressor()
    monkeypatch.setattr(frames, "plane_compressor", lambda: counting)
    data = np.random.default_rng(9).integers(0, 256, 1 << 15, dtype=np.uint8).tobytes()
    out = bytearray()
    frames.encode_section(out, data)
    assert out[0] == frames.RAW and counting.sizes == []


def test_skewed_sections_go_to_code_mode_without_a_whole_section_trial(monkeypatch):
    counting = _CountingCompressor()
    monkeypatch.setattr(frames, "plane_compressor", lambda: counting)
    rng = np.random.default_rng(10)
    n = 1 << 15
    data = np.where(rng.random(n) < 0.85, 0, rng.integers(1, 4, n)).astype(np.uint8).tobytes()
    assert frames.CODES_FIRST[0] <= frames.kernels.survey(data)[1] <= frames.CODES_FIRST[1]
    out = bytearray()
    frames.encode_section(out, data)
    # Only the nested sections (packed codes, escapes) met zstd, never the whole plane.
    assert out[0] == frames.CODES and n not in counting.sizes and counting.sizes
    assert bytes(frames.decode_section("x", memoryview(bytes(out)), 0, n)[0]) == data


def test_damaged_code_sections_are_refused():
    rng = np.random.default_rng(8)
    data = np.where(rng.random(4096) < 0.93, 0, rng.integers(1, 4, 4096)).astype(np.uint8)
    data[rng.integers(0, 4096, 20)] = 200  # a few escapes
    out = bytearray()
    frames.encode_section(out, data.tobytes())
    assert out[0] == frames.CODES
    for bad, match in (((1, 5), "bad code table"), ((2, 9), "bad code table")):
        damaged = bytearray(out)
        damaged[bad[0]] = bad[1]
        with pytest.raises(CorruptObject, match=match):
            frames.decode_section("x", memoryview(bytes(damaged)), 0, len(data))
    for cut in range(0, len(out) - 1, 5):
        with pytest.raises(CorruptObject):
            frames.decode_section("x", memoryview(bytes(out[:cut])), 0, len(data))


def test_layouts():
    assert layout_for("BF16") == PlaneLayout(2, True)
    assert layout_for("F32") == PlaneLayout(4, True)
    assert layout_for("I32") == PlaneLayout(4, False)
    assert layout_for("U8") is None and layout_for(None) is None and layout_for("???") is None
    assert PlaneLayout.from_byte(PlaneLayout(4, True).to_byte()) == PlaneLayout(4, True)
    assert PlaneLayout.from_byte(3) is None and PlaneLayout.from_byte(0x24) is None


# --- the store: hints, ids, reads through the base ----------------------------------------


def _store(tmp_path: Path) -> LooseObjectStore:
    (tmp_path / "objects").mkdir()
    return LooseObjectStore(tmp_path / "objects")


def test_store_keeps_ids_as_the_hash_of_plain_bytes(tmp_path):
    store = _store(tmp_path)
    a = _weights(4).tobytes()
    b = (_weights(4) + _weights(5, scale=1e-5)).tobytes()
    ida = store.put(TENSOR, a, dtype="F32")
    idb = store.put(TENSOR, b, dtype="F32", delta_base=ida)
    assert ida == hash_object(TENSOR, a) and idb == hash_object(TENSOR, b)
    assert _enc(store._read_record(idb)) == codec.ENC_DELTA
    assert store.delta_base_of(idb) == ida and store.delta_base_of(ida) is None
    assert store.read(idb) == (TENSOR, b)
    # The same bytes without hints: same id, nothing rewritten.
    assert store.put_ex(TENSOR, b) == (idb, False)


def test_unusable_delta_base_is_ignored_not_an_error(tmp_path):
    store = _store(tmp_path)
    body = _weights(6).tobytes()
    other_len = store.put(TENSOR, _weights(7, 100).tobytes(), dtype="F32")
    blob = store.put("blob", b"x" * len(body))
    for base in ("ef" * 32, other_len, blob):  # missing, other length, not a tensor
        oid = store.put(TENSOR, body, dtype="F32", delta_base=base)
        assert _enc(store._read_record(oid)) != codec.ENC_DELTA
        store.remove(oid)


def write_checkpoint(folder: Path, step: int, dtype: str = "F32") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(100)
    a = (rng.standard_normal((16, 64)) * 0.02).astype(np.float32)
    b = np.zeros((64, 16), np.float32)
    drift = np.random.default_rng(step).standard_normal(a.shape).astype(np.float32)
    a = a + drift * 1e-4 * step
    b = b + np.random.default_rng(step + 1000).standard_normal(b.shape).astype(np.float32) * 1e-3 * step
    tensors = {"lora_A.weight": a, "lora_B.weight": b}
    if dtype == "BF16":
        # safetensors.numpy has no bf16: write the file by hand with the bf16 bit patterns.
        tensors = {k: _bf16(v) for k, v in tensors.items()}
        meta, blobs, off = {}, [], 0
        for k, v in tensors.items():
            meta[k] = {"dtype": "BF16", "shape": list(v.shape), "data_offsets": [off, off + v.nbytes]}
            blobs.append(v.tobytes())
            off += v.nbytes
        head = json.dumps(meta, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)
        (folder / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))
    else:
        save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 16}))
    return folder


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_commits_store_deltas_with_a_bounded_chain_and_check_out_identically(tmp_path, dtype):
    reg = Registry.init(tmp_path / "reg")
    commits = []
    for step in range(MAX_CHAIN + 4):
        folder = write_checkpoint(tmp_path / f"ck{step}", step, dtype)
        commits.append((reg.commit(folder, f"step {step}").id, folder))
    depths = []
    for cid, _ in commits:
        snap = reg.store.get_snapshot(reg.store.get_commit(cid).snapshot)
        tensor = next(t for t in snap.files[1].tensors if t.name == "lora_A.weight")
        depths.append(reg.store._read_verified(tensor.blob, MAX_CHAIN)[2])
    assert max(depths) == MAX_CHAIN  # chains grow to the bound...
    assert depths[0] == 0 and depths[MAX_CHAIN + 1] == 0  # ...then a whole record starts a new one
    for cid, folder in commits:
        out = tmp_path / "out" / cid[:8]
        reg.checkout(cid, out)
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            assert (out / name).read_bytes() == (folder / name).read_bytes()


# --- bad input ------------------------------------------------------------------------------


def _delta_store(tmp_path):
    store = _store(tmp_path)
    a = _weights(8).tobytes()
    b = (_weights(8) + _weights(9, scale=1e-5)).tobytes()
    ida = store.put(TENSOR, a, dtype="F32")
    idb = store.put(TENSOR, b, dtype="F32", delta_base=ida)
    assert store.delta_base_of(idb) == ida
    return store, ida, idb


def _reopen(store: LooseObjectStore) -> LooseObjectStore:
    """The store as another process sees it (this one caches verified delta bases)."""
    return LooseObjectStore(store.root)


def test_delta_whose_base_is_missing(tmp_path):
    store, ida, idb = _delta_store(tmp_path)
    store.remove(ida)
    with pytest.raises(CorruptObject, match=f"{idb}.*delta base {ida} is missing"):
        _reopen(store).read(idb)


def test_delta_whose_base_is_corrupt(tmp_path):
    store, ida, idb = _delta_store(tmp_path)
    path = tmp_path / "objects" / ida[:2] / ida[2:]
    path.write_bytes(codec.encode([header(TENSOR, 4), b"evil"]))
    with pytest.raises(CorruptObject, match=ida):
        _reopen(store).read(idb)


def test_delta_cycle_ends_at_the_chain_bound(tmp_path):
    store, ida, idb = _delta_store(tmp_path)
    # Make A's record a delta against B (B is a delta against A): a cycle of hand-made records.
    rec_b = store._read_record(idb)
    a = store.read(ida)[1]
    b = store.read(idb)[1]
    forged = codec.encode_tensor(header(TENSOR, len(a)), a, "F32", DeltaBase(idb, b, MAX_CHAIN - 1))
    assert _enc(forged) == codec.ENC_DELTA
    (tmp_path / "objects" / ida[:2] / ida[2:]).write_bytes(forged)
    assert rec_b == store._read_record(idb)
    with pytest.raises(CorruptObject, match="delta chain is deeper"):
        _reopen(store).read(idb)


def test_zstd_plane_that_expands_past_its_size_is_refused():
    n = 4096
    h = header(TENSOR, n)
    # A planes record whose first plane is a frame of 100 MB of zeros, no content size written.
    bomb = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * (100 << 20))
    payload = bytearray((len(h),)) + h + bytes((PlaneLayout(4, True).to_byte(), frames.ZSTD))
    frames.put_varint(payload, len(bomb))
    payload += bomb
    record = codec.RECORD_HEADER.pack(codec.MAGIC, codec.ENC_PLANES, len(h) + n) + bytes(payload)
    with pytest.raises(CorruptObject, match="does not decompress|inflated|declares"):
        codec.decode("bomb", record)
    # The same with the content size written: refused from the frame header alone.
    declared = zstandard.ZstdCompressor().compress(b"\0" * (1 << 20))
    payload = bytearray((len(h),)) + h + bytes((PlaneLayout(4, True).to_byte(), frames.ZSTD))
    frames.put_varint(payload, len(declared))
    payload += declared
    record = codec.RECORD_HEADER.pack(codec.MAGIC, codec.ENC_PLANES, len(h) + n) + bytes(payload)
    with pytest.raises(CorruptObject, match="declares 1048576 bytes where 1024 are expected"):
        codec.decode("bomb", record)


def test_every_truncation_of_planes_and_delta_records_is_refused():
    a = _weights(10, 512)
    b = a + _weights(11, 512, scale=1e-4)
    h = header(TENSOR, b.nbytes)
    planes = codec.encode_tensor(h, b.tobytes(), "F32")
    delta = codec.encode_tensor(h, b.tobytes(), "F32", DeltaBase("12" * 32, a.tobytes(), 0))
    assert (_enc(planes), _enc(delta)) == (codec.ENC_PLANES, codec.ENC_DELTA)
    for record in (planes, delta):
        for cut in range(0, len(record), 7):
            with pytest.raises(CorruptObject):
                codec.decode("t", record[:cut], lambda oid, d: a.tobytes())
        with pytest.raises(CorruptObject, match="stray bytes"):
            codec.decode("t", record + b"\0", lambda oid, d: a.tobytes())


def test_unknown_encoding_and_bad_layout_are_refused():
    body = _weights(12, 4096).tobytes()
    h = header(TENSOR, len(body))
    record = bytearray(codec.encode_tensor(h, body, "F32"))
    assert _enc(record) == codec.ENC_PLANES
    record[4] = 9
    with pytest.raises(UnsupportedFormat, match="storage encoding 9"):
        codec.decode("t", bytes(record))
    record[4] = codec.ENC_PLANES
    record[codec.RECORD_HEADER.size + 1 + len(h)] = 0x05  # width 5 is no layout
    with pytest.raises(CorruptObject, match="unknown plane layout"):
        codec.decode("t", bytes(record))


def test_delta_record_without_a_base_reader_is_refused():
    a = _weights(13, 256)
    b = a + 1e-6
    h = header(TENSOR, b.nbytes)
    delta = codec.encode_tensor(h, b.tobytes(), "F32", DeltaBase("34" * 32, a.tobytes(), 0))
    with pytest.raises(CorruptObject, match="needs its base"):
        codec.decode("t", delta)


def test_plain_zstd_records_stay_readable(tmp_path):
    store = _store(tmp_path)
    body = _weights(14).tobytes()
    oid = hash_object(TENSOR, body)
    store._write_record(oid, codec.encode([header(TENSOR, len(body)), body]))  # what version 1 wrote
    assert store.read(oid) == (TENSOR, body)
