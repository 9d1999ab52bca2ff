"""How one object's canonical bytes are stored: a small record header plus a payload.

Record layout (docs/format/store.md), all integers little-endian:

    magic     4 bytes  b"AHO1"
    encoding  1 byte   0 = zstd frame of the canonical bytes, 1 = tensor byte planes,
                       2 = tensor delta against a base, 3 = zstd frame with a dictionary,
                       4 = tensor delta against the extrapolation of two named older
                       tensors (docs/format/encodings.md)
    raw_len   8 bytes  length of the canonical bytes (header + body)
    payload   the rest

The declared raw length bounds decompression: a frame that claims or produces more is
refused before the memory is spent (decompression-bomb guard). Encodings change only how
bytes are stored, never the object id, which is always the hash of the canonical bytes.
"""

from __future__ import annotations

import struct
import threading
from typing import Callable

import zstandard

from .encoding.chain import MAX_CHAIN, READ_BUDGET, DeltaBase, DeltaRef
from .encoding.zstd import ZSTD_LEVEL, compressor, zstd_exact

# The plane and delta encodings need numpy; they are imported on first use so that
# reading commits and snapshots (`ah log`, `ah show`) starts without it.
_tensor = None


def _tensor_codec():
    global _tensor
    if _tensor is None:
        from .encoding import tensor

        _tensor = tensor
    return _tensor

from .errors import CorruptObject, UnsupportedFormat

MAGIC = b"AHO1"
ENC_ZSTD = 0
ENC_PLANES = 1
ENC_DELTA = 2
ENC_DICT = 3
ENC_EXTRAPOLATED = 4
ENCODINGS = (ENC_ZSTD, ENC_PLANES, ENC_DELTA, ENC_DICT, ENC_EXTRAPOLATED)
# Encodings whose payload is a delta record (tensor.py layout) naming one base.
DELTA_ENCODINGS = (ENC_DELTA, ENC_EXTRAPOLATED)
DICT_ID_BYTES = 32
SOURCE_ID_BYTES = 32
RECORD_HEADER = struct.Struct("<4sBQ")
# The largest object we will ever inflate: far above any adapter tensor, far below
# what would exhaust memory on a small machine from a hostile 100-byte frame.
MAX_RAW_LEN = 8 << 30
_local = threading.local()
# Tensors below this size also try plain zstd (see encode_tensor).
SMALL_TENSOR = 4096
# Planes of float weights rarely get below these fractions of the raw size (bf16/fp16
# ~0.65-0.7, fp32 ~0.83-0.85): a delta already smaller is kept without computing them.
PLANES_WORTH_TRYING = {2: 0.6, 4: 0.8, 8: 0.85}


def encode(canonical_parts: list[bytes | memoryview]) -> bytes:
    """Encode canonical bytes (given as parts, to avoid a copy) into a stored record."""
    raw_len = sum(len(p) for p in canonical_parts)
    cobj = compressor().compressobj(size=raw_len)
    out = [RECORD_HEADER.pack(MAGIC, ENC_ZSTD, raw_len)]
    for part in canonical_parts:
        out.append(cobj.compress(part))
    out.append(cobj.flush())
    return b"".join(out)


