"""The C codec kernels (`adapterhub.encoding._native`) against their numpy twins.

The on-disk format must not depend on which set ran: every kernel is compared byte for
byte with `reference` on random and adversarial inputs (every width, odd lengths with
tails, empty, all-equal, all-escape), whole records are compared through `encode_tensor`
(byte for byte where the system's libzstd writes the zstandard wheel's frames), records
cross-decode, and damaged records raise the same CorruptObject either way.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from adapterhub import codec
from adapterhub.encoding import delta as deltas
from adapterhub.encoding import frames, kernels, predict, reference, tensor
from adapterhub.encoding.planes import PlaneLayout
from adapterhub.encoding.tensor import DeltaBase
from adapterhub.errors import CorruptObject
from adapterhub.objects import TENSOR, hash_object, header

native = kernels.native
pytestmark = pytest.mark.skipif(native is None, reason="the C extension is not built")

WIDTHS = (2, 4, 8)
KINDS = (None,) + deltas.KINDS
# Words where sign, carry and wrap-around bugs show: zero, both signed zeros, the sign bit
# alone, all ones, the largest positive, and their neighbours.
SPECIAL = [0x00, 0x01, 0x7F, 0x80, 0x81, 0xFE, 0xFF]


@contextmanager
def using(name: str):
    """Run a block under a named kernel set ("native" or "numpy"), restoring the default."""
    before = kernels.use(name)
    try:
        yield
    finally:
        kernels.use(before)


def _special_bytes(draw_list: list[int]) -> bytes:
    """Bytes whose words are built only from the SPECIAL byte values (sign-edge words)."""
    return bytes(SPECIAL[i % len(SPECIAL)] for i in draw_list)


def _same_split(body, width, rotate, base=None, kind=deltas.ORD):
    got = native.split(body, width, rotate, base, kind)
    want = reference.split(body, width, rotate, base, kind)
    assert bytes(got) == bytes(want)
    return got


def _check_join(body, planes, width, rotate, base=None, kind=deltas.ORD):
    n = len(body) // width
    split_planes = [memoryview(planes)[i * n : (i + 1) * n] for i in range(width)]
    tail = body[n * width :]
    got = native.join(split_planes, width, rotate, n, base, kind, b"head", tail)
    want = reference.join(split_planes, width, rotate, n, base, kind, b"head", tail)
    assert got == want == b"head" + body


# --- planes and deltas ----------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    body=st.binary(max_size=300),
    width=st.sampled_from(WIDTHS),
    rotate=st.booleans(),
    kind=st.sampled_from(KINDS),
    base_seed=st.integers(0, 2**32 - 1),
)
def test_split_and_join_match_numpy_on_any_bytes(body, width, rotate, kind, base_seed):
    base = None
    if kind is not None:
        base = np.random.default_rng(base_seed).integers(0, 256, len(body), dtype=np.uint8).tobytes()
    planes = _same_split(body, width, rotate, base, deltas.ORD if kind is None else kind)
    _check_join(body, planes, width, rotate, base, deltas.ORD if kind is None else kind)


@settings(max_examples=300, deadline=None)
@given(
    picks=st.lists(st.integers(0, 1000), max_size=200),
    base_picks=st.lists(st.integers(0, 1000), min_size=200, max_size=200),
    width=st.sampled_from(WIDTHS),
    rotate=st.booleans(),
    kind=st.sampled_from(deltas.KINDS),
)
def test_deltas_match_numpy_on_sign_and_carry_edge_words(picks, base_picks, width, rotate, kind):
    body = _special_bytes(picks)
    base = _special_bytes(base_picks[: len(body)])
    planes = _same_split(body, width, rotate, base, kind)
    _check_join(body, planes, width, rotate, base, kind)


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("n_bytes", [0, 1, 7, 8, 9, 4096 * 8 + 3, 100_003])
def test_split_join_sizes_with_tails_and_float_data(width, n_bytes):
    rng = np.random.default_rng(n_bytes + width)
    body = rng.integers(0, 256, n_bytes, dtype=np.uint8).tobytes()
    moved = bytearray(body)
    for i in rng.integers(0, max(n_bytes, 1), n_bytes // 50):
        moved[i] ^= 1
    for rotate in (True, False):
        planes = _same_split(body, width, rotate)
        _check_join(body, planes, width, rotate)
        for kind in deltas.KINDS:
            planes = _same_split(bytes(moved), width, rotate, body, kind)
            _check_join(bytes(moved), planes, width, rotate, body, kind)


def test_ord_delta_of_one_ulp_steps_is_tiny_in_both():
    x = np.array([0.5, -1e-8, 1e-8, 0.9999999, -3.0, 0.0, -0.0] * 300, np.float32)
    y = np.nextafter(x, np.float32(np.inf))
    planes = _same_split(y.tobytes(), 4, True, x.tobytes(), deltas.ORD)
    # One unit in the last place zigzags to 2 (or 1 across the signed zeros): top planes zero.
    assert not any(bytes(planes)[len(x) :])


def test_split_and_join_refuse_bad_arguments():
    with pytest.raises(ValueError):
        native.split(b"abcd", 3, True)
    with pytest.raises(ValueError):
        native.split(b"abcd", 4, True, b"abc", deltas.ORD)
    with pytest.raises(ValueError):
        native.split(b"abcd", 4, True, b"abcd", 7)
    with pytest.raises(ValueError):
        native.join([b"a", b"b"], 4, True, 1)
    with pytest.raises(ValueError):
        native.join([b"a", b"b", b"c", b"dd"], 4, True, 1)
    with pytest.raises(ValueError):
        native.join([b"a", b"b", b"c", b"d"], 4, True, 1, b"abc", deltas.ORD)


# --- survey and code sections ---------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(data=st.one_of(st.binary(max_size=2000), st.builds(lambda v, n: bytes([v]) * n, st.integers(0, 255), st.integers(0, 5000))))
def test_survey_matches_numpy_exactly(data):
    assert native.survey(data) == reference.survey(data)


def test_survey_values():
    assert native.survey(b"") == (-1, 0.0)
    assert native.survey(b"\x07" * 100) == (7, 0.0)
    fill, entropy = native.survey(bytes(range(256)) * 4)
    assert fill == -1 and entropy == pytest.approx(8.0)
    # Long sections: a sample of every stride-th byte (here every 10th, all zeros).
    assert native.survey((bytes(9) + b"\1") * 4096) == (-1, 0.0)
    assert native.survey(b"\0\1" * 100)[1] == pytest.approx(1.0)


def _skewed(draw_n: int, rare: list[int], seed: int) -> bytes:
    data = np.zeros(draw_n + len(rare), np.uint8)
    data[np.random.default_rng(seed).permutation(len(data))[: len(rare)]] = rare
    return data.tobytes()


SECTIONS = st.one_of(
    st.binary(max_size=1500),
    st.builds(_skewed, st.integers(0, 3000), st.lists(st.integers(0, 255), max_size=300), st.integers(0, 2**32 - 1)),
    # All escapes: every byte value equally often, more values than any table holds.
    st.builds(lambda n: bytes(range(256)) * n, st.integers(0, 8)),
    st.builds(lambda v, n: bytes([v]) * n, st.integers(0, 255), st.integers(0, 999)),
)


@contextmanager
def _popcnt(on: bool | None):
    """count_escapes' POPCNT build (picked at import where the CPU has it), its portable
    one, or (None) whichever the extension has."""
    if on is None:
        yield
        return
    was = native._use_popcnt(on)
    try:
        yield
    finally:
        native._use_popcnt(was)


def _popcnt_modes() -> list[bool | None]:
    """Both builds of count_escapes' word loop where there are two and the CPU runs both."""
    if native is None or native._use_popcnt() is None:
        return [None]
    try:
        with _popcnt(True):
            return [False, True]
    except ValueError:  # no POPCNT on this CPU
        return [False]


