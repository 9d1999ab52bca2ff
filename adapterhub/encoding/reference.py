"""The codec's per-byte kernels in numpy: the reference for `_native.c`, and the fallback.

Each function has the signature and the exact output of its C twin in `_native.c` (tests
compare them byte for byte); `kernels` picks one set. They compose the concept modules'
numpy steps (`planes` split/rotate, `delta` diff/apply) and hold the code-section loops
of frames mode 3. None decides what is stored: that policy lives in `frames` and `tensor`.
"""

from __future__ import annotations

import math

import numpy as np

from . import delta as deltas
from .planes import PlaneLayout, as_words, join as join_planes, rotate as rotate_words, split as split_words, unrotate


def split(body, width: int, rotate: bool, base=None, kind: int = deltas.ORD) -> memoryview:
    """The planes of body's whole elements, concatenated (plane i is bytes [i*n, (i+1)*n)).

    With `base` (same length as body): the planes of the difference of `kind`.
    """
    layout = PlaneLayout(width, bool(rotate))
    words = as_words(body, layout)
    if base is None:
        words = rotate_words(words, layout)
    else:
        if len(base) != len(body):
            raise ValueError("a delta base must have the tensor's length")
        words = deltas.diff(kind, words, as_words(base, layout), layout)
    return split_words(words, layout)


def join(planes, width: int, rotate: bool, n: int, base=None, kind: int = deltas.ORD, head=b"", tail=b"") -> bytes:
    """head + the n words rebuilt from `width` planes of n bytes (undoing the difference
    against `base` when given) + tail."""
    layout = PlaneLayout(width, bool(rotate))
    if len(planes) != width or any(len(p) != n for p in planes):
        raise ValueError(f"{width} planes of {n} bytes expected")
    words = join_planes(planes, layout, n)
    if base is None:
        words = unrotate(words, layout)
    else:
        words = deltas.apply(kind, words, as_words(base, layout)[:n], layout)
    return bytes(head) + words.tobytes() + bytes(tail)


# Bytes the entropy estimate of `survey` reads at most (same constant in _native.c).
SURVEY_SAMPLE = 4096
# c * log2(c) for every count a sample can hold (it holds fewer than 2 * SURVEY_SAMPLE
# bytes), each computed as the C twin computes it (libm's log2 of the count, one multiply).
_CLOGC = np.array([c * math.log2(c) if c else 0.0 for c in range(2 * SURVEY_SAMPLE)])


