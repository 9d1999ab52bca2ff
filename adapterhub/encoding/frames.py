"""A list of byte sections, each stored raw, as one constant byte, or as a zstd frame.

Each section (a byte plane, or a tensor's stray tail) is stored in whichever of the three
forms is smallest: near-random mantissa planes stay raw (zstd would only add its frame
and spend time), an all-zero plane (a LoRA `B` that has not moved, an XOR delta of an
unchanged tensor) costs two bytes, and the rest are zstd frames. The reader knows every
section's decoded length in advance, so each frame is inflated with that exact bound:
a frame that would expand past it is refused (decompression-bomb guard).

Section layout: `u8 mode` then, for mode 0 (raw) and 1 (zstd), a LEB128 length and that
many bytes; for mode 2 (fill), one byte repeated. See docs/format/encodings.md.
"""

from __future__ import annotations

import threading

import numpy as np
import zstandard

from ..errors import CorruptObject

RAW = 0
ZSTD = 1
FILL = 2
ZSTD_LEVEL = 3

_local = threading.local()


def compressor() -> zstandard.ZstdCompressor:
    # zstandard contexts are not thread-safe: one per thread.
    cctx = getattr(_local, "cctx", None)
    if cctx is None:
        cctx = _local.cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True)
    return cctx


def decompressor() -> zstandard.ZstdDecompressor:
    dctx = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    return dctx


def put_varint(out: bytearray, value: int) -> None:
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return


def get_varint(oid: str, data: memoryview, pos: int) -> tuple[int, int]:
    """(value, next position); at most 10 bytes, never past the end."""
    value = 0
    for shift in range(0, 70, 7):
        if pos >= len(data):
            raise CorruptObject(oid, "stored record is truncated (in a length field)")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
    raise CorruptObject(oid, "stored record has an overlong length field")


def encode_section(out: bytearray, section: bytes | memoryview) -> None:
    """Append one section in its smallest form."""
    n = len(section)
    if n:
        arr = np.frombuffer(section, dtype=np.uint8)
        first = arr[0]
        if n > 2 and not (arr != first).any():
            out += bytes((FILL, int(first)))
            return
    packed = compressor().compress(section) if n > 16 else None
    if packed is not None and len(packed) < n:
        out.append(ZSTD)
        put_varint(out, len(packed))
        out += packed
    else:
        out.append(RAW)
        put_varint(out, n)
        out += section


def decode_section(oid: str, data: memoryview, pos: int, expect: int) -> tuple[bytes | memoryview, int]:
    """(section bytes of exactly `expect` length, next position)."""
    if pos >= len(data):
        raise CorruptObject(oid, "stored record is truncated (missing a section)")
    mode = data[pos]
    pos += 1
    if mode == FILL:
        if pos >= len(data):
            raise CorruptObject(oid, "stored record is truncated (in a fill section)")
        return bytes((data[pos],)) * expect, pos + 1
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


def zstd_exact(oid: str, frame: bytes | memoryview, expect: int) -> bytes:
    """Inflate one zstd frame that must be exactly `expect` bytes; never more."""
    try:
        declared = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as exc:
        raise CorruptObject(oid, f"bad zstd frame: {exc}") from None
    if declared not in (-1, expect):
        raise CorruptObject(oid, f"zstd frame declares {declared} bytes where {expect} are expected")
    try:
        # With a declared size zstandard allocates exactly that; without one,
        # max_output_size caps what it will produce.
        data = decompressor().decompress(frame, max_output_size=max(expect, 1))
    except zstandard.ZstdError as exc:
        raise CorruptObject(oid, f"zstd frame does not decompress: {exc}") from None
    if len(data) != expect:
        raise CorruptObject(oid, f"zstd frame inflated to {len(data)} bytes, {expect} expected")
    return data
