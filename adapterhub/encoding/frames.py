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

from ..errors import CorruptObject
from . import kernels
from .zstd import ZSTD_LEVEL, compressor, decompressor, get_varint, plane_compressor, put_varint, zstd_exact  # noqa: F401 (re-exported)

RAW = 0
ZSTD = 1
FILL = 2
CODES = 3
CODE_BITS = (2, 4)
# A section whose bytes carry at least this many bits of order-0 entropy each is stored
# raw without asking zstd. Planes have no repeats for LZ to find, so zstd can only code
# them with Huffman, which cannot beat the order-0 entropy and adds its tables and frame:
# on real fp32/bf16 checkpoints zstd never won above 7.76 bits a byte (it lost on every
# section from 7.73 up), and the mantissa planes it skips here (~8.0 bits, half of all
# sections) were most of its calls.
RAW_ENTROPY_BITS = 7.8
# Sections whose bytes carry between these many bits of order-0 entropy each go straight
# to mode 3 without a zstd trial of the whole section: on real fp32/bf16 checkpoint
# deltas mode 3 was 5-30% smaller than zstd (plane_compressor) on every section from 0.45
# to 2.0 bits, so the trial was wasted work. From 0.2 to 0.45 bits (mostly zeros: the top
# plane of many extrapolated deltas) zstd's matches on runs won 7% of the trials, by 572
# bytes in all over 7 fp32 checkpoints (35 MB stored), and the trials cost ~10% of the
# encoder's CPU: mode 3 goes first there too. Below 0.2 and above 2.0 both are tried.
CODES_FIRST = (0.2, 2.0)
# Above CODES_FIRST mode 3 is tried only when zstd left fewer than this many bits a byte
# (its packed codes alone take 2 or 4).
CODES_TRIAL_BITS = 2.4


def _plain(section: bytes | memoryview, fill: int, entropy: float) -> tuple[int, int | bytes | memoryview]:
    """(mode, payload) of the smallest plain form of a section whose kernels.survey is
    (fill, entropy): FILL and the byte, ZSTD and the frame, or RAW and the section."""
    n = len(section)
    if n > 2 and fill >= 0:
        return FILL, fill
    if n > 16 and entropy < RAW_ENTROPY_BITS:
        frame = plane_compressor().compress(section)
        if len(frame) < n:
            return ZSTD, frame
    return RAW, section


def _plain_size(mode: int, payload) -> int:
    if mode == FILL:
        return 2
    size = len(payload)
    return 1 + ((size.bit_length() + 6) // 7 or 1) + size


def _put_plain(out: bytearray, mode: int, payload) -> None:
    out.append(mode)
    if mode == FILL:
        out.append(payload)
        return
    put_varint(out, len(payload))
    out += payload


def _plain_section(section: bytes | memoryview) -> bytearray:
    """The section as raw, fill or zstd, whichever is smallest."""
    out = bytearray()
    _put_plain(out, *_plain(section, *kernels.survey(section)))
    return out


def _code_section(section: bytes | memoryview, bits: int = 0) -> bytearray:
    """Mode 3: each byte as a `bits`-bit code (2 or 4; 0 chooses), 8/bits codes per byte,
    plus the bytes no code covers.

    For very skewed planes (a delta's top byte: nine in ten are 0): zstd codes literals
    with Huffman, which spends at least one bit per byte however likely the byte is;
    packing 2 or 4 codes per byte divides that floor. Codes 0..k-1 stand for the k most
    frequent values (the table, k < 2^bits), the all-ones code for "the next byte of the
    escape section".
    """
    bits, table, packed, escapes = kernels.pack_codes(section, bits)
    out = bytearray((CODES, bits, len(table)))
    out += table
    _put_plain(out, *_plain(packed, *kernels.survey(packed)))
    _put_plain(out, *_plain(escapes, *kernels.survey(escapes)))
    return out


def encode_section(out: bytearray, section: bytes | memoryview) -> None:
    """Append one section in its smallest form."""
    n = len(section)
    fill, entropy = kernels.survey(section)
    if n >= 64 and fill < 0 and CODES_FIRST[0] <= entropy <= CODES_FIRST[1]:
        coded = _code_section(section)
        if len(coded) <= n:
            out += coded
            return
    mode, payload = _plain(section, fill, entropy)
    if n >= 64 and (size := _plain_size(mode, payload)) * 8 < CODES_TRIAL_BITS * n:
        coded = _code_section(section)
        if len(coded) < size:
            out += coded
            return
    _put_plain(out, mode, payload)


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
    table = data[pos + 2 : pos + 2 + k]
    per = 8 // bits
    packed, pos = decode_section(oid, data, pos + 2 + k, -(-expect // per), nested=True)
    n_escapes = kernels.count_escapes(packed, bits, k, expect)
    if n_escapes == -1:
        raise CorruptObject(oid, "stored record has non-zero padding after its last code")
    if n_escapes < 0:
        raise CorruptObject(oid, "stored record has a code outside its code table")
    escapes, pos = decode_section(oid, data, pos, n_escapes, nested=True)
    return kernels.unpack_codes(packed, escapes, table, bits, expect), pos