def survey(section) -> tuple[int, float]:
    """(fill, entropy): the byte every byte is (-1 when they differ or there are none),
    and the order-0 entropy in bits per byte of every stride-th byte from the first,
    stride = max(1, n // SURVEY_SAMPLE): an estimate at a bounded cost. The c*log2(c)
    terms are summed in byte-value order (np.cumsum adds sequentially, unlike np.sum),
    as the C twin does, so both give the same float."""
    n = len(section)
    if not n:
        return -1, 0.0
    arr = np.frombuffer(section, dtype=np.uint8)
    first = int(arr[0])
    # Most sections differ at their ends already: the full comparison is for fills.
    fill = first if arr[-1] == first and not (arr != first).any() else -1
    sample = arr[:: max(1, n // SURVEY_SAMPLE)]
    m = len(sample)
    counts = np.bincount(sample, minlength=256)
    acc = float(np.cumsum(_CLOGC[counts[counts > 0]])[-1])
    return fill, (m * math.log2(m) - acc) / m


def _code_bits(counts: np.ndarray, n: int) -> int:
    """2-bit codes when the 3 most frequent values cover almost everything, else 4-bit."""
    top3 = np.sort(counts)[-3:].sum()
    return 2 if top3 >= 0.9 * n else 4


def pack_codes(section, bits: int = 0) -> tuple[int, bytes, bytes, bytes]:
    """(bits, table, packed, escapes) of frames mode 3 for `section`; bits=0 chooses."""
    arr = np.frombuffer(section, dtype=np.uint8)
    counts = np.bincount(arr, minlength=256)
    bits = bits or _code_bits(counts, len(arr))
    per = 8 // bits
    escape = (1 << bits) - 1
    table = np.argsort(-counts, kind="stable")[:escape]
    table = table[counts[table] > 0].astype(np.uint8)
    lut = np.full(256, escape, dtype=np.uint8)
    lut[table] = np.arange(len(table), dtype=np.uint8)
    codes = np.take(lut, arr)
    escapes = arr[codes == escape]
    pad = -len(codes) % per
    if pad:
        codes = np.append(codes, np.zeros(pad, dtype=np.uint8))
    grid = codes.reshape(-1, per)
    packed = np.zeros(len(grid), dtype=np.uint8)
    for j in range(per):
        packed |= grid[:, j] << np.uint8(bits * (per - 1 - j))
    return bits, table.tobytes(), packed.tobytes(), escapes.tobytes()


def _unpack_table(bits: int) -> np.ndarray:
    """(256, 8/bits) codes of every byte value, first code in the high bits."""
    per = 8 // bits
    values = np.arange(256, dtype=np.uint8)[:, None]
    shifts = np.array([bits * (per - 1 - j) for j in range(per)], dtype=np.uint8)[None, :]
    return (values >> shifts) & np.uint8((1 << bits) - 1)


_UNPACK = {bits: _unpack_table(bits) for bits in (2, 4)}


def count_escapes(packed, bits: int, k: int, expect: int) -> int:
    """Escape codes in the packed codes of an `expect`-byte section; -1 when the padding
    after the last code is not zero, -2 when a code is neither below k nor the escape."""
    per = 8 // bits
    escape = (1 << bits) - 1
    unpack = _UNPACK[bits]
    packed = np.frombuffer(packed, dtype=np.uint8)
    if expect % per and len(packed) and unpack[int(packed[-1]), expect % per :].any():
        return -1
    # Per byte value, one gather for both checks: escape codes and invalid codes in it.
    info = (unpack == escape).sum(axis=1).astype(np.int32)
    info += ((unpack >= k) & (unpack != escape)).sum(axis=1).astype(np.int32) << 8
    # np.take: a gather with uint8 indices, ~1.5x faster than fancy indexing here.
    per_byte = np.take(info, packed)
    if (per_byte >> 8).any():
        return -2
    return int((per_byte & 0xFF).sum())


def unpack_codes(packed, escapes, table, bits: int, expect: int) -> bytes:
    """The `expect` bytes of codes that count_escapes accepted."""
    per = 8 // bits
    escape = (1 << bits) - 1
    unpack = _UNPACK[bits]
    packed = np.frombuffer(packed, dtype=np.uint8)
    if len(packed) != -(-expect // per):
        raise ValueError("packed codes do not match the section size")
    full = np.zeros(1 << bits, dtype=np.uint8)
    full[: len(table)] = np.frombuffer(table, dtype=np.uint8)
    out = np.take(full[unpack], packed, axis=0).reshape(-1)
    esc_bytes = (unpack == escape).any(axis=1)
    rows = np.flatnonzero(np.take(esc_bytes, packed))
    if len(rows):
        # Expand codes only for the few bytes that hold an escape, in order.
        r, c = np.nonzero(unpack[packed[rows]] == escape)
        pos = rows[r] * per + c
        pos = pos[pos < expect]
        if len(pos) > len(escapes):
            raise ValueError("fewer escaped bytes than escape codes")
        out[pos] = np.frombuffer(escapes, dtype=np.uint8, count=len(pos))
    return out[:expect].tobytes()


def extrapolation_score(body, base, prev, width: int, rotate: bool, step: int) -> tuple[int, int]:
    """(plain, extrapolated): over elements 0, step, 2*step, ... the summed bit lengths of
    |x - b| and of |x - (2b - p)|, with x, b, p the value-order integers of body, base and
    prev (2- or 4-byte words only, where int64 holds every value exactly)."""
    if width not in (2, 4):
        raise ValueError(f"extrapolation is scored for 2- and 4-byte words, not {width}")
    if not (len(base) == len(prev) == len(body)):
        raise ValueError("body, base and prev must have the same length")
    if step < 1:
        raise ValueError("step must be at least 1")
    layout = PlaneLayout(width, bool(rotate))
    x, b, p = (deltas._ordered(as_words(t, layout)[::step], layout).astype(np.int64) for t in (body, base, prev))
    d1 = x - b
    d2 = d1 - (b - p)
    # frexp's exponent of an integer below 2**53 is its bit length (0 for 0).
    return tuple(int(np.frexp(np.abs(d).astype(np.float64))[1].sum()) for d in (d1, d2))


def hash_objects(obj_type: str, bodies, threads: int = 1) -> list[str]:
    """objects.hash_object of each body (`threads` is for the native twin, which hashes on
    its own threads without the GIL)."""
    from ..objects import hash_object

    return [hash_object(obj_type, body) for body in bodies]
