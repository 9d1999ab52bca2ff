"""How one object's canonical bytes are stored: a small record header plus a payload.

Record layout (docs/format/store.md), all integers little-endian:

    magic     4 bytes  b"AHO1"
    encoding  1 byte   0 = zstd frame of the canonical bytes, 1 = tensor byte planes,
                       2 = tensor delta against a base, 3 = zstd frame with a dictionary,
                       4 = tensor delta against the extrapolation of two named older
                       tensors, 5 = bare zstd frame with a dictionary named by an id
                       prefix (docs/format/encodings.md)
    raw_len   8 bytes  length of the canonical bytes (header + body)
    payload   the rest

The declared raw length bounds decompression: a frame that claims or produces more is
refused before the memory is spent (decompression-bomb guard). Encodings change only how
bytes are stored, never the object id, which is always the hash of the canonical bytes.
"""

from __future__ import annotations

import struct
import threading
from typing import Callable, Iterable

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
ENC_DICT_PREFIX = 5
ENCODINGS = (ENC_ZSTD, ENC_PLANES, ENC_DELTA, ENC_DICT, ENC_EXTRAPOLATED, ENC_DICT_PREFIX)
# Encodings whose payload is a delta record (tensor.py layout) naming one base.
DELTA_ENCODINGS = (ENC_DELTA, ENC_EXTRAPOLATED)
DICT_ID_BYTES = 32
# Encoding 5 names its dictionary by this many leading id bytes: 24 fewer bytes a record
# than the whole id, with no accidental collision among 2^64 values (a forged one costs
# readers a second candidate to try, never a wrong result: see _decode_prefixed).
DICT_PREFIX_BYTES = 8
SOURCE_ID_BYTES = 32
RECORD_HEADER = struct.Struct("<4sBQ")
# Every header a reader parses without decoding (the encoding, the ids of the objects a
# record depends on, a tensor's head and plane layout: at most ~115 bytes) lies within a
# record's first RECORD_HEAD_MAX bytes, so walking dependencies (gc, stats, fsck) reads
# only these, not a tensor's megabytes.
RECORD_HEAD_MAX = 256
# Where a record's encoding byte sits (after the magic).
ENCODING_AT = 4
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


# --- dictionary records (encodings 3 and 5) ---------------------------------------------
# Encoding 3 (read only): the 32-byte id of a raw-content dictionary, then a standard zstd
# frame. Encoding 5 (written): the first DICT_PREFIX_BYTES of the dictionary's id, then a
# zstd frame without magic number, dictionary id, content size or checksum (raw_len in
# the record header is the size; the store's hash is the checksum), with a dictionary
# that is either a full zstd dictionary (entropy tables + content) or raw content.
def _bare_frame_params() -> zstandard.ZstdCompressionParameters:
    return zstandard.ZstdCompressionParameters.from_level(
        ZSTD_LEVEL, format=zstandard.FORMAT_ZSTD1_MAGICLESS, write_content_size=False, write_dict_id=False,
        write_checksum=False,
    )


def _zdict(enc: int, dict_data: bytes) -> zstandard.ZstdCompressionDict:
    # Encoding 3 always read its dictionary as raw content; encoding 5 lets a dictionary
    # that starts with zstd's dictionary magic carry trained entropy tables.
    kind = zstandard.DICT_TYPE_RAWCONTENT if enc == ENC_DICT else zstandard.DICT_TYPE_AUTO
    return zstandard.ZstdCompressionDict(dict_data, dict_type=kind)


def bare_frame_compressor(dict_data: bytes) -> zstandard.ZstdCompressor:
    """A new compressor of encoding-5 frames with this dictionary (importer.py scores
    candidate dictionaries with it; records use the cached one below)."""
    return zstandard.ZstdCompressor(compression_params=_bare_frame_params(), dict_data=_zdict(ENC_DICT_PREFIX, dict_data))


def _dict_compressor(dict_id: str, dict_data: bytes) -> zstandard.ZstdCompressor:
    # One per thread and dictionary: loading a dictionary costs more than a small frame.
    cache = _local.__dict__.setdefault("dict_cctx", {})
    cctx = cache.get(dict_id)
    if cctx is None:
        cctx = cache[dict_id] = bare_frame_compressor(dict_data)
    return cctx


