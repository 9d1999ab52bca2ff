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

from . import delta as deltas
from . import kernels
from .planes import PlaneLayout

# Elements compared when choosing between the plain and the extrapolated base.
SAMPLE = 1024
# The extrapolation must beat the plain base by 1/MARGIN_PARTS bits per element on the
# sample: close calls are left to the plain delta, whose decode needs one base less.
MARGIN_PARTS = 20


def extrapolate(base: bytes | memoryview, prev: bytes | memoryview, layout: PlaneLayout) -> bytes:
    """`2 * base - prev` element by element in value order, as tensor bytes (same length).

    Two passes of the delta kernels, no arithmetic of its own: the ORD difference
    `base - prev` (split) added back onto `base` (join) is exactly `2 * base - prev`,
    wrapping like the deltas do. Bytes past the last whole element are copied from `base`
    (a valid tensor has none).
    """
    n = len(base) // layout.width
    step = kernels.split(base, layout.width, layout.rotate, base=prev, kind=deltas.ORD)
    planes = [step[i * n : (i + 1) * n] for i in range(layout.width)]
    tail = memoryview(base)[n * layout.width :]
    return kernels.join(planes, layout.width, layout.rotate, n, base=base, kind=deltas.ORD, tail=tail)


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
