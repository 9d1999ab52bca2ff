"""Record payloads for tensors: byte planes (encoding 1) and deltas (encoding 2).

Both payloads start with the object's canonical header (`tensor <len>\\0`), so decoding
gives back the exact canonical bytes the id was hashed from; the store then re-hashes
them as for any other record. Layouts are byte-exact in docs/format/encodings.md:

    planes: u8 hlen | header | u8 layout | <width> plane sections | [tail section]
    delta:  u8 hlen | header | 32-byte base id | u8 depth | u8 kind | u8 layout
            | <width> plane sections | [tail section]

The tail section holds the bytes past the last whole element (none in a valid tensor;
kept so that any byte string round-trips). A delta's tail is stored as is, not diffed.
"""

from __future__ import annotations

from typing import Callable

from ..errors import CorruptObject
from .chain import DeltaBase, DeltaRef  # noqa: F401 (re-exported)
from . import delta as deltas
from . import kernels
from .frames import decode_section, encode_section
from .planes import PlaneLayout
from .predict import Extrapolation

_MAX_HEADER = 32
OID_BYTES = 32


def _base_args(base, kind: int, whole_record_call) -> tuple:
    """(base, prev) for the kernels: an Extrapolation goes to the whole-record native
    call as its two sources (computed inside that call's pass), and is otherwise
    materialized into bytes for the per-section kernels."""
    if not isinstance(base, Extrapolation):
        return base, None
    if whole_record_call is not None and kind == deltas.ORD:
        return base.base, base.prev
    return base.materialize(), None


def _planes_body(
    out: bytearray, body: bytes | memoryview, layout: PlaneLayout, base=None, kind: int = deltas.ORD
) -> None:
    """Layout byte, the plane sections of `body` (of its difference from `base` when
    given: tensor bytes or an Extrapolation) and the tail section (the bytes past the
    last whole element, never diffed)."""
    out.append(layout.to_byte())
    base, prev = _base_args(base, kind, kernels.encode_sections)
    if kernels.encode_sections is not None:
        out += kernels.encode_sections(body, layout.width, layout.rotate, base, kind, prev)
        return
    planes = memoryview(kernels.split(body, layout.width, layout.rotate, base, kind))
    n = len(body) // layout.width
    for i in range(layout.width):
        encode_section(out, planes[i * n : (i + 1) * n])
    tail = memoryview(body)[n * layout.width :]
    if len(tail):
        encode_section(out, tail)


def _head(header: bytes) -> bytearray:
    out = bytearray((len(header),))
    out += header
    return out


def encode_planes(header: bytes, body: bytes | memoryview, layout: PlaneLayout) -> bytes:
    """Planes payload of a tensor whose canonical header is `header`."""
    out = _head(header)
    _planes_body(out, body, layout)
    return bytes(out)


def encode_delta(
    header: bytes, body: bytes | memoryview, layout: PlaneLayout, base: DeltaBase, kind: int = deltas.WRITE_KIND
) -> bytes:
    """Delta payload of `body` against `base.body` (same length), difference of `kind`."""
    if len(base.body) != len(body):
        raise ValueError("a delta base must have the tensor's length")
    out = _head(header)
    out += bytes.fromhex(base.oid)
    out += bytes((base.depth + 1, kind))
    _planes_body(out, body, layout, base.body, kind)
    return bytes(out)


def _read_head(oid: str, payload: memoryview, raw_len: int) -> tuple[bytes, int, int]:
    """(canonical header, body length, position after the header)."""
    if not len(payload):
        raise CorruptObject(oid, "stored record is truncated (no header)")
    hlen = payload[0]
    if hlen > _MAX_HEADER or hlen > raw_len or 1 + hlen > len(payload):
        raise CorruptObject(oid, "stored record has a bad header length")
    return bytes(payload[1 : 1 + hlen]), raw_len - hlen, 1 + hlen


