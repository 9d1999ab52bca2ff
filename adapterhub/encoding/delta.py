"""Deltas: a tensor stored as its difference from the same-named tensor of a base revision.

Between two checkpoints of one training run most weights move by a few units in the last
place, and in bf16 many do not move at all. The difference then has zero high bytes and
small low bytes, which the plane coder (`planes`, `frames`) shrinks far more than the
tensor itself. Two difference kinds exist (the record says which):

- XOR of the bit patterns, rotated like planes: unchanged bits become zero (what ZipNN's
  delta mode does);
- ORD (what the writer uses): each float is mapped to an integer that orders like its
  value (sign-magnitude to two's complement: `x ^ ((x >> (bits-1)) & 0x7f..f)`, signed
  shift), the base's integer is subtracted (wrapping) and the result zigzag-encoded
  (`(d << 1) ^ (d >> (bits-1))`). The stored word is then about log2(|step| / ulp) bits
  long whatever the sign of the step or a carry across a byte, where XOR sets every bit
  below the highest one that changed: on real AdamW checkpoints ORD stores 3-10% fewer
  bytes than XOR. Integer tensors skip the mapping (their words already order).

A delta names its base by id; reading it reads the base through the store (verified), so
a chain of deltas is bounded (`MAX_CHAIN`) to keep checkout fast and corruption local.
The numpy `diff`/`apply` here are the reference; `kernels` runs their C twins, fused with
the plane split and join, when the extension is built. See docs/format/encodings.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .planes import PlaneLayout, rotate, unrotate

XOR = 0
ORD = 1
KINDS = (XOR, ORD)
# The kind the writer uses: trying both would double the encoding time for ~0.5%.
WRITE_KIND = ORD
# Longest chain of deltas before a tensor is stored whole again (a keyframe): reading a
# tensor at depth d decodes d+1 records.
from .chain import MAX_CHAIN  # noqa: E402,F401 (re-exported)
_SIGNED = {2: "<i2", 4: "<i4", 8: "<i8"}

if TYPE_CHECKING:  # numpy is imported where arrays are made: the native codec never needs it
    import numpy as np


def _ordered(words: np.ndarray, layout: PlaneLayout) -> np.ndarray:
    """Float bit patterns -> integers in value order (identity for integer layouts)."""
    signed = words.view(_SIGNED[layout.width])
    if not layout.rotate:
        return signed
    bits = layout.width * 8
    mask = signed.dtype.type((1 << (bits - 1)) - 1)
    return signed ^ ((signed >> signed.dtype.type(bits - 1)) & mask)


def _zigzag(d: np.ndarray, layout: PlaneLayout) -> np.ndarray:
    bits = layout.width * 8
    one = d.dtype.type(1)
    return ((d << one) ^ (d >> d.dtype.type(bits - 1))).view(layout.uint)


def _unzigzag(z: np.ndarray, layout: PlaneLayout) -> np.ndarray:
    import numpy as np

    one = z.dtype.type(1)
    return ((z >> one) ^ np.negative(z & one)).view(_SIGNED[layout.width])


def diff(kind: int, words: np.ndarray, base: np.ndarray, layout: PlaneLayout) -> np.ndarray:
    """The difference words that `apply` turns back into `words`, ready for planes."""
    import numpy as np

    if kind == XOR:
        # Rotation is a bit permutation, so rot(a ^ b) == rot(a) ^ rot(b).
        return rotate(words ^ base, layout)
    with np.errstate(over="ignore"):
        return _zigzag(_ordered(words, layout) - _ordered(base, layout), layout)


def apply(kind: int, delta: np.ndarray, base: np.ndarray, layout: PlaneLayout) -> np.ndarray:
    """Inverse of `diff`: the original words from the joined delta planes and the base."""
    import numpy as np

    if kind == XOR:
        return unrotate(delta, layout) ^ base
    with np.errstate(over="ignore"):
        ordered = _unzigzag(delta, layout) + _ordered(base, layout)
    # The ordering map is its own inverse.
    return _ordered(ordered.view(layout.uint), layout).view(layout.uint)