def _dict_decompressor(enc: int, dict_id: str, dict_data: bytes) -> zstandard.ZstdDecompressor:
    cache = _local.__dict__.setdefault("dict_dctx", {})
    dctx = cache.get((enc, dict_id))
    if dctx is None:
        fmt = zstandard.FORMAT_ZSTD1 if enc == ENC_DICT else zstandard.FORMAT_ZSTD1_MAGICLESS
        dctx = cache[(enc, dict_id)] = zstandard.ZstdDecompressor(dict_data=_zdict(enc, dict_data), format=fmt)
    return dctx


def encode_with_dict(canonical_parts: list[bytes | memoryview], dict_id: str, dict_data: bytes) -> bytes:
    """Encoding 5: a bare zstd frame primed with a dictionary (a `blob` object) that holds
    bytes like these, named by a prefix of its id: for many small, alike JSON objects (one
    commit and one snapshot per imported adapter) the keys, tensor names, shared ids and
    versions they share cost nearly nothing, and so does naming the dictionary."""
    data = b"".join(bytes(p) for p in canonical_parts)
    frame = _dict_compressor(dict_id, dict_data).compress(data)
    return RECORD_HEADER.pack(MAGIC, ENC_DICT_PREFIX, len(data)) + bytes.fromhex(dict_id)[:DICT_PREFIX_BYTES] + frame


# A zstd block holds at most 128 KiB and costs at least 4 bytes (3 of header, 1 of RLE
# byte): no frame inflates more than this many times its size.
_ZSTD_MAX_RATIO = (128 << 10) // 4


def _check_bare_frame(oid: str, frame: memoryview, raw_len: int) -> None:
    """What an encoding-5 frame must be whatever its dictionary, checked before any
    candidate is tried: no `raw_len` the frame cannot hold (a damaged header could
    declare gigabytes for a 100-byte frame), and frame header descriptor 0 (no content
    size, single segment, checksum or dictionary id: anything else is damage, and a
    content size would be trusted by the decompressor's allocation)."""
    if raw_len > len(frame) * _ZSTD_MAX_RATIO:
        raise CorruptObject(oid, f"record declares {raw_len} bytes, more than its {len(frame)}-byte frame can hold")
    if not len(frame) or frame[0] != 0:
        raise CorruptObject(oid, "bare zstd frame has a header descriptor other than 0")


def _bare_frame_exact(oid: str, frame: memoryview, raw_len: int, dict_id: str, dict_data: bytes) -> bytes:
    """Inflate a checked encoding-5 frame with one dictionary to exactly `raw_len` bytes."""
    try:
        data = _dict_decompressor(ENC_DICT_PREFIX, dict_id, dict_data).decompress(frame, max_output_size=max(raw_len, 1))
    except zstandard.ZstdError as exc:  # a damaged dictionary fails here too
        raise CorruptObject(oid, f"zstd frame does not decompress: {exc}") from None
    if len(data) != raw_len:
        raise CorruptObject(oid, f"zstd frame inflated to {len(data)} bytes, {raw_len} expected")
    return data


def _decode_prefixed(
    oid: str,
    payload: memoryview,
    raw_len: int,
    dict_candidates: Callable[[str], Iterable[tuple[str, bytes | Exception]]] | None,
    verify: Callable[[bytes], bool] | None,
) -> bytes:
    """Encoding 5: try each dictionary whose id starts with the record's prefix until one
    decodes to bytes that `verify` accepts (hash to the object's id)."""
    prefix = _dict_prefix(oid, payload)
    if dict_candidates is None:
        raise CorruptObject(oid, f"record needs its compression dictionary {prefix}..., which cannot be read here")
    frame = payload[DICT_PREFIX_BYTES:]
    _check_bare_frame(oid, frame, raw_len)
    failed = []
    for dict_id, dict_data in dict_candidates(prefix):
        if isinstance(dict_data, Exception):  # a match that is no usable dictionary
            failed.append(f"{dict_id} ({getattr(dict_data, 'reason', dict_data)})")
            continue
        try:
            data = _bare_frame_exact(oid, frame, raw_len, dict_id, dict_data)
        except CorruptObject as exc:
            failed.append(f"{dict_id} ({exc.reason})")
            continue
        if verify is None or verify(data):
            return data
        failed.append(f"{dict_id} (decodes to other content)")
    if not failed:
        raise CorruptObject(oid, f"its compression dictionary {prefix}... is missing from the store "
                                 "(no readable blob has an id starting so)")
    raise CorruptObject(oid, f"no blob whose id starts with {prefix} decodes it (its compression dictionary): "
                             + "; ".join(failed))