POPCNT_MODES = _popcnt_modes()


@settings(max_examples=300, deadline=None)
@given(section=SECTIONS, bits=st.sampled_from([0, 2, 4]))
def test_code_packing_matches_numpy(section, bits):
    got = native.pack_codes(section, bits)
    want = reference.pack_codes(section, bits)
    assert got == want
    bits, table, packed, escapes = got
    for mode in POPCNT_MODES:
        with _popcnt(mode):
            n_esc = native.count_escapes(packed, bits, len(table), len(section))
        assert n_esc == reference.count_escapes(packed, bits, len(table), len(section)) == len(escapes)
    out = native.unpack_codes(packed, escapes, table, bits, len(section))
    assert out == reference.unpack_codes(packed, escapes, table, bits, len(section)) == bytes(section)


@settings(max_examples=500, deadline=None)
@given(
    bits=st.sampled_from([2, 4]),
    k=st.integers(0, 15),
    expect=st.integers(0, 600),
    seed=st.integers(0, 2**32 - 1),
    zero_pad=st.booleans(),
)
def test_code_validation_matches_numpy_on_random_packed_bytes(bits, k, expect, seed, zero_pad):
    k = k % (1 << bits)
    per = 8 // bits
    rng = np.random.default_rng(seed)
    packed = bytearray(rng.integers(0, 256, -(-expect // per), dtype=np.uint8).tobytes())
    if zero_pad and expect % per:
        packed[-1] &= (0xFF << (bits * (per - expect % per))) & 0xFF
    for mode in POPCNT_MODES:
        with _popcnt(mode):
            n_esc = native.count_escapes(bytes(packed), bits, k, expect)
        assert n_esc == reference.count_escapes(bytes(packed), bits, k, expect)
    if n_esc >= 0:
        table = rng.integers(0, 256, k, dtype=np.uint8).tobytes()
        escapes = rng.integers(0, 256, n_esc, dtype=np.uint8).tobytes()
        got = native.unpack_codes(bytes(packed), escapes, table, bits, expect)
        assert got == reference.unpack_codes(bytes(packed), escapes, table, bits, expect)
        assert len(got) == expect


def test_unpack_refuses_short_escapes_and_wrong_sizes():
    bits, table, packed, escapes = native.pack_codes(bytes(range(256)) * 2, 2)
    for impl in (native, reference):
        with pytest.raises(ValueError):
            impl.unpack_codes(packed, escapes[:-1], table, bits, 512)
        with pytest.raises(ValueError):
            impl.unpack_codes(packed + b"\0", escapes, table, bits, 512)
    with pytest.raises(ValueError):
        native.count_escapes(packed, 3, 1, 512)
    with pytest.raises(ValueError):
        native.count_escapes(packed, 2, 1, -1)


@settings(max_examples=500, deadline=None)
@given(
    bits=st.sampled_from([2, 4, 3, 0]),
    k=st.integers(0, 17),
    body=st.binary(max_size=200),
    expect=st.integers(0, 300),
)
def test_garbage_code_sections_fail_alike(bits, k, body, expect):
    """Hostile mode-3 sections: the same CorruptObject (or the same bytes) either way."""
    data = bytes((frames.CODES, bits, k)) + body
    got = _error_of("native", data, expect)
    assert got == _error_of("numpy", data, expect)
    # Either a CorruptObject naming the record, or exactly `expect` decoded bytes.
    assert got.startswith("corrupt object x: ") or (got.startswith("ok ") and len(bytes.fromhex(got.split()[1])) == expect)


@settings(max_examples=500, deadline=None)
@given(
    bits=st.sampled_from([2, 4]),
    k=st.integers(0, 15),
    expect=st.integers(0, 400),
    seed=st.integers(0, 2**32 - 1),
    n_escapes=st.integers(0, 60),
    escape_fill=st.booleans(),
    low_codes=st.booleans(),
    exact_escapes=st.booleans(),
)
def test_well_framed_hostile_code_sections_fail_alike(bits, k, expect, seed, n_escapes, escape_fill, low_codes, exact_escapes):
    """Code sections framed right but with random codes, table sizes and escape counts:
    padding, codes outside the table and escape sections of the wrong size all fail the
    same way under both kernel sets (and valid ones decode to the same bytes)."""
    k = k % (1 << bits)
    per = 8 // bits
    rng = np.random.default_rng(seed)
    packed = rng.integers(0, 256, -(-expect // per), dtype=np.uint8)
    if low_codes:  # codes 0 and 1 only (often valid), escapes kept where all bits are set
        packed = np.where(packed > 250, 0xFF, packed & (0x55 if bits == 2 else 0x11)).astype(np.uint8)
    packed = packed.tobytes()
    if exact_escapes and (count := reference.count_escapes(packed, bits, k, expect)) >= 0:
        n_escapes = count
    data = bytearray((frames.CODES, bits, k)) + rng.integers(0, 256, k, dtype=np.uint8).tobytes()
    data.append(frames.RAW)
    frames.put_varint(data, len(packed))
    data += packed
    if escape_fill:
        data += bytes((frames.FILL, 0x5A))
    else:
        data.append(frames.RAW)
        frames.put_varint(data, n_escapes)
        data += rng.integers(0, 256, n_escapes, dtype=np.uint8).tobytes()
    got = _error_of("native", bytes(data), expect)
    assert got == _error_of("numpy", bytes(data), expect)


@settings(max_examples=300, deadline=None)
@given(section=SECTIONS)
def test_sections_are_identical_under_both_kernel_sets(section):
    """frames' choices (fill, raw, zstd, codes) read the kernels' surveys: same bytes."""
    written = {}
    for name in ("native", "numpy"):
        with using(name):
            out = bytearray()
            frames.encode_section(out, section)
            written[name] = bytes(out)
    assert written["native"] == written["numpy"]
    for name in ("native", "numpy"):
        with using(name):
            got, end = frames.decode_section("x", memoryview(written["native"]), 0, len(section))
            assert bytes(got) == bytes(section) and end == len(written["native"])


def _coded_section(data: bytes) -> bytearray:
    out = bytearray()
    frames.encode_section(out, data)
    assert out[0] == frames.CODES
    return out


def _error_of(name: str, data: bytes, expect: int) -> str:
    with using(name):
        try:
            got, end = frames.decode_section("x", memoryview(data), 0, expect)
        except CorruptObject as exc:
            return str(exc)
    return f"ok {bytes(got).hex()} {end}"


def test_damaged_code_sections_fail_alike():
    rng = np.random.default_rng(8)
    plane = np.where(rng.random(4099) < 0.93, 0, rng.integers(1, 4, 4099)).astype(np.uint8)
    plane[rng.integers(0, 4099, 20)] = 200  # a few escapes
    good = _coded_section(plane.tobytes())
    bits, k = good[1], good[2]
    # The packed codes are a nested raw or zstd section: store them raw so bytes can be hit.
    _, table, packed, escapes = reference.pack_codes(plane.tobytes(), bits)
    layout = bytearray((frames.CODES, bits, k)) + table
    raw = bytearray((frames.RAW,))
    frames.put_varint(raw, len(packed))
    damaged_cases = []
    for pos, value in [(0, 0xFF), (len(packed) - 1, 0xFF), (len(packed) - 1, 0x01), (len(packed) // 2, 0xAA)]:
        p = bytearray(packed)
        p[pos] = value
        section = layout + raw + p + frames._plain_section(escapes)
        damaged_cases.append(bytes(section))
    for table_k in range(1, 4):  # a smaller table: codes k.. become invalid
        section = bytearray((frames.CODES, bits, table_k)) + table[:table_k] + raw + packed + frames._plain_section(escapes)
        damaged_cases.append(bytes(section))
    for cut in range(0, len(good), 9):
        damaged_cases.append(bytes(good[:cut]))
    for flip in range(0, len(good), 13):
        d = bytearray(good)
        d[flip] ^= 0x5A
        damaged_cases.append(bytes(d))
    messages = set()
    for data in damaged_cases:
        got = _error_of("native", data, len(plane))
        assert got == _error_of("numpy", data, len(plane))
        messages.add(got)
    assert any("padding" in m for m in messages) and any("outside its code table" in m for m in messages)


# --- whole records ---------------------------------------------------------------------------


def _record(name, h, body, dtype, base):
    with using(name):
        return codec.encode_tensor(h, body, dtype, base)


@functools.cache
def _zstd_builds_agree() -> bool:
    """Whether the system's libzstd (the whole-record C calls) writes the very frames the
    zstandard wheel's own zstd (the per-section path) writes for plane sections. Records
    are compared byte for byte only then: zstd's output may differ between its versions
    (1.5.4 and 1.5.7 agree here), while the format, and what either build reads, do not."""
    rng = np.random.default_rng(11)
    probes = [rng.integers(0, 40, 5000).astype(np.uint8).tobytes(), (rng.standard_normal(3000) * 0.01).astype(np.float32).tobytes()]
    for probe in probes:
        whole = native.encode_sections(probe, 2, False)
        saved, kernels.encode_sections = kernels.encode_sections, None
        try:
            per_section = bytearray()
            tensor._planes_body(per_section, probe, PlaneLayout(2, False))
        finally:
            kernels.encode_sections = saved
        if bytes(per_section[1:]) != whole:
            return False
    return True


def _assert_same_record(got: bytes, want: bytes) -> None:
    """Byte for byte where the zstd builds agree; else the same encoding and a size within
    1% (the callers check that both read back)."""
    if _zstd_builds_agree():
        assert got == want
    else:
        assert got[:13] == want[:13] and abs(len(got) - len(want)) <= max(16, len(want) // 100)


@settings(max_examples=200, deadline=None)
@given(
    body=st.binary(max_size=3000),
    dtype=st.sampled_from(["F32", "BF16", "F16", "F64", "I32", "I64", "U16", "U8", None]),
    with_base=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_records_are_identical_and_cross_decode(body, dtype, with_base, seed):
    h = header(TENSOR, len(body))
    base = None
    if with_base and body:
        moved = bytearray(body)
        rng = np.random.default_rng(seed)
        for i in rng.integers(0, len(body), 1 + len(body) // 20):
            moved[i] = (moved[i] + int(rng.integers(1, 4))) & 0xFF
        base = DeltaBase("ab" * 32, bytes(moved), 0)
    rec_native = _record("native", h, body, dtype, base)
    _assert_same_record(rec_native, _record("numpy", h, body, dtype, base))
    for name in ("native", "numpy"):
        with using(name):
            assert codec.decode("x", rec_native, lambda oid, depth: base.body) == h + body


def _float_checkpoints(n: int, dtype: str):
    rng = np.random.default_rng(5)
    a = (rng.standard_normal(n) * 0.02).astype(np.float32)
    b = a + (rng.standard_normal(n) * 1e-4).astype(np.float32)
    if dtype == "BF16":
        a, b = ((x.view(np.uint32) >> 16).astype(np.uint16) for x in (a, b))
    return a.tobytes(), b.tobytes()


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_float_tensor_records_are_identical(dtype):
    a, b = _float_checkpoints(50_001, dtype)
    h = header(TENSOR, len(b))
    for base in (None, DeltaBase("cd" * 32, a, 0)):
        rec = _record("native", h, b, dtype, base)
        _assert_same_record(rec, _record("numpy", h, b, dtype, base))
        for name in ("native", "numpy"):
            with using(name):
                assert codec.decode("x", rec, lambda oid, depth: a) == h + b


def test_threads_encode_and_decode_alike():
    """The loops run without the GIL: many threads at once must still agree."""
    a, b = _float_checkpoints(40_000, "F32")
    h = header(TENSOR, len(b))
    base = DeltaBase("cd" * 32, a, 0)
    want = codec.encode_tensor(h, b, "F32", base)
    with ThreadPoolExecutor(4) as pool:
        records = list(pool.map(lambda _: codec.encode_tensor(h, b, "F32", base), range(16)))
        bodies = list(pool.map(lambda r: codec.decode("x", r, lambda oid, d: a), records))
    assert all(r == want for r in records) and all(x == h + b for x in bodies)


def _outcome(name: str, record: bytes, base_body: bytes, want: bytes) -> str:
    """What reading a record under a kernel set ends in: "ok", our error message, or
    "refused: damaged zstd data". A zstd frame has no checksum here: a damaged one may
    inflate to other bytes (the store's re-hash refuses them) or fail inside zstd, and
    which of the two, and zstd's wording, differ between zstd builds (the system's
    libzstd for the C path, the zstandard wheel's own copy for the Python path)."""
    with using(name):
        try:
            got = codec.decode("x", record, lambda oid, depth: base_body)
        except CorruptObject as exc:
            message = str(exc)
        else:
            return "ok" if got == want else "refused: damaged zstd data"
    if "bad zstd frame" in message or "zstd frame does not decompress" in message:
        return "refused: damaged zstd data"
    return message


def _class(outcome: str) -> str:
    """Outcomes of a damaged record that only zstd decides: whether a damaged frame still
    inflates to the right bytes, to other bytes, or fails differs between zstd builds
    (flipped bits inside a frame of a codes section: 1.5.4 read one that 1.5.7 refused).
    Every message of our own framing stays distinct."""
    return "read, or refused by zstd" if outcome in ("ok", "refused: damaged zstd data") else outcome


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_damaged_records_fail_alike(dtype):
    """decode_sections (a whole record in one C call) reports every damage as frames.py
    does: cut at many lengths, or one byte flipped anywhere after the record header."""
    a, b = _float_checkpoints(3_001, dtype)
    b += b"\x01\x02\x03"  # a tail section too
    a += b"\x01\x02\x07"
    h = header(TENSOR, len(b))
    cases = []
    for base in (None, DeltaBase("cd" * 32, a, 0)):
        record = _record("native", h, b, dtype, base)
        assert _outcome("native", record, a, h + b) == _outcome("numpy", record, a, h + b) == "ok"
        start = codec.RECORD_HEADER.size
        cases += [record[:cut] for cut in range(start, len(record), max(1, len(record) // 150))]
        for flip in range(start, len(record), 5):
            damaged = bytearray(record)
            damaged[flip] ^= 0x5A
            cases.append(bytes(damaged))
    outcomes = [_outcome("native", c, a, h + b) for c in cases]
    assert [_class(o) for o in outcomes] == [_class(_outcome("numpy", c, a, h + b)) for c in cases]
    errors = set(outcomes) - {"ok"}
    assert len(errors) >= 5 and any("truncated" in e for e in errors)


def test_whole_record_calls_fall_back_without_libzstd(monkeypatch):
    """Without libzstd.so.1 the native set keeps its kernels and composes sections in
    Python (frames.py): the same records, read back alike."""
    a, b = _float_checkpoints(20_000, "F32")
    h = header(TENSOR, len(b))
    base = DeltaBase("cd" * 32, a, 0)
    with using("native"):
        assert kernels.encode_sections is not None
        whole = codec.encode_tensor(h, b, "F32", base)
    before = kernels.active
    monkeypatch.setattr(native, "has_zstd", lambda: False)
    try:
        with using("native"):
            assert kernels.encode_sections is None and kernels.decode_sections is None
            assert kernels.encode_records is None and kernels.read_tensors is None and kernels.read_plan is None
            _assert_same_record(codec.encode_tensor(h, b, "F32", base), whole)
            assert codec.decode("x", whole, lambda oid, depth: a) == h + b
    finally:
        # `using` bound its set back while libzstd still looked missing: bind it again
        # with libzstd back, or every later test in this process runs without the
        # whole-record calls.
        monkeypatch.undo()
        kernels.use(before)
    assert kernels.read_tensors is not None


@settings(max_examples=200, deadline=None)
@given(
    picks=st.lists(st.integers(0, 255), min_size=0, max_size=120),
    width=st.sampled_from(WIDTHS),
    rotate=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_fused_extrapolation_matches_the_materialized_prediction(picks, width, rotate, seed):
    """encode_sections/decode_sections with `prev` diff against 2*base - prev computed
    inside their pass: the same bytes as against predict.Extrapolation.materialize(), on
    sign, carry and wrap-around edge words, with a tail."""
    rng = np.random.default_rng(seed)
    n = len(picks)
    body = _special_bytes(picks)
    base = _special_bytes(list(rng.integers(0, 255, n)))
    prev = _special_bytes(list(rng.integers(0, 255, n)))
    layout = PlaneLayout(width, rotate)
    predicted = predict.Extrapolation(base, prev, layout).materialize()
    fused = native.encode_sections(body, width, rotate, base, deltas.ORD, prev)
    assert fused == native.encode_sections(body, width, rotate, predicted, deltas.ORD)
    assert native.decode_sections(fused, 0, n, width, rotate, b"h", base, deltas.ORD, prev) == b"h" + body
    assert native.decode_sections(fused, 0, n, width, rotate, b"h", predicted, deltas.ORD) == b"h" + body


def test_prev_is_refused_without_an_ord_base():
    with pytest.raises(ValueError, match="needs a base"):
        native.encode_sections(b"\x00" * 8, 4, True, None, deltas.ORD, b"\x00" * 8)
    with pytest.raises(ValueError, match="needs a base"):
        native.encode_sections(b"\x00" * 8, 4, True, b"\x00" * 8, deltas.XOR, b"\x00" * 8)
    with pytest.raises(ValueError, match="length"):
        native.decode_sections(b"", 0, 8, 4, True, b"", b"\x00" * 8, deltas.ORD, b"\x00" * 4)


def test_decode_sections_refuses_bad_arguments():
    with pytest.raises(ValueError):
        native.decode_sections(b"\x00\x00", 3, 0, 4, True)  # position past the payload
    with pytest.raises(ValueError):
        native.decode_sections(b"\x00\x00", 0, 8, 3, True)  # no such plane width
    with pytest.raises(ValueError):
        native.decode_sections(b"\x00\x00", 0, 8, 4, True, b"", b"short")  # base of another length
    with pytest.raises(ValueError):
        native.encode_sections(b"\x00" * 8, 4, True, b"short")


def _run_python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_threads_that_end_leave_no_codec_memory_behind():
    """Each thread's zstd contexts and scratch buffers are freed when it ends: 60 short
    threads each encoding and decoding a 4 MB tensor once kept ~10 MiB apiece (600 MiB)."""
    code = """
import threading, numpy as np
from adapterhub.encoding import _native as N
def rss():
    return next(int(l.split()[1]) // 1024 for l in open("/proc/self/status") if l.startswith("VmRSS"))
body = (np.random.default_rng(0).standard_normal(1_000_000).astype(np.float32) * 0.01).tobytes()
def work():
    N.decode_sections(N.encode_sections(body, 4, True), 0, len(body), 4, True)
work()
start = rss()
for _ in range(60):
    t = threading.Thread(target=work); t.start(); t.join()
print(rss() - start)
"""
    assert int(_run_python(code)) < 100


def test_running_out_of_memory_is_not_reported_as_damage():
    """A valid record read where memory is short raises MemoryError, never CorruptObject
    (which would make ah call a healthy object corrupt)."""
    code = """
import resource
from adapterhub import codec
from adapterhub.objects import TENSOR, hash_object, header
body = bytes(256 << 20)
h = header(TENSOR, len(body))
record = codec.encode_tensor(h, body, "F32")
del body
vm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize"))
resource.setrlimit(resource.RLIMIT_AS, (vm + (400 << 20), resource.RLIM_INFINITY))
try:
    codec.decode("x", record)
    print("decoded")
except MemoryError:
    print("MemoryError")
"""
    assert _run_python(code).split() == ["MemoryError"]


def test_no_native_environment_selects_numpy():
    code = "from adapterhub.encoding import kernels; print(kernels.active, kernels.native is not None)"
    env = dict(os.environ, AH_NO_NATIVE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["numpy", "True"]
    env.pop("AH_NO_NATIVE")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["native", "True"]


@pytest.mark.parametrize("threads", [1, 2, 5])
def test_vendored_blake3_ids_are_the_blake3_packages(threads):
    """Object ids from the C hasher (third_party/blake3, its SIMD paths chosen at run
    time) equal objects.hash_object's (the Python blake3 package) across BLAKE3's block
    (64 B) and chunk (1 KiB) edges, multi-chunk trees, views and every object type."""
    rng = np.random.default_rng(threads)
    sizes = [0, 1, 63, 64, 65, 1023, 1024, 1025, 2047, 2048, 4097, 16 * 1024 + 1, 65536, 300_001, 3 << 20]
    bodies = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in sizes]
    bodies.append(memoryview(bodies[-1])[5:70_000])
    for obj_type in ("tensor", "blob", "commit"):
        assert native.hash_objects(obj_type, bodies, threads) == [hash_object(obj_type, b) for b in bodies]
    assert reference.hash_objects("tensor", bodies[:3]) == native.hash_objects("tensor", bodies[:3], 1)


def test_hash_objects_refuses_bad_arguments():
    with pytest.raises(TypeError):
        native.hash_objects("tensor", [b"ok", 5], 2)
    with pytest.raises(TypeError):
        native.hash_objects("tensor", 5, 2)
    with pytest.raises(ValueError, match="short"):
        native.hash_objects("x" * 40, [b"ok"], 1)
    assert native.hash_objects("tensor", [], 2) == []


@settings(max_examples=400, deadline=None)
@given(
    bits=st.sampled_from([2, 4]),
    k=st.integers(0, 15),
    expect=st.integers(0, 300),
    seed=st.integers(0, 2**32 - 1),
    plant=st.one_of(st.none(), st.integers(0, 10**6)),
)
def test_code_validation_of_valid_codes_with_one_planted_bad_code(bits, k, expect, seed, plant):
    """count_escapes reads 2-bit codes 32 at a time: valid codes (below k, or the escape)
    with at most one invalid code planted anywhere, word edges and tail included."""
    k = k % (1 << bits)
    per, escape = 8 // bits, (1 << bits) - 1
    rng = np.random.default_rng(seed)
    valid = list(range(k)) + [escape]
    codes = [valid[i] for i in rng.integers(0, len(valid), expect)]
    invalid = [c for c in range(escape) if c >= k]
    if plant is not None and expect and invalid:
        codes[plant % expect] = invalid[plant % len(invalid)]
    packed = bytearray(-(-expect // per))
    for i, code in enumerate(codes):
        packed[i // per] |= code << (bits * (per - 1 - i % per))
    want = reference.count_escapes(bytes(packed), bits, k, expect)
    assert native.count_escapes(bytes(packed), bits, k, expect) == want
    padded = codes + [0] * (-expect % per)  # padding codes are zero, and checked too
    assert want == (-2 if any(c >= k and c != escape for c in padded) else codes.count(escape))
