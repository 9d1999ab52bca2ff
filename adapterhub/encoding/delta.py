"""Deltas: a tensor stored as its difference from the same-named tensor of a base revision.

Between two checkpoints of one training run most weights move by a few units in the last
place, and in bf16 many do not move at all. The difference of the two bit patterns then
has zero sign and exponent bytes and small mantissa bytes, which the plane coder
(`planes`, `frames`) shrinks far more than the tensor itself. Two difference kinds are
tried and the smaller kept:

- XOR of the bit patterns: unchanged bits become zero (what ZipNN's delta mode does);
- SUB: wrapping integer difference of the sign-rotated words, which also makes a small
  step across a carry (0x7f -> 0x80) small, where XOR would set every low bit.

A delta names its base by id; reading it reads the base through the store (verified), so
a chain of deltas is bounded (`MAX_CHAIN`) to keep checkout fast and corruption local.
See docs/format/encodings.md.
"""

from __future__ import annotations

import numpy as np

from .planes import PlaneLayout, rotate, unrotate

XOR = 0
SUB = 1
KINDS = (XOR, SUB)
# Longest chain of deltas before a tensor is stored whole again (a keyframe): reading a
# tensor at depth d decodes d+1 records.
MAX_CHAIN = 8


def diff(kind: int, words: np.ndarray, base: np.ndarray, layout: PlaneLayout) -> np.ndarray:
    """The difference words that `apply` turns back into `words`, already rotated for planes."""
    if kind == XOR:
        # Rotation is a bit permutation, so rot(a ^ b) == rot(a) ^ rot(b).
        return rotate(words ^ base, layout)
    return rotate(words, layout) - rotate(base, layout)


def apply(kind: int, delta: np.ndarray, base: np.ndarray, layout: PlaneLayout) -> np.ndarray:
    """Inverse of `diff`: the original words from the joined delta planes and the base."""
    if kind == XOR:
        return unrotate(delta, layout) ^ base
    return unrotate(delta + rotate(base, layout), layout)