def _read_layout(oid: str, payload: memoryview, pos: int) -> tuple[PlaneLayout, int]:
    if pos >= len(payload):
        raise CorruptObject(oid, "stored record is truncated (no plane layout)")
    layout = PlaneLayout.from_byte(payload[pos])
    if layout is None:
        raise CorruptObject(oid, f"stored record names an unknown plane layout {payload[pos]:#x}")
    return layout, pos + 1


def _read_planes(oid: str, payload: memoryview, pos: int, layout: PlaneLayout, body_len: int):
    """(planes, tail bytes) of the plane sections from `pos` to the payload's end."""
    n = body_len // layout.width
    planes = []
    for _ in range(layout.width):
        plane, pos = decode_section(oid, payload, pos, n)
        planes.append(plane)
    tail_len = body_len - n * layout.width
    tail = b""
    if tail_len:
        tail, pos = decode_section(oid, payload, pos, tail_len)
    if pos != len(payload):
        raise CorruptObject(oid, f"stored record has {len(payload) - pos} stray bytes after its data")
    return planes, tail


def _join_sections(
    oid: str, payload: memoryview, pos: int, body_len: int, layout: PlaneLayout, header: bytes,
    base=None, kind: int = deltas.ORD,
) -> bytes:
    """header + the body whose sections run from `pos` to the payload's end (the
    difference against `base`, bytes or an Extrapolation, undone): one native call
    when there is one."""
    base, prev = _base_args(base, kind, kernels.decode_sections)
    if kernels.decode_sections is not None:
        try:
            return kernels.decode_sections(payload, pos, body_len, layout.width, layout.rotate, header, base, kind, prev)
        except kernels.CorruptRecord as exc:
            raise CorruptObject(oid, str(exc)) from None
    planes, tail = _read_planes(oid, payload, pos, layout, body_len)
    n = body_len // layout.width
    return kernels.join(planes, layout.width, layout.rotate, n, base, kind, header, tail)


def decode_planes(oid: str, payload: memoryview, raw_len: int) -> bytes:
    header, body_len, pos = _read_head(oid, payload, raw_len)
    layout, pos = _read_layout(oid, payload, pos)
    return _join_sections(oid, payload, pos, body_len, layout, header)


def read_delta_ref(oid: str, payload: memoryview, raw_len: int) -> DeltaRef:
    """Base id and depth a delta record declares (cheap: no decompression)."""
    _header, _body_len, pos = _read_head(oid, payload, raw_len)
    if pos + OID_BYTES + 1 > len(payload):
        raise CorruptObject(oid, "stored delta record is truncated (no base id)")
    base = bytes(payload[pos : pos + OID_BYTES]).hex()
    depth = payload[pos + OID_BYTES]
    if depth < 1:
        raise CorruptObject(oid, "stored delta record declares chain depth 0")
    return DeltaRef(base, depth)


def decode_delta(oid: str, payload: memoryview, raw_len: int, load_base: Callable[[str, int], bytes]) -> bytes:
    """Canonical bytes of a delta record; `load_base(base_id, depth)` reads the base (the
    codec's loader ignores the declared depth and spends its own read budget)."""
    header, body_len, pos = _read_head(oid, payload, raw_len)
    ref = read_delta_ref(oid, payload, raw_len)
    pos += OID_BYTES + 1
    if pos >= len(payload):
        raise CorruptObject(oid, "stored delta record is truncated (no delta kind)")
    kind = payload[pos]
    if kind not in deltas.KINDS:
        raise CorruptObject(oid, f"stored delta record names an unknown delta kind {kind}")
    layout, pos = _read_layout(oid, payload, pos + 1)
    base_body = load_base(ref.base, ref.depth - 1)
    if len(base_body) != body_len:
        raise CorruptObject(oid, f"delta base {ref.base} has {len(base_body)} bytes, {body_len} expected")
    return _join_sections(oid, payload, pos, body_len, layout, header, base_body, kind)
