"""Validate and split a safetensors file without torch, and rebuild it bit for bit.

Layout (https://github.com/huggingface/safetensors): an 8-byte little-endian header
length N, N bytes of JSON header ({name: {dtype, shape, data_offsets}, "__metadata__"}),
then the data region. We keep the header bytes exactly as written (key order, padding)
and each tensor's bytes, so the rebuilt file has the same sha256 as the original.

Anything outside the format is refused before a byte is stored: a header length past
the file or over 100 MB, offsets out of range, overlapping or leaving holes, duplicate
names, a byte count that is not shape x dtype size.
"""

from __future__ import annotations

import json
import math
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass

from .errors import MalformedSafetensors

MAX_HEADER_LEN = 100_000_000

DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}


@dataclass(frozen=True)
class TensorSpan:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    end: int


@dataclass(frozen=True)
class SafetensorsLayout:
    header: bytes  # the JSON header bytes exactly as in the file (without the 8-byte length)
    tensors: tuple[TensorSpan, ...]  # in data-offset order


# Layouts already checked, by (header bytes, file size): everything the checks read. A
# commit parses each file twice (check_file before storing anything, then store_folder),
# and a training run's checkpoints share one header revision after revision, so most
# parses are a dict probe instead of ~1 ms of JSON and checks for a 117-tensor LoRA file.
_CHECKED: OrderedDict[tuple[bytes, int], "SafetensorsLayout"] = OrderedDict()
_CHECKED_MAX_BYTES = 8 << 20  # header bytes kept, all layouts together
_CHECKED_MAX_HEADER = 1 << 20  # bigger headers are parsed every time rather than kept
_checked_bytes = 0
_checked_lock = threading.Lock()


def _reject_duplicates(pairs):
    # dict() in C, then compare sizes: a Python loop over every pair cost more than the parse.
    seen = dict(pairs)
    if len(seen) != len(pairs):
        names: set = set()
        for key, _ in pairs:
            if key in names:
                raise MalformedSafetensors(f"duplicate tensor name {key!r} in safetensors header")
            names.add(key)
    return seen


def parse_layout(data: bytes | memoryview, name: str = "<file>") -> SafetensorsLayout:
    """Check a whole safetensors file held in memory and return its layout."""
    size = len(data)
    if size < 8:
        raise MalformedSafetensors(f"{name}: too short to be safetensors ({size} bytes)")
    (n,) = struct.unpack_from("<Q", data, 0)
    if n > MAX_HEADER_LEN:
        raise MalformedSafetensors(f"{name}: header length {n} is over the {MAX_HEADER_LEN} byte limit")
    if 8 + n > size:
        raise MalformedSafetensors(f"{name}: header length {n} runs past the end of the file ({size} bytes)")
    header = bytes(data[8 : 8 + n])
    key = (header, size)
    with _checked_lock:
        layout = _CHECKED.get(key)
        if layout is not None:
            _CHECKED.move_to_end(key)
            return layout
    layout = _check(header, size, name)
    if n <= _CHECKED_MAX_HEADER:
        global _checked_bytes
        with _checked_lock:
            if key not in _CHECKED:
                _CHECKED[key] = layout
                _checked_bytes += n
            while _checked_bytes > _CHECKED_MAX_BYTES:
                (old, _), _ = _CHECKED.popitem(last=False)
                _checked_bytes -= len(old)
    return layout


def _check(header: bytes, size: int, name: str) -> SafetensorsLayout:
    """The layout a header describes in a file of `size` bytes, every rule checked."""
    n = len(header)
    try:
        meta = json.loads(header.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except MalformedSafetensors as exc:
        raise MalformedSafetensors(f"{name}: {exc}") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise MalformedSafetensors(f"{name}: header is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise MalformedSafetensors(f"{name}: header is not a JSON object")
    base = 8 + n
    spans = []
    for tname, info in meta.items():
        if tname == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise MalformedSafetensors(f"{name}: __metadata__ must map strings to strings")
            continue
        if not isinstance(info, dict):
            raise MalformedSafetensors(f"{name}: entry for {tname!r} is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in DTYPE_SIZES:
            raise MalformedSafetensors(f"{name}: tensor {tname!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise MalformedSafetensors(f"{name}: tensor {tname!r} has a bad shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise MalformedSafetensors(f"{name}: tensor {tname!r} has bad data_offsets {offsets!r}")
        begin, end = offsets
        if not 0 <= begin <= end or base + end > size:
            raise MalformedSafetensors(
                f"{name}: tensor {tname!r} offsets [{begin}, {end}] are out of range of the {size - base} byte data region"
            )
        expected = math.prod(shape) * DTYPE_SIZES[dtype]
        if end - begin != expected:
            raise MalformedSafetensors(
                f"{name}: tensor {tname!r} holds {end - begin} bytes but shape {shape} of {dtype} needs {expected}"
            )
        spans.append(TensorSpan(tname, dtype, tuple(shape), base + begin, base + end))
    spans.sort(key=lambda s: (s.start, s.end))
    cursor = base
    for span in spans:
        if span.start < cursor:
            raise MalformedSafetensors(f"{name}: tensor {span.name!r} overlaps the tensor before it")
        if span.start > cursor:
            raise MalformedSafetensors(f"{name}: the data region has a hole before tensor {span.name!r}")
        cursor = span.end
    if cursor != size:
        raise MalformedSafetensors(f"{name}: {size - cursor} trailing bytes after the last tensor")
    return SafetensorsLayout(header, tuple(spans))


def rebuild_prefix(header: bytes) -> bytes:
    """The bytes before the data region: length prefix plus header."""
    return struct.pack("<Q", len(header)) + header