def _dict_prefix(oid: str, payload: memoryview) -> str:
    if len(payload) < DICT_PREFIX_BYTES:
        raise CorruptObject(oid, "stored record is truncated (no dictionary id prefix)")
    return bytes(payload[:DICT_PREFIX_BYTES]).hex()


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


def encode_tensors(
    jobs: list[tuple[bytes, bytes | memoryview, str | None, DeltaBase | None]], threads: int = 1, pool=None
) -> list[bytes]:
    """encode_tensor of each (header, body, dtype, base), the same records, many at once.

    With the native codec the plane-coded tensors go to one C call that makes each record
    (delta, extrapolated delta or planes, by encode_tensor's rules) on `threads` threads
    without the GIL: a checkpoint's ~100 tensors of ~20-50 kB each spent more time in the
    Python around each record than in coding it, and held the GIL while doing so. The rest
    (small or one-byte tensors, no native codec) run encode_tensor here, split over `pool`
    (a ThreadPoolExecutor) when one is given and `threads` > 1.
    """
    from .encoding import kernels

    native = kernels.encode_records
    records: list[bytes | None] = [None] * len(jobs)
    batch, where, rest = [], [], []
    for i, job in enumerate(jobs):
        native_job = _native_job(*job) if native is not None else None
        if native_job is None:
            rest.append(i)
        else:
            batch.append(native_job)
            where.append(i)
    if batch:
        for i, record in zip(where, native(batch, threads)):
            records[i] = record
    if rest:
        def encode_some(some: list[int]) -> list[bytes]:
            return [encode_tensor(*jobs[i]) for i in some]

        if pool is None or threads < 2 or len(rest) < 2:
            done = [(rest, encode_some(rest))]
        else:  # one hand-off per thread, not per tensor
            futures = [(some, pool.submit(encode_some, some)) for some in (rest[k::threads] for k in range(threads))]
            done = [(some, future.result()) for some, future in futures]
        for some, encoded in done:
            for i, record in zip(some, encoded):
                records[i] = record
    return records


def _native_job(header: bytes, body: bytes | memoryview, dtype: str | None, base: DeltaBase | None) -> tuple | None:
    """The encode_records job for a tensor encode_tensor would code as planes or a delta,
    or None when it also tries plain zstd (small tensors) or has no planes."""
    n = len(body)
    key = (dtype, header, n)
    try:
        plain = _PLAIN_JOBS[key]
    except KeyError:
        plain = _plain_job(header, n, dtype)
        if len(_PLAIN_JOBS) >= _PLAIN_JOBS_MAX:
            _PLAIN_JOBS.clear()
        _PLAIN_JOBS[key] = plain
    if plain is None:
        return None
    width, rotate, planes_prefix, threshold, layout_byte, head, delta_head, ext_head = plain
    body_base = delta_prefix = prev = ext_prefix = None
    if base is not None and base.depth < MAX_CHAIN and len(base.body) == n:
        body_base = base.body
        fields = bytes.fromhex(base.oid) + bytes((base.depth + 1, _WRITE_KIND, layout_byte))
        delta_prefix = delta_head + fields
        if base.prev is not None and base.prev_oid is not None and len(base.prev) == n and width != 8:
            prev = base.prev
            ext_prefix = ext_head + bytes.fromhex(base.prev_oid) + head + fields
    return (body, width, rotate, planes_prefix, body_base, _WRITE_KIND, delta_prefix, prev, ext_prefix, threshold)


