"""`ah stats`: how much the store holds, how much disk it takes, and what dedup saved.

Sizes come from record headers and pack indexes (no object is decoded); the revision
total walks the reachable commits and snapshots (small JSON objects) like gc does.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from . import codec
from .errors import AhError
from .packstore import PackedObjectStore
from .reach import IdSet, ref_roots, walk
from .refs import RefStore


@dataclass(frozen=True)
class StoreStats:
    """Storage figures of one registry.

    Attributes:
        objects: distinct objects stored (loose or packed).
        loose_objects: objects held as loose files.
        packed_objects: distinct objects held in packs.
        packs: number of pack files.
        logical_bytes: canonical (uncompressed) size of every distinct object.
        stored_bytes: bytes on disk: loose files, packs and pack indexes.
        ratio: logical_bytes / stored_bytes (what encoding and compression gained).
        revisions: reachable commits.
        revision_bytes: size of every reachable revision's files, each revision counted in
            full: what keeping each revision as a plain copy would take.
        content_bytes: distinct reachable file and tensor content (blob and tensor bodies).
        dedup_savings: revision_bytes - content_bytes: what sharing unchanged files and
            tensors across revisions and adapters saved before any compression.
        total_ratio: revision_bytes / stored_bytes.
    """

    objects: int
    loose_objects: int
    packed_objects: int
    packs: int
    logical_bytes: int
    stored_bytes: int
    ratio: float
    revisions: int
    revision_bytes: int
    content_bytes: int
    dedup_savings: int
    total_ratio: float

    def to_json(self) -> dict:
        return asdict(self)


def _raw_lengths(store: PackedObjectStore) -> tuple[IdSet, object, int, int, int]:
    """(every stored id, their canonical lengths aligned with it, loose count, stored
    bytes, packed count). Arrays, not a dict per object: a million adapters are four
    million objects. A loose copy's length wins over a packed one's (as reads prefer it)."""
    import numpy as np

    loose_ids, loose_raw = bytearray(), []
    stored = 0
    for oid, path in store.loose.iter_files():
        try:
            with open(path, "rb") as fh:
                head = fh.read(codec.RECORD_HEADER.size)
                stored += os.fstat(fh.fileno()).st_size
        except FileNotFoundError:
            continue
        try:
            n = codec.raw_length(oid, head)
        except AhError:
            n = 0  # damaged: fsck reports it; stats still adds up the rest
        loose_ids += bytes.fromhex(oid)
        loose_raw.append(n)
    store.add_pack_written()
    ids = [np.frombuffer(bytes(loose_ids), dtype="S32")]
    raws = [np.array(loose_raw, dtype=np.uint64)]
    for pack in store.packs():
        stored += pack.size
        ids.append(pack.id_array())
        raws.append(pack.raw_length_array())
    packed = len(IdSet.build(ids[1:])) if len(ids) > 1 else 0
    all_ids, all_raw = np.concatenate(ids), np.concatenate(raws)
    order = np.argsort(all_ids, kind="stable")  # loose first among equal ids
    all_ids, all_raw = all_ids[order], all_raw[order]
    first = np.ones(len(all_ids), dtype=bool)
    first[1:] = all_ids[1:] != all_ids[:-1]
    return IdSet(all_ids[first]), all_raw[first], len(loose_raw), stored, packed


def _body_bytes(raw) -> int:
    """Sum of body lengths: canonical length minus the "tensor <len>\0" header ("blob " is
    one byte shorter than "tensor ": at most one byte per object off)."""
    import numpy as np

    n = raw.astype(np.int64)
    digits = 1 + np.searchsorted(10 ** np.arange(1, 19, dtype=np.int64), n, side="right")
    return int(np.maximum(0, n - (8 + digits)).sum())


def store_stats(ah_dir: Path, store: PackedObjectStore, refs: RefStore) -> StoreStats:
    ids, raw, loose, stored, packed = _raw_lengths(store)
    reach = walk(store, ref_roots(refs), ah_dir, want_leaves=True)
    found, pos = ids.positions(reach.leaves.array)
    content = _body_bytes(raw[pos[found]])
    logical = int(raw.sum())
    return StoreStats(
        objects=len(ids),
        loose_objects=loose,
        packed_objects=packed,
        packs=len(store.packs()),
        logical_bytes=logical,
        stored_bytes=stored,
        ratio=round(logical / stored, 3) if stored else 0.0,
        revisions=reach.commits,
        revision_bytes=reach.snapshot_bytes,
        content_bytes=content,
        dedup_savings=max(0, reach.snapshot_bytes - content),
        total_ratio=round(reach.snapshot_bytes / stored, 3) if stored else 0.0,
    )
