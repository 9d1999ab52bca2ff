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
from .objects import header
from .packstore import PackedObjectStore
from .reach import ref_roots, walk
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


def _raw_lengths(store: PackedObjectStore) -> tuple[dict[str, int], int, int, int]:
    """(id -> canonical length, loose count, stored bytes, packed count)."""
    raw: dict[str, int] = {}
    stored = 0
    loose = 0
    for oid, path in store.loose.iter_files():
        try:
            with open(path, "rb") as fh:
                head = fh.read(codec.RECORD_HEADER.size)
                stored += os.fstat(fh.fileno()).st_size
        except FileNotFoundError:
            continue
        try:
            raw[oid] = codec.raw_length(oid, head)
        except AhError:
            raw[oid] = 0  # damaged: fsck reports it; stats still adds up the rest
        loose += 1
    store.add_pack_written()
    packed: set[str] = set()
    for pack in store.packs():
        stored += pack.size
        for e in pack.iter_entries():
            raw.setdefault(e.oid, e.raw_len)
            packed.add(e.oid)
    return raw, loose, stored, len(packed)


def store_stats(ah_dir: Path, store: PackedObjectStore, refs: RefStore) -> StoreStats:
    raw, loose, stored, packed = _raw_lengths(store)
    reach = walk(store, ref_roots(refs), ah_dir, want_leaves=True)
    content = 0
    for oid in reach.leaves:
        n = raw.get(oid, 0)
        # Body length: canonical length minus the "<type> <len>\0" header ("blob " is
        # one byte shorter than "tensor ": at most one byte per object off).
        content += max(0, n - len(header("tensor", n)))
    logical = sum(raw.values())
    return StoreStats(
        objects=len(raw),
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
