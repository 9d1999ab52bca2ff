"""Delta-chain bookkeeping shared by the store and the codec (numpy-free)."""

from __future__ import annotations

from dataclasses import dataclass

# Longest chain of deltas a writer builds (it stores a tensor whole rather than deepen a
# chain past this); bounds checkout cost.
# A training run's checkpoints delta best against their parent, and every keyframe (a
# tensor stored whole when the chain is full) costs ~1.3x (fp32) to ~1.4x (bf16) a delta:
# 16 keeps one keyframe per 17 checkpoints. git's default pack depth is 50; the store's
# base cache keeps consecutive reads from decoding a chain twice.
MAX_CHAIN = 16
# How deep a read may recurse through bases (and extrapolation sources) before it calls the
# record corrupt: what stops a forged cycle. Declared depths are the writer's belief when
# it wrote; two stored copies of one object may sit in different chains (concurrent
# writers), so a read allows twice the writer's bound instead of trusting them.
READ_BUDGET = 2 * MAX_CHAIN + 1


@dataclass(frozen=True)
class DeltaBase:
    """What a delta needs to know about its base.

    Attributes:
        oid: id of the base tensor object.
        body: the base tensor's bytes (same length as the tensor being stored).
        depth: the base's own chain depth (0 when stored whole).
        prev: a second, older tensor of the same length to extrapolate from (encoding
            4): the base's own delta base, when the base is a delta; None otherwise.
        prev_oid: the id of `prev` (an extrapolated record names it).
    """

    oid: str
    body: bytes | memoryview
    depth: int
    prev: bytes | memoryview | None = None
    prev_oid: str | None = None


@dataclass(frozen=True)
class DeltaRef:
    """The base a stored delta record names, read from its payload without decoding it.

    Attributes:
        base: id of the base object.
        depth: this record's chain depth (1 for a delta against a whole record).
    """

    base: str
    depth: int
