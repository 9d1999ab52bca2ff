"""Reachability: every object that refs (and the evals of reachable commits) keep alive.

gc keeps what this walk finds and `ah stats` sums over it. Only structured objects are
read (commits, snapshots, tags, which are small); tensors and blobs are leaves whose ids
the snapshot already lists, so marking a million adapters never decodes a tensor. A
stored delta needs its base, so the walk also adds the dependencies (delta base, the
second source of an extrapolated delta, or compression dictionary) of every stored copy
of every object it keeps, read from record headers, not decoded, whichever way that
object is reached.

Memory is what limits a walk over a million adapters, not time: a Python set of hex ids
costs ~150 bytes an object (five objects an adapter). So ids are kept as raw 32 bytes:
marked ids are appended to a flat buffer and folded into sorted numpy arrays (`IdSet`,
32 bytes an id); the only per-object Python structure is the set of commits reached
through parent links (history), never the leaves and never the commits refs point at
directly, which are one sorted array.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .errors import AhError, CorruptObject, ObjectNotFound
from .evals import EvalLists
from .objects import COMMIT, SNAPSHOT, TAG, ObjectId, Snapshot, parse_object
from .refs import RefStore
from .store import ObjectStore

ID_LEN = 32
# Ids buffered before they are sorted and deduplicated into a chunk (32 MB of ids).
_FOLD_IDS = 1 << 20
# Objects read between two releases of mapped pack pages (PackedObjectStore.release_pages):
# each read maps up to 64 kB around it (the kernel's fault-around), even without read-ahead.
_RELEASE_EVERY = 1 << 8


@contextlib.contextmanager
def _prefix_lookups_memoized(store: ObjectStore):
    """Within the block, `store.find_prefix` answers each prefix from the first lookup
    that found something.

    Records of encoding 5 name their dictionary by an id prefix, and their dependencies
    are every object the store lists for it: a listing per commit and snapshot (a
    re-scan of the pack folder, a loose fan-out folder and a search in every pack)
    measured 17% of a gc of 20,000 imported adapters. Within one walk the answer is
    remembered. That is safe for gc: an object that starts matching a prefix after the
    first lookup was written during the walk, so it is younger than the walk and the
    grace period keeps it. Empty answers are not remembered (a record whose dictionary
    appears later still finds it). `dependencies_of` looks `find_prefix` up on the store
    at each call, so an instance attribute overrides it; nested blocks share one memo.
    """
    if "find_prefix" in getattr(store, "__dict__", {}):
        yield
        return
    find = store.find_prefix
    memo: dict[str, list] = {}

    def find_prefix(prefix: str):
        found = memo.get(prefix)
        if found is None:
            found = find(prefix)
            if found:
                memo[prefix] = found
        return found

    store.find_prefix = find_prefix
    try:
        yield
    finally:
        del store.find_prefix


def _sorted_distinct(arr):
    """`arr` (an `S32` array, sorted in place) without repeats: a new array, or `arr` itself
    when it holds at most one id."""
    import numpy as np

    arr.sort(kind="stable")
    if len(arr) <= 1:
        return arr
    keep = np.empty(len(arr), dtype=bool)
    keep[0] = True
    np.not_equal(arr[1:], arr[:-1], out=keep[1:])
    return arr[keep]


class IdSet:
    """An immutable set of object ids: one sorted, duplicate-free numpy `S32` array.

    32 bytes an id where a set of hex strings costs ~150; membership is a binary search
    (numpy for batches, `in` for one hex id). Iterating yields hex `ObjectId`s, and `-`
    gives a Python set of them (small results: tests, reports).
    """

    def __init__(self, array=None):
        import numpy as np

        self.array = np.empty(0, dtype="S32") if array is None else array

    @classmethod
    def build(cls, chunks: list) -> "IdSet":
        """From byte strings / arrays of concatenated raw ids, duplicates allowed. The
        list `chunks` is emptied: what it held can be freed once concatenated."""
        import numpy as np

        parts = [np.frombuffer(c, dtype="S32") if isinstance(c, (bytes, bytearray, memoryview)) else c for c in chunks]
        chunks.clear()
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls()
        arr = np.concatenate(parts) if len(parts) > 1 else parts[0].copy()
        parts.clear()
        return cls(_sorted_distinct(arr))

    @classmethod
    def take(cls, buf: bytearray) -> "IdSet":
        """The raw ids in `buf` as an IdSet, `buf` emptied: sorted in place, then one copy of
        the distinct ones (build from bytes(buf) held three copies at once: fsck's notes)."""
        import numpy as np

        view = np.frombuffer(buf, dtype="S32")
        ids = _sorted_distinct(view)
        if ids is view:  # at most one id: still a view of `buf`
            ids = ids.copy()
        del view
        buf.clear()
        return cls(ids)

    @classmethod
    def of_hex(cls, ids: Iterable[str]) -> "IdSet":
        return cls.build([b"".join(bytes.fromhex(i) for i in ids)])

    def __len__(self) -> int:
        return len(self.array)

    def mask(self, keys):
        """Boolean array: which of the `S32` array `keys` are in this set."""
        import numpy as np

        if len(self.array) == 0 or len(keys) == 0:
            return np.zeros(len(keys), dtype=bool)
        pos = np.searchsorted(self.array, keys)
        pos[pos == len(self.array)] = 0
        return self.array[pos] == keys

    def positions(self, keys):
        """(mask, positions): which of `keys` are here, and where (valid where mask)."""
        import numpy as np

        if len(self.array) == 0:
            return np.zeros(len(keys), dtype=bool), np.zeros(len(keys), dtype=np.int64)
        pos = np.searchsorted(self.array, keys)
        pos[pos == len(self.array)] = 0
        return self.array[pos] == keys, pos

    def has_key(self, key: bytes) -> bool:
        import numpy as np

        i = int(np.searchsorted(self.array, key))
        # Elements come back with trailing NUL bytes stripped (numpy `S` semantics).
        return i < len(self.array) and bytes(self.array[i]) == key.rstrip(b"\0")

    def __contains__(self, oid: object) -> bool:
        if not isinstance(oid, str):
            return False
        try:
            key = bytes.fromhex(oid)
        except ValueError:
            return False
        return len(key) == ID_LEN and self.has_key(key)

    def __iter__(self) -> Iterator[ObjectId]:
        for key in self.array.tolist():
            yield ObjectId(key.ljust(ID_LEN, b"\0").hex())

    def __sub__(self, other: "IdSet") -> set[str]:
        return {ObjectId(k.ljust(ID_LEN, b"\0").hex()) for k in self.array[~other.mask(self.array)].tolist()}

    def union(self, other: "IdSet") -> "IdSet":
        return IdSet.build([self.array, other.array])


class _IdBuffer:
    """Raw ids appended one by one, folded into sorted unique chunks as they pile up."""

    def __init__(self):
        self._buf = bytearray()
        self._chunks: list = []

    def add(self, key: bytes) -> None:
        self._buf += key
        if len(self._buf) >= _FOLD_IDS * ID_LEN:
            self._chunks.append(IdSet.build([bytes(self._buf)]).array)
            self._buf = bytearray()

    def done(self) -> IdSet:
        chunks, self._chunks = self._chunks, []
        chunks.append(bytes(self._buf))
        self._buf = bytearray()
        return IdSet.build(chunks)


@dataclass
class Reachable:
    """The result of a walk.

    Attributes:
        ids: every reachable object, delta bases and dictionaries included.
        commits: number of reachable commits.
        leaves: reachable file blobs and tensors (what snapshots list), without delta bases.
        snapshot_bytes: sum over reachable commits of their snapshot's file sizes: what
            storing every revision as a plain copy of its folder would take.
        missing: reachable ids the store does not have or cannot parse (damage: gc then
            removes nothing that could be one of them, and reports them).
    """

    ids: IdSet = field(default_factory=IdSet)
    commits: int = 0
    leaves: IdSet = field(default_factory=IdSet)
    snapshot_bytes: int = 0
    missing: set[str] = field(default_factory=set)


def ref_roots(refs: RefStore) -> IdSet:
    """Ids that every ref (any namespace under refs/) and a detached HEAD point at.

    Packed refs are streamed from their file (a million refs as a dict of names would
    cost more than the rest of a gc); a loose ref shadows the packed entry of its name.
    """
    loose = dict(refs._list_loose("refs/"))
    buf = _IdBuffer()
    for oid in loose.values():
        buf.add(bytes.fromhex(oid))
    for name, oid in refs.packed_all():  # all of them, names checked: damage stops gc
        if name not in loose:
            buf.add(bytes.fromhex(oid))
    try:
        target, head = refs.read_head()
    except (OSError, AhError):
        target, head = None, None
    if head is not None and target is None:
        buf.add(bytes.fromhex(head))
    return buf.done()


def walk(
    store: ObjectStore,
    roots: IdSet | Iterable[str],
    ah_dir: Path | None = None,
    known: IdSet | None = None,
    *,
    want_leaves: bool = False,
    on_eval_error: Callable[[str, Exception], None] | None = None,
    on_snapshot: Callable[[str, Snapshot], None] | None = None,
) -> Reachable:
    """Mark everything reachable from `roots`, skipping what `known` (an earlier walk's
    ids) already holds: a second walk from refs that moved costs only what is new.
    `out.leaves` is filled only `want_leaves` (stats): gc does not need a second set.

    A commit whose eval list cannot be read (CorruptObject, OSError) goes to `missing`
    (an OSError is raised), so gc aborts; with `on_eval_error` (fsck), it is told
    (commit id, the error) instead and the walk goes on through the commit's parents,
    so that damage does not hide what lies behind it. `on_snapshot` (fsck) is handed
    each snapshot the walk parsed, so that a checker need not parse it again."""
    if not isinstance(roots, IdSet):
        roots = IdSet.of_hex(roots)
    known = known or IdSet()
    roots = IdSet(roots.array[~known.mask(roots.array)])
    out = Reachable()
    evals = EvalLists(ah_dir) if ah_dir is not None else None
    marked = _IdBuffer()
    leaves = _IdBuffer()
    # Objects reached other than as a root: history (parents), tags, evals. Roots are
    # never put here: they are walked once each, from the sorted roots array.
    visited: set[bytes] = set()

    def seen(key: bytes) -> bool:
        return key in visited or roots.has_key(key) or known.has_key(key)

    release = getattr(store, "release_pages", None)
    reads = 0

    def visit(oid: str) -> None:
        nonlocal reads
        stack = [oid]
        while stack:
            oid = stack.pop()
            reads += 1
            if release is not None and reads % _RELEASE_EVERY == 0:
                release()
            marked.add(bytes.fromhex(oid))
            try:
                obj_type, body = store.read(oid)
                if obj_type in (COMMIT, SNAPSHOT):
                    structured_dep(oid)
                if obj_type == COMMIT:
                    commit = parse_object(oid, obj_type, body)
                    out.commits += 1
                    snapshot(commit.snapshot)
                    nexts = list(commit.parents)
                    if evals is not None:
                        try:
                            nexts.extend(evals.read(oid))
                        except (CorruptObject, OSError) as exc:
                            if on_eval_error is None:
                                raise
                            on_eval_error(oid, exc)
                elif obj_type == SNAPSHOT:  # a ref or an eval may name a snapshot directly
                    snapshot(oid, (obj_type, body))
                    nexts = []
                elif obj_type == TAG:
                    nexts = [parse_object(oid, obj_type, body).object]
                else:
                    others.add(bytes.fromhex(oid))
                    nexts = []
                for n in nexts:
                    key = bytes.fromhex(n)
                    if not seen(key):
                        visited.add(key)
                        stack.append(n)
            except (ObjectNotFound, CorruptObject):
                out.missing.add(oid)

    def snapshot(sid: str, read: tuple[str, bytes] | None = None) -> None:
        key = bytes.fromhex(sid)
        marked.add(key)
        try:
            obj_type, body = read or store.read(sid)
            if obj_type != SNAPSHOT:
                raise CorruptObject(sid, f"a commit names it as its snapshot, but it is a {obj_type}")
            structured_dep(sid)
            snap = parse_object(sid, obj_type, body)
        except (ObjectNotFound, CorruptObject):
            out.missing.add(sid)
            return
        if on_snapshot is not None:
            on_snapshot(sid, snap)
        out.snapshot_bytes += sum(f.size for f in snap.files)
        for b in snap.blob_ids():
            leaves.add(bytes.fromhex(b))

    def structured_dep(oid: str) -> None:
        for dep in store.dependencies_of(oid):  # a compression dictionary (bulk import): a few for all
            dicts.add(bytes.fromhex(dep))

    # Other objects whose dependency chains need following: dictionaries (few, shared by
    # every adapter of an import), and leaves named directly by refs or evals.
    dicts: set[bytes] = set()
    others = _IdBuffer()
    scattered = getattr(store, "scattered_reads", contextlib.nullcontext)
    with scattered(), _prefix_lookups_memoized(store):
        for oid in roots:
            visit(oid)
        out.leaves = leaves.done()
        pending = IdSet.build([out.leaves.array, others.done().array, b"".join(dicts)])
        if not want_leaves:
            out.leaves = IdSet()
        base_ids = add_delta_bases(store, pending, out.missing, known=lambda k: known.has_key(k))
    parts = [marked.done().array, pending.array, base_ids.array]
    del pending, base_ids
    out.ids = IdSet.build(parts)
    if len(known):
        out.ids = IdSet(out.ids.array[~known.mask(out.ids.array)])
    return out


def add_delta_bases(store: ObjectStore, ids: IdSet | Iterable[str], missing: set[str], known=None) -> IdSet:
    """The dependency chains (delta bases, dictionaries) of each of `ids`, as an IdSet.

    Chains stop at an id already in `ids`, already found, or `known(key)`; ids whose
    record is missing or damaged go to `missing`.
    """
    if not isinstance(ids, IdSet):
        ids = IdSet.of_hex(ids)
    found: set[bytes] = set()
    release = getattr(store, "release_pages", None)
    with _prefix_lookups_memoized(store):
        _add_chains(store, ids, found, missing, known, release)
    return IdSet.build([b"".join(found)])


def _add_chains(store: ObjectStore, ids: IdSet, found: set[bytes], missing: set[str], known, release) -> None:
    for n, start in enumerate(ids, 1):
        if release is not None and n % _RELEASE_EVERY == 0:
            release()
        # Usually one chain (delta -> base -> ...); an extrapolated delta, or an object
        # stored twice with different bases, branches it. Each id is expanded once.
        todo = [start]
        while todo:
            oid = todo.pop()
            try:
                deps = store.dependencies_of(oid)
            except (ObjectNotFound, CorruptObject):
                missing.add(oid)
                continue
            for dep in deps:
                key = bytes.fromhex(dep)
                if key in found or ids.has_key(key) or (known is not None and known(key)):
                    continue
                found.add(key)
                todo.append(dep)
