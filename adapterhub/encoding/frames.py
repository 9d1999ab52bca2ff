"""A list of byte sections, each stored raw, as one constant byte, or as a zstd frame.

Each section (a byte plane, or a tensor's stray tail) is stored in whichever of the three
forms is smallest: near-random mantissa planes stay raw (zstd would only add its frame
and spend time), an all-zero plane (a LoRA `B` that has not moved, an XOR delta of an
unchanged tensor) costs two bytes, and the rest are zstd frames. The reader knows every
section's decoded length in advance, so each frame is inflated with that exact bound:
a frame that would expand past it is refused (decompression-bomb guard).

Section layout: `u8 mode` then, for mode 0 (raw) and 1 (zstd), a LEB128 length and that
many bytes; for mode 2 (fill), one byte repeated; for mode 3 (codes), a small code table
and two nested sections (packed codes, escaped bytes). See docs/format/encodings.md.
"""

from __future__ import annotations

import numpy as np
import zstandard

from ..errors import CorruptObject
from .zstd import ZSTD_LEVEL, compressor, decompressor, get_varint, put_varint, zstd_exact  # noqa: F401 (re-exported)

RAW = 0
ZSTD = 1
FILL = 2
CODES = 3
CODE_BITS = (2, 4)
# Planes are mostly literals, where zstd's level buys nothing: level 1 is as small
# (smaller on exponent planes, whose block splitting suits them) and twice as fast.
PLANE_LEVEL = 1

def _plain_section(section: bytes | memoryview) -> bytes:
    """The section as raw, fill or zstd, whichever is smallest."""
    n = len(section)
    if n > 2:
        arr = np.frombuffer(section, dtype=np.uint8)
        first = arr[0]
        if not (arr != first).any():
            return bytes((FILL, int(first)))
    packed = compressor(PLANE_LEVEL).compress(section) if n > 16 else None
    out = bytearray()
    if packed is not None and len(packed) < n:
        out.append(ZSTD)
        put_varint(out, len(packed))
        out += packed
    else:
        out.append(RAW)
        put_varint(out, n)
        out += section
    return bytes(out)


def _code_bits(counts: np.ndarray, n: int) -> int:
    """2-bit codes when the 3 most frequent values cover almost everything, else 4-bit."""
    top3 = np.sort(counts)[-3:].sum()
    return 2 if top3 >= 0.9 * n else 4


def _code_section(section: bytes | memoryview, bits: int | None = None) -> bytes:
    """Mode 3: each byte as a `bits`-bit code (2 or 4), 8/bits codes per byte, plus the
    bytes no code covers.

    For very skewed planes (a delta's top byte: nine in ten are 0): zstd codes literals
    with Huffman, which spends at least one bit per byte however likely the byte is;
    packing 2 or 4 codes per byte divides that floor. Codes 0..k-1 stand for the k most
    frequent values (the table, k < 2^bits), the all-ones code for "the next byte of the
    escape section".
    """
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
    out = bytearray((CODES, bits, len(table)))
    out += table.tobytes()
    out += _plain_section(packed.tobytes())
    out += _plain_section(escapes.tobytes())
    return bytes(out)


def encode_section(out: bytearray, section: bytes | memoryview) -> None:
    """Append one section in its smallest form."""
    best = _plain_section(section)
    n = len(section)
    # Only a plane that zstd already shrank to under 2 bits a byte can gain from codes.
    if n >= 64 and len(best) < n // 4:
        coded = _code_section(section)
        if len(coded) < len(best):
            best = coded
    out += best


def decode_section(oid: str, data: memoryview, pos: int, expect: int, *, nested: bool = False) -> tuple[bytes | memoryview, int]:
    """(section bytes of exactly `expect` length, next position)."""
    if pos >= len(data):
        raise CorruptObject(oid, "stored record is truncated (missing a section)")
    mode = data[pos]
    pos += 1
    if mode == FILL:
        if pos >= len(data):
            raise CorruptObject(oid, "stored record is truncated (in a fill section)")
        return bytes((data[pos],)) * expect, pos + 1
    if mode == CODES and not nested:
        return _decode_codes(oid, data, pos, expect)
    if mode not in (RAW, ZSTD):
        raise CorruptObject(oid, f"unknown section mode {mode}")
    length, pos = get_varint(oid, data, pos)
    end = pos + length
    if end > len(data):
        raise CorruptObject(oid, "stored record is truncated (a section runs past its end)")
    chunk = data[pos:end]
    if mode == RAW:
        if length != expect:
            raise CorruptObject(oid, f"raw section holds {length} bytes, {expect} expected")
        return chunk, end
    return zstd_exact(oid, chunk, expect), end


def _decode_codes(oid: str, data: memoryview, pos: int, expect: int) -> tuple[bytes, int]:
    if pos + 2 > len(data):
        raise CorruptObject(oid, "stored record is truncated (in a code section)")
    bits, k = data[pos], data[pos + 1]
    if bits not in CODE_BITS or k >= (1 << bits) or pos + 2 + k > len(data):
        raise CorruptObject(oid, "stored record has a bad code table")
    per = 8 // bits
    escape = (1 << bits) - 1
    table = np.zeros(1 << bits, dtype=np.uint8)
    table[:k] = np.frombuffer(data[pos + 2 : pos + 2 + k], dtype=np.uint8)
    packed, pos = decode_section(oid, data, pos + 2 + k, -(-expect // per), nested=True)
    packed = np.frombuffer(packed, dtype=np.uint8)
    # Unpack through a 256-entry table of each byte's codes: one gather, no shift loop.
    unpack = _UNPACK[bits]
    # Per byte value: its decoded bytes, and (one gather for both checks) how many escape
    # codes and how many invalid codes (k..escape-1 name no table entry) it holds.
    decoded = table[unpack]
    info = (unpack == escape).sum(axis=1).astype(np.int32)
    info += ((unpack >= k) & (unpack != escape)).sum(axis=1).astype(np.int32) << 8
    if expect % per and len(packed) and unpack[int(packed[-1]), expect % per :].any():
        raise CorruptObject(oid, "stored record has non-zero padding after its last code")
    # np.take: a gather with uint8 indices, ~1.5x faster than fancy indexing here.
    per_byte = np.take(info, packed)
    if (per_byte >> 8).any():
        raise CorruptObject(oid, "stored record has a code outside its code table")
    n_escapes = int((per_byte & 0xFF).sum())
    escapes, pos = decode_section(oid, data, pos, n_escapes, nested=True)
    out = np.take(decoded, packed, axis=0).reshape(-1)
    if n_escapes:
        # Expand codes only for the few bytes that hold an escape, in order.
        rows = np.flatnonzero(per_byte)
        r, c = np.nonzero(unpack[packed[rows]] == escape)
        out[rows[r] * per + c] = np.frombuffer(escapes, dtype=np.uint8, count=n_escapes)
    return out[:expect].tobytes(), pos


def _unpack_table(bits: int) -> np.ndarray:
    """(256, 8/bits) codes of every byte value, first code in the high bits."""
    per = 8 // bits
    values = np.arange(256, dtype=np.uint8)[:, None]
    shifts = np.array([bits * (per - 1 - j) for j in range(per)], dtype=np.uint8)[None, :]
    return (values >> shifts) & np.uint8((1 << bits) - 1)


_UNPACK = {bits: _unpack_table(bits) for bits in CODE_BITS}
