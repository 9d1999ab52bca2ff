"""Delta-chain bookkeeping shared by the store and the codec (numpy-free)."""

from __future__ import annotations

from dataclasses import dataclass

# Longest chain of deltas a read may follow: bounds checkout cost and stops forged cycles.
MAX_CHAIN = 8


@dataclass(frozen=True)
class DeltaBase:
    """What a delta needs to know about its base.

    Attributes:
        oid: id of the base tensor object.
        body: the base tensor's bytes (same length as the tensor being stored).
        depth: the base's own chain depth (0 when stored whole).
    """

    oid: str
    body: bytes | memoryview
    depth: int


@dataclass(frozen=True)
class DeltaRef:
    """The base a stored delta record names, read from its payload without decoding it.

    Attributes:
        base: id of the base object.
        depth: this record's chain depth (1 for a delta against a whole record).
    """

    base: str
    depth: int