def _plain_job(header: bytes, n: int, dtype: str | None) -> tuple | None:
    """What every job for a tensor of `n` bytes of `dtype` shares, or None (no native job)."""
    layout = _layout_for(dtype)
    if layout is None or n < SMALL_TENSOR:
        return None
    raw_len = len(header) + n
    head = b"%c%s" % (len(header), header)
    layout_byte = layout.to_byte()
    planes_prefix = RECORD_HEADER.pack(MAGIC, ENC_PLANES, raw_len) + head + bytes((layout_byte,))
    delta_head = RECORD_HEADER.pack(MAGIC, ENC_DELTA, raw_len) + head
    ext_head = RECORD_HEADER.pack(MAGIC, ENC_EXTRAPOLATED, raw_len)
    return (layout.width, layout.rotate, planes_prefix, PLANES_WORTH_TRYING[layout.width] * raw_len, layout_byte,
            head, delta_head, ext_head)


def _layout_for(dtype: str | None):
    from .encoding.planes import layout_for

    return layout_for(dtype)


# (dtype, header, body length) -> the parts of a native job every tensor of that kind
# shares (_plain_job), or None: building the prefixes cost more than the rest of a job.
_PLAIN_JOBS: dict = {}
_PLAIN_JOBS_MAX = 4096
# delta.WRITE_KIND (ORD), here so that making a job imports nothing.
_WRITE_KIND = 1


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


def self_contained(oid: str, record: bytes | memoryview) -> bool:
    """Whether a record decodes without reading another object (encodings 0 and 1): what
    a dictionary must be, so that finding one never needs a dictionary (no cycles)."""
    return _split_record(oid, record)[0] in (ENC_ZSTD, ENC_PLANES)


def raw_length(oid: str, record: bytes | memoryview) -> int:
    """Length of the canonical bytes a record holds (header check only, no decoding)."""
    return _split_record(oid, record)[1]


def dependencies(
    oid: str, record: bytes | memoryview, find_prefix: Callable[[str], Iterable[str]] | None = None
) -> tuple[str, ...]:
    """The objects a record cannot be decoded without: a delta's base (and, extrapolated,
    the second tensor it extrapolates from), or a dictionary. Header reads only, except
    that a dictionary named by a prefix (encoding 5) is every object `find_prefix` (the
    store's) lists for it: any of them may be the one, so what keeps the record keeps all
    (in practice one); none is damage (CorruptObject), as a missing dictionary is."""
    enc, raw_len, payload = _split_record(oid, record)
    if enc == ENC_DICT_PREFIX:
        prefix = _dict_prefix(oid, payload)
        if find_prefix is None:
            raise TypeError("encoding-5 records need find_prefix to list their dependencies")
        found = tuple(find_prefix(prefix))
        if not found:
            raise CorruptObject(oid, f"its compression dictionary {prefix}... is missing from the store")
        return found
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
    dict_candidates: Callable[[str], Iterable[tuple[str, bytes | Exception]]] | None = None,
    verify: Callable[[bytes], bool] | None = None,
) -> tuple[bytes, DeltaRef | None]:
    """(canonical bytes, the delta base it named or None) of a stored record, not yet
    hash-checked: the store does that.

    A delta record needs `load_base(tensor_id, budget)`, which returns the verified body
    of a tensor it names (its base; for an extrapolated record also the second source),
    reading at most `budget` more levels of records: each level spends one, so even a
    hand-made cycle of deltas ends. A dictionary record needs `load_dict(dict_id)`, which
    returns the dictionary blob's verified body (encoding 3), or `dict_candidates(prefix)`:
    the (id, verified body) of each object whose id starts with `prefix` (or, for one that
    is no readable self-contained blob, the error saying why), of which the first whose
    result `verify` (the store's hash check) accepts is used (encoding 5).
    """
    enc, raw_len, payload = _split_record(oid, record)
    if enc == ENC_ZSTD:
        return zstd_exact(oid, payload, raw_len), None
    if enc == ENC_DICT:
        dict_id = _dict_id(oid, payload)
        if load_dict is None:
            raise CorruptObject(oid, f"record needs its compression dictionary {dict_id}, which cannot be read here")
        dctx = _dict_decompressor(ENC_DICT, dict_id, load_dict(dict_id))
        return zstd_exact(oid, payload[DICT_ID_BYTES:], raw_len, dctx), None
    if enc == ENC_DICT_PREFIX:
        return _decode_prefixed(oid, payload, raw_len, dict_candidates, verify), None
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
