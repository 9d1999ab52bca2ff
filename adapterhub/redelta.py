"""Tip-first deltas: what `ah gc --aggressive` rewrites so the newest revisions read fastest.

A commit stores each tensor as a delta against its parent's (forward): cheap to write,
and the bytes are as small as they get. But reading the newest checkpoint of a long run
then decodes its whole chain, up to 17 records a tensor, while the newest is what people
check out most. git settles the same tension in `git gc --aggressive` / `repack -f`,
which recompute deltas from newer to older objects; `ah gc --aggressive` does it thus:

- walk every ref's history along first parents, newest tips first;
- the first time a tensor is met it is given its new base: the same-named tensor (same
  file, dtype and shape) of the commit met just before it on that walk, i.e. its newer
  successor; a tensor met first at a tip, or whose successor's chain is full, is stored
  whole (a keyframe);
- tensors whose record already matches the plan are left alone; the rest are re-encoded
  (the codec still picks the smallest of whole, delta and extrapolated delta, an
  extrapolation's source being the base's planned base), and each new record is decoded
  again and compared before gc may write it.

Every planned base was planned before the tensors that use it, so the new delta graph has
no cycle, and planned records only depend on planned tensors. Records gc keeps unchanged
(young unreachable objects, a concurrent commit's) may name planned tensors as bases with
depths declared under the old layout: reads bound chains by a budget, not by declared
depths, and name every source by id (encodings.md), so they stay readable. Ids never
change: refs, snapshots and commits are untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

from . import codec
from .encoding.chain import MAX_CHAIN, DeltaBase
from .errors import AhError, CorruptObject
from .objects import COMMIT, TAG, TENSOR, ObjectId, Snapshot, header, parse_object
from .store import ObjectStore


@dataclass(frozen=True)
class Planned:
    """A tensor's place in the tip-first layout.

    Attributes:
        oid: the tensor.
        dtype: its safetensors dtype (how the codec cuts it into planes).
        base: its new delta base (the newer same-named tensor), or None to store it whole.
        depth: its chain depth in the new layout (0 when whole).
    """

    oid: ObjectId
    dtype: str
    base: ObjectId | None
    depth: int


def _tip_commits(store: ObjectStore, roots: Iterable[str]) -> list[tuple[int, ObjectId]]:
    """(timestamp, id) of the commits the roots name (tags peeled), newest first."""
    tips: dict[str, int] = {}
    for oid in roots:
        for _ in range(16):  # a tag of a tag of ... a commit; deeper is not followed
            obj_type, body = store.read(oid)
            if obj_type == TAG:
                oid = parse_object(oid, TAG, body).object
                continue
            if obj_type == COMMIT:
                tips[oid] = parse_object(oid, COMMIT, body).timestamp
            break
    return sorted(((t, o) for o, t in tips.items()), key=lambda x: (-x[0], x[1]))


def _tensor_map(snap: Snapshot) -> dict[tuple[str, str], tuple[ObjectId, str, tuple[int, ...]]]:
    return {
        (f.path, t.name): (t.blob, t.dtype, tuple(t.shape))
        for f in snap.files
        if f.kind == "safetensors"
        for t in f.tensors
    }


def plan(store: ObjectStore, roots: Iterable[str]) -> list[Planned]:
    """The tip-first layout of every tensor in the first-parent history of `roots`, in
    the order it was assigned (every base before the tensors that use it)."""
    assigned: dict[str, Planned] = {}
    order: list[Planned] = []
    seen_commits: set[str] = set()
    for _ts, tip in _tip_commits(store, roots):
        newer: dict | None = None
        oid: str | None = tip
        while oid is not None and oid not in seen_commits:
            seen_commits.add(oid)
            commit = store.get_commit(oid)
            parent = commit.parents[0] if commit.parents else None
            if newer is None and parent is None:
                break  # a history of one commit: nothing to lay out
            tensors = _tensor_map(store.get_snapshot(commit.snapshot))
            for key, (t_oid, dtype, shape) in tensors.items():
                if t_oid in assigned:
                    continue
                base = None
                successor = newer.get(key) if newer is not None else None
                if successor is not None and successor[1] == dtype and successor[2] == shape:
                    candidate = assigned.get(successor[0])
                    if candidate is not None and candidate.depth < MAX_CHAIN:
                        base = candidate
                item = Planned(ObjectId(t_oid), dtype, base.oid if base else None, base.depth + 1 if base else 0)
                assigned[t_oid] = item
                order.append(item)
            newer = tensors
            oid = parent
    return order


def rewrites(store: ObjectStore, layout: list[Planned]) -> Iterator[tuple[ObjectId, bytes]]:
    """(id, new record) for every planned tensor whose stored record differs from the
    plan, each checked by decoding it again. Tensors are read through the store
    (verified); the newest are read first, which decodes each old forward chain once
    into the store's base cache (for histories larger than the cache, chains are decoded
    again per tensor: --aggressive trades time for the layout, as git's does)."""
    by_id = {p.oid: p for p in layout}
    for item in layout:
        record = store._read_record(item.oid)
        current = codec.delta_ref(item.oid, record)
        if (current.base if current else None) == item.base and (current.depth if current else 0) == item.depth:
            continue
        if item.base is None and current is None:
            continue
        body = _tensor_body(store, item.oid)
        base = None
        if item.base is not None:
            prev_item = by_id[item.base].base
            base = DeltaBase(
                item.base,
                _tensor_body(store, item.base),
                by_id[item.base].depth,
                _tensor_body(store, prev_item) if prev_item is not None else None,
                prev_item,
            )
        new = codec.encode_tensor(header(TENSOR, len(body)), body, item.dtype, base, thorough=True)
        _check(item.oid, new, body, store)
        yield item.oid, new


def _tensor_body(store: ObjectStore, oid: str) -> bytes:
    obj_type, body = store.read(oid)
    if obj_type != TENSOR:
        raise CorruptObject(oid, f"expected a tensor, found a {obj_type}")
    return body


def _check(oid: str, record: bytes, body: bytes, store: ObjectStore) -> None:
    """Decode a new record against the bases it names and compare: gc never writes a
    record it has not read back."""

    def load(tensor_id: str, _budget: int) -> bytes:
        return _tensor_body(store, tensor_id)

    if codec.decode(oid, record, load) != header(TENSOR, len(body)) + body:
        raise AhError(f"gc: re-encoding tensor {oid} did not read back the same bytes (a bug); nothing was written")
