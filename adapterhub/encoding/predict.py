"""Extrapolated delta bases: predict a checkpoint's tensor from the two before it.

An optimizer with momentum (AdamW's beta1 = 0.9) moves a weight in nearly the same
direction for many steps, so the step from checkpoint N-1 to N resembles the step from
N-2 to N-1. Encoding 4 (docs/format/encodings.md) stores a tensor as an ordinary ORD
delta, but against the linear extrapolation `2 * base - prev` (computed on the
value-ordered integers, wrapping, so it is exact and lossless) instead of the base
itself, where `prev` is the base's own delta base. The residual is then what the
optimizer's step changed, which on real AdamW checkpoints is a few percent smaller than
the step (measured on bench_storage's sequences: ~1% of the stored bytes in fp32, ~2%
in bf16). Where the step does not repeat (noise-dominated updates) the residual is larger,
so the writer compares both on a sample first (`extrapolation_pays`).

Nothing new enters the dependency graph: `prev` is needed anyway to decode the base.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import delta as deltas
from . import kernels
from .planes import PlaneLayout

# Elements compared when choosing between the plain and the extrapolated base.
SAMPLE = 1024
# The extrapolation must beat the plain base by 1/MARGIN_PARTS bits per element on the
# sample: close calls are left to the plain delta, whose decode needs one base less.
MARGIN_PARTS = 20


@dataclass(frozen=True)
class Extrapolation:
    """The delta base `2 * base - prev`, element by element in value order, wrapping
    like the deltas do, not yet computed.

    The native whole-record calls (kernels.encode_sections / decode_sections) compute it
    inside the one pass that diffs against it, so a commit or a read of an extrapolated
    record spends no extra passes or full-size temporaries on it; anything else asks for
    its bytes (`materialize`). Its length is the tensor's.
    """

    base: bytes | memoryview
    prev: bytes | memoryview
    layout: PlaneLayout

    def __len__(self) -> int:
        return len(self.base)

    def materialize(self) -> bytes:
        """The prediction as tensor bytes: two passes of the delta kernels, no arithmetic
        of their own (the ORD difference `base - prev` added back onto `base` is exactly
        `2 * base - prev`). Bytes past the last whole element are copied from `base` (a
        valid tensor has none)."""
        n = len(self.base) // self.layout.width
        width, rotate = self.layout.width, self.layout.rotate
        step = kernels.split(self.base, width, rotate, base=self.prev, kind=deltas.ORD)
        planes = [step[i * n : (i + 1) * n] for i in range(width)]
        tail = memoryview(self.base)[n * width :]
        return kernels.join(planes, width, rotate, n, base=self.base, kind=deltas.ORD, tail=tail)


def extrapolate(base: bytes | memoryview, prev: bytes | memoryview, layout: PlaneLayout) -> Extrapolation:
    """The base an extrapolated delta (encoding 4) differs from: `2 * base - prev`."""
    return Extrapolation(base, prev, layout)


def extrapolation_pays(body: bytes | memoryview, base: bytes | memoryview, prev: bytes | memoryview, layout: PlaneLayout) -> bool:
    """Whether the delta against `extrapolate(base, prev)` is likely smaller than against `base`.

    Decided on an evenly strided sample of at most SAMPLE elements, so that a commit
    encodes each tensor once: the summed bit lengths of each residual are roughly what the
    plane coder pays (`kernels.extrapolation_score`, integers, so the C and numpy kernels
    decide alike). 8-byte words are never extrapolated (their value-order integers do not
    fit the exact 64-bit score; adapters are not stored in them).
    """
    n = len(body) // layout.width
    if n == 0 or layout.width == 8:
        return False
    step = max(1, n // SAMPLE)
    plain, extrapolated = kernels.extrapolation_score(body, base, prev, layout.width, layout.rotate, step)
    samples = -(-n // step)
    return MARGIN_PARTS * extrapolated + samples < MARGIN_PARTS * plain


def delta_layout(oid: str, payload: memoryview, raw_len: int) -> PlaneLayout:
    """The plane layout a delta record's payload declares (tensor.py's layout)."""
    from .tensor import OID_BYTES, _read_head, _read_layout

    _header, _body_len, pos = _read_head(oid, payload, raw_len)
    layout, _ = _read_layout(oid, payload, pos + OID_BYTES + 2)
    return layout
