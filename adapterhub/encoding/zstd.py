"""zstd contexts, bounded inflation and varints: the numpy-free part of the encodings.

Kept apart from the plane and delta code so that reading commits and snapshots (what
`ah log` and `ah show` do) never imports numpy.
"""

from __future__ import annotations

import threading

import zstandard

from ..errors import CorruptObject

ZSTD_LEVEL = 3

_local = threading.local()


def compressor(level: int = ZSTD_LEVEL) -> zstandard.ZstdCompressor:
    # zstandard contexts are not thread-safe: one per thread and level.
    cctxs = _local.__dict__.setdefault("cctxs", {})
    cctx = cctxs.get(level)
    if cctx is None:
        cctx = cctxs[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return cctx


# Byte planes are literals (coded by Huffman) plus runs of a repeated byte: a fast match
# finder that only takes matches of 7+ bytes from a 64-entry table finds those runs, and
# leaves the rest to Huffman instead of spending sequences on short chance matches. On
# real fp32/bf16 checkpoints this stored the zstd-coded planes 1.4% smaller than level 1,
# and on large exponent and mantissa planes it is 3-10% smaller and 2-3x faster.
PLANE_PARAMS = {"min_match": 7, "hash_log": 6}


def plane_compressor() -> zstandard.ZstdCompressor:
    """The zstd context for plane sections (frames): level 1 with PLANE_PARAMS."""
    cctx = getattr(_local, "plane_cctx", None)
    if cctx is None:
        params = zstandard.ZstdCompressionParameters.from_level(1, write_content_size=True, **PLANE_PARAMS)
        cctx = _local.plane_cctx = zstandard.ZstdCompressor(compression_params=params)
    return cctx


def decompressor() -> zstandard.ZstdDecompressor:
    dctx = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    return dctx


def put_varint(out: bytearray, value: int) -> None:
    if value < 0x80:  # most lengths of small sections: one byte
        out.append(value)
        return
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



def zstd_exact(oid: str, frame: bytes | memoryview, expect: int, dctx: zstandard.ZstdDecompressor | None = None) -> bytes:
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
        data = (dctx or decompressor()).decompress(frame, max_output_size=max(expect, 1))
    except zstandard.ZstdError as exc:
        raise CorruptObject(oid, f"zstd frame does not decompress: {exc}") from None
    if len(data) != expect:
        raise CorruptObject(oid, f"zstd frame inflated to {len(data)} bytes, {expect} expected")
    return data
