"""Byte planes: regroup a float tensor's bytes so that alike bytes sit together.

A float's bytes are not alike: in bf16 and fp32 the top byte holds the sign and most of
the exponent, which takes few distinct values across a tensor (weights live in a narrow
range), while the low mantissa bytes are close to random. A compressor that sees them
interleaved (`e m e m ...`) finds little; split into planes (`e e e ...`, `m m m ...`)
the exponent plane shrinks to a few bits per element and the random planes can be stored
raw instead of wasting time and a few bytes of zstd framing on them. This is the ZipNN
idea (Hershcovitch et al., 2024). Before the split the sign bit is rotated from the top
of the element to the bottom, so the top plane is the pure exponent (for bf16/fp32) and
the sign, which is random, joins the random low plane.

The numpy functions here are the reference; `kernels` runs the C twins in `_native.c`
when they are built (one fused pass each way). See docs/format/encodings.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy is imported where arrays are made: the native codec never needs it
    import numpy as np

# Element width in bytes and whether the sign bit is rotated, per safetensors dtype.
# Only multi-byte numeric types gain from planes; one-byte types are stored as they are.
_FLOAT_WIDTHS = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
_INT_WIDTHS = {"I16": 2, "U16": 2, "I32": 4, "U32": 4, "I64": 8, "U64": 8}
_UINT = {2: "<u2", 4: "<u4", 8: "<u8"}

ROTATE_FLAG = 0x10
WIDTH_MASK = 0x0F


@dataclass(frozen=True)
class PlaneLayout:
    """How a tensor's elements are cut into planes.

    Attributes:
        width: bytes per element (2, 4 or 8); the number of planes.
        rotate: move the sign bit from the top of each element to the bottom first.
    """

    width: int
    rotate: bool

    def to_byte(self) -> int:
        return self.width | (ROTATE_FLAG if self.rotate else 0)

    @classmethod
    def from_byte(cls, value: int) -> "PlaneLayout | None":
        """The layout a record declares, or None when the byte names no valid layout."""
        width = value & WIDTH_MASK
        if width not in _UINT or value & ~(WIDTH_MASK | ROTATE_FLAG):
            return None
        return cls(width, bool(value & ROTATE_FLAG))

    @property
    def uint(self) -> "np.dtype":
        import numpy as np

        return np.dtype(_UINT[self.width])


def layout_for(dtype: str | None) -> PlaneLayout | None:
    """The plane layout for a safetensors dtype, or None when planes cannot help."""
    if dtype in _FLOAT_WIDTHS:
        return PlaneLayout(_FLOAT_WIDTHS[dtype], True)
    if dtype in _INT_WIDTHS:
        return PlaneLayout(_INT_WIDTHS[dtype], False)
    return None


def as_words(body: bytes | memoryview, layout: PlaneLayout) -> np.ndarray:
    """The whole elements of `body` as unsigned words (a read-only view, no copy).

    Bytes past the last whole element (never present in a valid tensor) are left to the
    caller, which stores them as a raw tail.
    """
    import numpy as np

    n = len(body) // layout.width
    return np.frombuffer(body, dtype=layout.uint, count=n)


def rotate(words: np.ndarray, layout: PlaneLayout) -> np.ndarray:
    """Sign bit to the bottom (a new array); identity copy when the layout does not rotate."""
    if not layout.rotate:
        return words.copy()
    bits = layout.width * 8
    return (words << words.dtype.type(1)) | (words >> words.dtype.type(bits - 1))


def unrotate(words: np.ndarray, layout: PlaneLayout) -> np.ndarray:
    """Inverse of `rotate` (in place when it can)."""
    if not layout.rotate:
        return words
    bits = layout.width * 8
    return (words >> words.dtype.type(1)) | (words << words.dtype.type(bits - 1))


def split(words: np.ndarray, layout: PlaneLayout) -> memoryview:
    """Words -> `width` planes, concatenated: plane i (bytes [i*n, (i+1)*n)) holds byte i
    (little-endian) of every element."""
    import numpy as np

    grid = words.view(np.uint8).reshape(-1, layout.width)
    return memoryview(np.ascontiguousarray(grid.T).reshape(-1))


def join(planes: list[bytes | memoryview], layout: PlaneLayout, n: int) -> np.ndarray:
    """Inverse of `split`: `width` planes of `n` bytes each -> `n` words."""
    import numpy as np

    grid = np.empty((n, layout.width), dtype=np.uint8)
    for i, plane in enumerate(planes):
        grid[:, i] = np.frombuffer(plane, dtype=np.uint8, count=n)
    return grid.view(layout.uint).reshape(n)