def _dict_compressor(dict_id: str, dict_data: bytes) -> zstandard.ZstdCompressor:
    # One per thread and dictionary: loading a dictionary costs more than a small frame.
    cache = _local.__dict__.setdefault("dict_cctx", {})
    cctx = cache.get(dict_id)
    if cctx is None:
        zdict = zstandard.ZstdCompressionDict(dict_data, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        cctx = cache[dict_id] = zstandard.ZstdCompressor(level=ZSTD_LEVEL, dict_data=zdict, write_content_size=True)
    return cctx


def _dict_decompressor(dict_id: str, dict_data: bytes) -> zstandard.ZstdDecompressor:
    cache = _local.__dict__.setdefault("dict_dctx", {})
    dctx = cache.get(dict_id)
    if dctx is None:
        zdict = zstandard.ZstdCompressionDict(dict_data, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        dctx = cache[dict_id] = zstandard.ZstdDecompressor(dict_data=zdict)
    return dctx


def encode_with_dict(canonical_parts: list[bytes | memoryview], dict_id: str, dict_data: bytes) -> bytes:
    """Encoding 3: a zstd frame primed with a dictionary (a `blob` object) that holds
    bytes like these: for many small, alike JSON objects (one commit and one snapshot per
    imported adapter) the keys, tensor names and versions they share cost nearly nothing."""
    data = b"".join(bytes(p) for p in canonical_parts)
    frame = _dict_compressor(dict_id, dict_data).compress(data)
    return RECORD_HEADER.pack(MAGIC, ENC_DICT, len(data)) + bytes.fromhex(dict_id) + frame


def zstd_decompress_bounded(oid: str, payload: bytes | memoryview, raw_len: int) -> bytes:
    """Inflate one zstd frame that must be exactly `raw_len` bytes; never more."""
    return zstd_exact(oid, payload, raw_len)


def encode_tensor(
    header: bytes, body: bytes | memoryview, dtype: str | None, base: DeltaBase | None = None, *, thorough: bool = False
) -> bytes:
    """The smallest record for a tensor: plain zstd, byte planes, or a delta against `base`.

    `dtype` (safetensors name) says how to cut elements into planes; without one, or for
    one-byte types, only plain zstd applies. `base` must be a tensor of the same length
    whose own depth is below MAX_CHAIN; the caller (the store) checks that.

    Candidates are skipped when they cannot win, to keep commits fast: plain zstd is
    tried only for small tensors (fixed plane overhead can matter there; on larger float
    tensors planes always beat it), and planes only when there is no delta or the delta
    kept more than planes of that width usually keep (PLANES_WORTH_TRYING). `thorough`
    (gc's re-encoding, where time matters less) always tries planes too: a tensor near
    zero (a LoRA B early in training) compresses better whole than as a delta.
    """
    raw_len = len(header) + len(body)
    from .encoding.planes import layout_for

    tc = _tensor_codec()
    layout = layout_for(dtype)
    if layout is None or len(body) < layout.width:
        return encode([header, body])
    candidates = []
    if len(body) < SMALL_TENSOR:
        candidates.append(encode([header, body]))
    if base is not None and base.depth < MAX_CHAIN and len(base.body) == len(body):
        enc, against, prefix = _delta_target(body, base, layout)
        candidates.append(RECORD_HEADER.pack(MAGIC, enc, raw_len) + prefix + tc.encode_delta(header, body, layout, against))
    if thorough or len(candidates) == 0 or min(map(len, candidates)) > PLANES_WORTH_TRYING[layout.width] * raw_len:
        candidates.append(RECORD_HEADER.pack(MAGIC, ENC_PLANES, raw_len) + tc.encode_planes(header, body, layout))
    return min(candidates, key=len)


def _delta_target(body: bytes | memoryview, base: DeltaBase, layout) -> tuple[int, DeltaBase, bytes]:
    """(encoding, base to diff against, payload prefix): the base itself, or its
    extrapolation from `base.prev` when a sample says that leaves the smaller residual
    (predict.py); an extrapolated record starts with the id of `prev`."""
    if base.prev is None or base.prev_oid is None or len(base.prev) != len(body):
        return ENC_DELTA, base, b""
    from .encoding import predict

    if not predict.extrapolation_pays(body, base.body, base.prev, layout):
        return ENC_DELTA, base, b""
    predicted = DeltaBase(base.oid, predict.extrapolate(base.body, base.prev, layout), base.depth)
    return ENC_EXTRAPOLATED, predicted, bytes.fromhex(base.prev_oid)


def _split_record(oid: str, record: bytes | memoryview) -> tuple[int, int, memoryview]:
    """(encoding, raw_len, payload) after checking the record header."""
    if len(record) < RECORD_HEADER.size:
        raise CorruptObject(oid, "stored record is truncated")
    magic, enc, raw_len = RECORD_HEADER.unpack_from(record)
    if magic != MAGIC:
        raise CorruptObject(oid, "stored record has a bad magic number")
    if raw_len > MAX_RAW_LEN:
        raise CorruptObject(oid, f"declared size {raw_len} exceeds the {MAX_RAW_LEN} byte limit")
    if enc not in ENCODINGS:
        raise UnsupportedFormat(f"object {oid} uses storage encoding {enc}, which this version does not know")
    return enc, raw_len, memoryview(record)[RECORD_HEADER.size :]


def raw_length(oid: str, record: bytes | memoryview) -> int:
    """Length of the canonical bytes a record holds (header check only, no decoding)."""
    return _split_record(oid, record)[1]


def dependencies(oid: str, record: bytes | memoryview) -> tuple[str, ...]:
    """The objects a record cannot be decoded without: a delta's base (and, extrapolated,
    the second tensor it extrapolates from), or a dictionary. Header reads only."""
    enc, raw_len, payload = _split_record(oid, record)
    if enc == ENC_DELTA:
        return (_tensor_codec().read_delta_ref(oid, payload, raw_len).base,)
    if enc == ENC_EXTRAPOLATED:
        prev, inner = _extrapolated_parts(oid, payload)
        return (_tensor_codec().read_delta_ref(oid, inner, raw_len).base, prev)
    if enc == ENC_DICT:
        return (_dict_id(oid, payload),)
    return ()


def _extrapolated_parts(oid: str, payload: memoryview) -> tuple[str, memoryview]:
    """(id of the second extrapolation source, the encoding-2 payload after it)."""
    if len(payload) < SOURCE_ID_BYTES:
        raise CorruptObject(oid, "stored record is truncated (no extrapolation source id)")
    return bytes(payload[:SOURCE_ID_BYTES]).hex(), payload[SOURCE_ID_BYTES:]


def _dict_id(oid: str, payload: memoryview) -> str:
    if len(payload) < DICT_ID_BYTES:
        raise CorruptObject(oid, "stored record is truncated (no dictionary id)")
    return bytes(payload[:DICT_ID_BYTES]).hex()


def delta_ref(oid: str, record: bytes | memoryview) -> DeltaRef | None:
    """The base a delta record depends on, or None for a self-contained record."""
    enc, raw_len, payload = _split_record(oid, record)
    if enc == ENC_EXTRAPOLATED:
        payload = _extrapolated_parts(oid, payload)[1]
    return _tensor_codec().read_delta_ref(oid, payload, raw_len) if enc in DELTA_ENCODINGS else None


def decode(oid: str, record: bytes | memoryview, *loaders, **kw) -> bytes:
    """Canonical bytes of a stored record; arguments as for `decode_ex`."""
    return decode_ex(oid, record, *loaders, **kw)[0]


def decode_ex(
    oid: str,
    record: bytes | memoryview,
    load_base: Callable[[str, int], bytes] | None = None,
    budget: int = READ_BUDGET,
    load_dict: Callable[[str], bytes] | None = None,
) -> tuple[bytes, DeltaRef | None]:
    """(canonical bytes, the delta base it named or None) of a stored record, not yet
    hash-checked: the store does that.

    A delta record needs `load_base(tensor_id, budget)`, which returns the verified body
    of a tensor it names (its base; for an extrapolated record also the second source),
    reading at most `budget` more levels of records: each level spends one, so even a
    hand-made cycle of deltas ends. A dictionary record needs `load_dict(dict_id)`, which
    returns the dictionary blob's verified body.
    """
    enc, raw_len, payload = _split_record(oid, record)
    if enc == ENC_ZSTD:
        return zstd_exact(oid, payload, raw_len), None
    if enc == ENC_DICT:
        dict_id = _dict_id(oid, payload)
        if load_dict is None:
            raise CorruptObject(oid, f"record needs its compression dictionary {dict_id}, which cannot be read here")
        dctx = _dict_decompressor(dict_id, load_dict(dict_id))
        return zstd_exact(oid, payload[DICT_ID_BYTES:], raw_len, dctx), None
    ref = None
    if enc == ENC_PLANES:
        data = _tensor_codec().decode_planes(oid, payload, raw_len)
    else:
        prev_id = None
        if enc == ENC_EXTRAPOLATED:
            prev_id, payload = _extrapolated_parts(oid, payload)
        ref = _tensor_codec().read_delta_ref(oid, payload, raw_len)
        if ref.depth > MAX_CHAIN:
            raise CorruptObject(oid, f"delta record declares chain depth {ref.depth}, above the limit of {MAX_CHAIN}")
        if budget < 1:
            raise CorruptObject(oid, f"delta chain is deeper than {READ_BUDGET} records (a cycle?)")
        if load_base is None:
            raise CorruptObject(oid, f"delta record needs its base {ref.base}, which cannot be read here")
        if prev_id is None:
            def base_for(base_id: str, _declared: int) -> bytes:
                return load_base(base_id, budget - 1)
        else:
            def base_for(base_id: str, _declared: int) -> bytes:
                from .encoding import predict

                base = load_base(base_id, budget - 1)
                prev = load_base(prev_id, budget - 1)
                if len(prev) != len(base):
                    raise CorruptObject(oid, f"its extrapolation sources {base_id} and {prev_id} differ in length")
                return predict.extrapolate(base, prev, predict.delta_layout(oid, payload, raw_len))
        data = _tensor_codec().decode_delta(oid, payload, raw_len, base_for)
    if len(data) != raw_len:
        raise CorruptObject(oid, f"decoded to {len(data)} bytes, record declares {raw_len}")
    return data, ref
