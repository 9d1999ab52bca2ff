"""How one object's canonical bytes are stored: a small record header plus a payload.

Record layout (docs/format/store.md), all integers little-endian:

    magic     4 bytes  b"AHO1"
    encoding  1 byte   0 = zstd frame of the canonical bytes
    raw_len   8 bytes  length of the canonical bytes (header + body)
    payload   the rest

The declared raw length bounds decompression: a frame that claims or produces more is
refused before the memory is spent (decompression-bomb guard). Encodings change only how
bytes are stored, never the object id, which is always the hash of the canonical bytes.
"""

from __future__ import annotations

import struct
import threading

import zstandard

from .errors import CorruptObject, UnsupportedFormat

MAGIC = b"AHO1"
ENC_ZSTD = 0
RECORD_HEADER = struct.Struct("<4sBQ")
# The largest object we will ever inflate: far above any adapter tensor, far below
# what would exhaust memory on a small machine from a hostile 100-byte frame.
MAX_RAW_LEN = 8 << 30
ZSTD_LEVEL = 3

_local = threading.local()


def _cctx() -> zstandard.ZstdCompressor:
    # ZstdCompressor objects are not thread-safe: one per thread.
    cctx = getattr(_local, "cctx", None)
    if cctx is None:
        cctx = _local.cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True)
    return cctx


def _dctx() -> zstandard.ZstdDecompressor:
    dctx = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    return dctx


def encode(canonical_parts: list[bytes | memoryview]) -> bytes:
    """Encode canonical bytes (given as parts, to avoid a copy) into a stored record."""
    raw_len = sum(len(p) for p in canonical_parts)
    cobj = _cctx().compressobj(size=raw_len)
    out = [RECORD_HEADER.pack(MAGIC, ENC_ZSTD, raw_len)]
    for part in canonical_parts:
        out.append(cobj.compress(part))
    out.append(cobj.flush())
    return b"".join(out)


def zstd_decompress_bounded(oid: str, payload: bytes | memoryview, raw_len: int) -> bytes:
    """Inflate one zstd frame that must be exactly `raw_len` bytes; never more."""
    try:
        declared = zstandard.frame_content_size(payload)
    except zstandard.ZstdError as exc:
        raise CorruptObject(oid, f"bad zstd frame: {exc}") from None
    if declared not in (-1, raw_len):
        raise CorruptObject(oid, f"zstd frame declares {declared} bytes, record declares {raw_len}")
    try:
        # With a declared size zstandard allocates exactly that; without one,
        # max_output_size caps what it will produce.
        data = _dctx().decompress(payload, max_output_size=raw_len)
    except zstandard.ZstdError as exc:
        raise CorruptObject(oid, f"zstd frame does not decompress: {exc}") from None
    if len(data) != raw_len:
        raise CorruptObject(oid, f"inflated to {len(data)} bytes, record declares {raw_len}")
    return data


def decode(oid: str, record: bytes | memoryview) -> bytes:
    """Canonical bytes of a stored record (not yet hash-checked: the store does that)."""
    if len(record) < RECORD_HEADER.size:
        raise CorruptObject(oid, "stored record is truncated")
    magic, enc, raw_len = RECORD_HEADER.unpack_from(record)
    if magic != MAGIC:
        raise CorruptObject(oid, "stored record has a bad magic number")
    if raw_len > MAX_RAW_LEN:
        raise CorruptObject(oid, f"declared size {raw_len} exceeds the {MAX_RAW_LEN} byte limit")
    payload = memoryview(record)[RECORD_HEADER.size :]
    if enc == ENC_ZSTD:
        return zstd_decompress_bounded(oid, payload, raw_len)
    raise UnsupportedFormat(f"object {oid} uses storage encoding {enc}, which this version does not know")
