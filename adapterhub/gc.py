"""Garbage collection: repack what is reachable, prune what is not (after a grace period).

Order of work, chosen so that a gc killed at any instant loses nothing (docs/format/gc.md):

1. Take `.ah/gc.lock` with flock (one gc at a time; the kernel frees it when a gc dies).
2. Mark everything reachable from refs (reach.py), delta bases included.
3. List every object with its age: a loose file's mtime, a packed object's pack mtime.
4. Write every reachable object into one new pack (records copied, not re-encoded); the
   pack is complete and visible (pack, then index, each renamed into place) before
   anything is removed.
5. Mark again from the refs as they are now: a commit that landed during steps 2-4 keeps
   what it reaches; whatever of that is only in an old pack is written loose.
6. Unreachable objects younger than the grace period are kept (those in old packs are
   written loose, with the pack's age). Then: loose copies of packed objects and old
   unreachable loose objects are removed (each re-checked for a fresh mtime first: a
   writer that reused the object "freshened" it), then the old packs (index first),
   except a pack a writer freshened since step 3, which is kept whole for the next gc.

Concurrent writers never take the gc lock: new objects are loose files gc did not list
(so it never touches them), and reused ones are freshened by `ObjectStore.put_ex`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import redelta
from .errors import AhError, RefLocked
from .fsutil import TMP_PREFIX, atomic_write
from .pack import Pack
from .packstore import PackedObjectStore
from .reach import IdSet, add_delta_bases, ref_roots, walk
from .refs import RefStore

DEFAULT_GRACE_S = 14 * 24 * 3600
# Whatever --prune says, objects younger than this are kept: a writer that has just
# written (or freshened) them has not moved its ref yet, and "--prune now" must not race it.
MIN_AGE_S = 60
# Temp files older than this belong to a dead writer (no write takes an hour).
TMP_MAX_AGE_S = 3600
LOCK_NAME = "gc.lock"


class GcRunning(AhError):
    """Another gc holds the registry's gc lock."""


@dataclass(frozen=True)
class GcResult:
    """What a gc did.

    Attributes:
        reachable: objects reachable from refs (delta bases included).
        packed: objects written into the new pack.
        pruned: unreachable objects removed (older than the grace period).
        kept_recent: unreachable objects kept because they are younger than the grace period.
        loose_removed: loose files removed (now packed, or pruned).
        packs_removed: old packs replaced by the new one.
        pack: file name of the new pack's index, or None when nothing was reachable.
        stored_before: bytes of objects on disk (loose + packs) before.
        stored_after: the same after.
        missing: reachable ids that are missing or damaged (nothing was pruned for them).
        refs_not_packed: why loose refs were left loose (packed-refs was locked: another
            process writing it, or a stale lock left by a killed one), else None.
    """

    reachable: int
    packed: int
    pruned: int
    kept_recent: int
    loose_removed: int
    packs_removed: int
    pack: str | None
    stored_before: int
    stored_after: int
    missing: list[str] = field(default_factory=list)
    refs_not_packed: str | None = None


@contextlib.contextmanager
def gc_lock(ah_dir: Path):
    """Hold `.ah/gc.lock` (flock: released by the kernel if this process dies)."""
    fd = os.open(Path(ah_dir) / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise GcRunning(f"another gc is running on this registry (it holds {Path(ah_dir) / LOCK_NAME})") from None
        yield
    finally:
        os.close(fd)


@dataclass
class _PackAt:
    """One listed pack: its age and sorted ids (a view of its index, no copy)."""

    pack: Pack
    mtime_ns: int
    ids: object  # numpy S32 array
    reach: object = None  # bool mask over ids: reachable (set by collect_garbage)


@dataclass
class _Inventory:
    """Every stored object and its age, as listed at one moment.

    Loose objects are few (fresh writes since the last gc) and kept by hex id; packed
    ones, possibly millions, only as the packs' own sorted id arrays.
    """

    loose: dict[str, int] = field(default_factory=dict)  # id -> mtime_ns
    packs: list[_PackAt] = field(default_factory=list)

    def pack_of(self, key: bytes) -> _PackAt | None:
        """The first listed pack holding the raw id `key`."""
        for p in self.packs:
            if IdSet(p.ids).has_key(key):
                return p
        return None

    def is_stored(self, oid: str) -> bool:
        return oid in self.loose or self.pack_of(bytes.fromhex(oid)) is not None

    def age_ns(self, oid: str) -> int:
        if oid in self.loose:
            return self.loose[oid]
        return self.pack_of(bytes.fromhex(oid)).mtime_ns


def _inventory(store: PackedObjectStore) -> _Inventory:
    inv = _Inventory()
    for oid, path in store.loose.iter_files():
        try:
            inv.loose[oid] = os.stat(path).st_mtime_ns
        except FileNotFoundError:
            continue
    store.add_pack_written()
    for pack in store.packs():
        try:
            mtime = os.stat(pack.path).st_mtime_ns
        except FileNotFoundError:
            continue
        inv.packs.append(_PackAt(pack, mtime, pack.id_array()))
    return inv


def stored_bytes(store: PackedObjectStore) -> int:
    """Bytes the objects take on disk: loose files plus packs and their indexes."""
    total = 0
    for _oid, path in store.loose.iter_files():
        with contextlib.suppress(FileNotFoundError):
            total += os.stat(path).st_size
    store.add_pack_written()
    return total + sum(p.size for p in store.packs())


def _write_loose(store: PackedObjectStore, oid: str, record: bytes, mtime_ns: int) -> None:
    """A loose copy of a record, dated `mtime_ns` so that it keeps aging from where it was."""
    path = store.loose._path(oid)
    path.parent.mkdir(exist_ok=True)
    atomic_write(path, record, durable=store.durable)
    os.utime(path, ns=(mtime_ns, mtime_ns))


def _clean_temp_files(store: PackedObjectStore, now: float) -> None:
    """Remove temp files and index-less packs left by killed writers (older than an hour)."""
    folders = [store.pack_dir] + [store.root / f for f in os.listdir(store.root) if len(f) == 2]
    for folder in folders:
        if not folder.is_dir():
            continue
        for name in os.listdir(folder):
            path = folder / name
            orphan_pack = name.endswith(".pack") and not path.with_suffix(".idx").exists()
            if name.startswith(TMP_PREFIX) or orphan_pack:
                with contextlib.suppress(FileNotFoundError):
                    if now - os.stat(path).st_mtime > TMP_MAX_AGE_S:
                        path.unlink()


# Contiguous records are copied with one read of at most this many bytes.
COPY_SPAN = 8 << 20


def _copy_records(writer, pack: Pack, keys: bytes, offsets, lengths) -> None:
    """Append records of `pack` to `writer` in pack order, reading contiguous runs in one
    pread (not through the memory map: mapped pages would count as gc's own memory)."""
    fd = os.open(pack.path, os.O_RDONLY)
    try:
        n = len(offsets)
        i = 0
        while i < n:
            start = int(offsets[i])
            j, end = i, start
            while j < n and int(offsets[j]) == end and (end - start < COPY_SPAN or j == i):
                end += int(lengths[j])
                j += 1
            span = memoryview(pack.read_span(fd, start, end - start))
            for k in range(i, j):
                at = int(offsets[k]) - start
                writer.add(keys[32 * k : 32 * k + 32], span[at : at + int(lengths[k])])
            i = j
    finally:
        os.close(fd)


def _write_new_pack(store: PackedObjectStore, inv: _Inventory, reach: IdSet, stored_mask, rewrites=()) -> Path:
    """One pack of every stored reachable object: loose copies first, then each pack's, in
    pack order so the old pack is read sequentially. Which copy of an object stored twice
    is kept does not matter: the walk kept the dependencies of every copy."""
    import numpy as np

    done = np.zeros(len(reach), dtype=bool)
    with store.writer(dedup=False) as writer:
        # Re-encoded records (--aggressive) first: they replace every stored copy.
        for oid, record in rewrites:
            key = bytes.fromhex(oid)
            found, pos = reach.positions(np.frombuffer(key, dtype="S32"))  # exact for trailing NULs too
            i = int(pos[0])
            if not (found[0] and stored_mask[i]) or done[i]:
                # Every planned tensor is reachable and stored (it was just read), once: a
                # record left out here would leave its old copy beside new ones that
                # depend on it the other way round.
                raise AhError(f"gc: re-encoded tensor {oid} is not among the objects to pack (a bug); nothing was changed")
            writer.add(key, record)
            done[i] = True
        loose_ids = IdSet.of_hex(inv.loose)
        found, pos = reach.positions(loose_ids.array)
        found[found] = ~done[pos[found]]
        keys = loose_ids.array[found].tobytes()
        for k in range(len(keys) // 32):
            key = keys[32 * k : 32 * k + 32]
            writer.add(key, store.loose._read_record(key.hex()))
        done[pos[found]] = True
        for p in inv.packs:
            found, pos = reach.positions(p.ids)
            take = found.copy()
            take[found] = ~done[pos[found]]
            if not take.any():
                continue
            sel = np.nonzero(take)[0]
            offsets, lengths = p.pack.location_arrays()
            order = sel[np.argsort(offsets[sel], kind="stable")]
            _copy_records(writer, p.pack, p.ids[order].tobytes(), offsets[order], lengths[order])
            done[pos[take]] = True
        if not np.array_equal(done, stored_mask):
            raise AhError("gc: the objects copied into the new pack are not the reachable ones listed (a bug)")
        new_idx = writer.finish()
    store.add_pack_written()
    check = Pack(new_idx)
    try:
        check.verify()
    finally:
        check.close()
    return new_idx


def collect_garbage(
    ah_dir: Path,
    store: PackedObjectStore,
    refs: RefStore,
    *,
    grace_s: float = DEFAULT_GRACE_S,
    now: float | None = None,
    pack_refs: bool = True,
    aggressive: bool = False,
) -> GcResult:
    """Repack reachable objects into one pack, prune unreachable ones older than `grace_s`,
    and (with `pack_refs`) fold loose refs into packed-refs. With `aggressive`, tensor
    deltas are recomputed newest-first (redelta.py) so that branch tips read whole."""
    import numpy as np

    if grace_s < 0:
        raise AhError("the grace period cannot be negative")
    with gc_lock(ah_dir):
        start = time.time() if now is None else now
        cutoff_ns = int((start - max(grace_s, MIN_AGE_S)) * 1e9)
        before = stored_bytes(store)
        roots = ref_roots(refs)
        reach = walk(store, roots, ah_dir)
        inv = _inventory(store)
        R = reach.ids

        # Which reachable objects are stored (somewhere), and which stored ones are not
        # reachable but young: those, and whatever their deltas need, are kept.
        stored_mask = np.zeros(len(R), dtype=bool)
        recent: list[str] = []
        for oid, mtime_ns in inv.loose.items():
            if oid in R:
                stored_mask[int(np.searchsorted(R.array, bytes.fromhex(oid)))] = True
            elif mtime_ns >= cutoff_ns:
                recent.append(oid)
        all_reachable = True
        for p in inv.packs:
            found, pos = R.positions(p.ids)
            p.reach = found
            stored_mask[pos[found]] = True
            if not found.all():
                all_reachable = False
                if p.mtime_ns >= cutoff_ns:
                    recent.extend(IdSet(p.ids[~found]))
        recent_ids = IdSet.of_hex(recent)
        deps = add_delta_bases(store, recent_ids, set(), known=R.has_key)
        keep_unreachable = set(recent) | {o for o in deps if inv.is_stored(o)}

        to_pack = R.array[stored_mask]
        new_idx = None
        # Already one pack holding exactly what is reachable (say, right after `ah import`):
        # rewriting it would only copy every byte again.
        if not aggressive and not inv.loose and len(inv.packs) == 1 and all_reachable:
            new_idx = inv.packs[0].pack.idx_path
        elif len(to_pack):
            rewrites = redelta.rewrites(store, redelta.plan(store, roots)) if aggressive else ()
            new_idx = _write_new_pack(store, inv, R, stored_mask, rewrites)
        new_pack = IdSet(to_pack) if new_idx is not None else IdSet()

        # Refs that moved while we worked keep what they reach now.
        now_roots = ref_roots(refs)
        moved = IdSet(now_roots.array[~roots.mask(now_roots.array)])
        if len(moved):
            later = walk(store, moved, ah_dir, known=R)
            keep_unreachable |= {o for o in later.ids if inv.is_stored(o)}
            reach.missing |= later.missing
        # Objects kept outside the new pack that only old packs hold: write them loose.
        for oid in sorted(keep_unreachable):
            if oid not in inv.loose and oid not in new_pack:
                _write_loose(store, oid, store._read_record(oid), inv.age_ns(oid))

        pruned = loose_removed = 0
        missing_now = bool(reach.missing)
        for oid, mtime_ns in inv.loose.items():
            path = store.loose._path(oid)
            if oid in new_pack:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    loose_removed += 1
                continue
            if oid in keep_unreachable or missing_now:
                continue
            try:
                if os.stat(path).st_mtime_ns >= cutoff_ns:  # freshened by a writer since listed
                    continue
                path.unlink()
            except FileNotFoundError:
                continue
            pruned += 1
            loose_removed += 1

        removed, retained = [], []
        for p in inv.packs:
            if new_idx is not None and p.pack.path == new_idx.with_suffix(".pack"):
                continue
            try:
                if missing_now or os.stat(p.pack.path).st_mtime_ns != p.mtime_ns:
                    retained.append(p.ids)  # a writer reused an object in it: keep it for the next gc
                    continue
            except FileNotFoundError:
                continue
            # Index first: without its index a pack is invisible, never half-read.
            p.pack.idx_path.unlink(missing_ok=True)
            p.pack.path.unlink(missing_ok=True)
            removed.append(p.ids[~new_pack.mask(p.ids)])
        packs_removed = len(removed)
        if removed:
            gone = IdSet.build(removed)
            still = IdSet.build(retained).union(IdSet.of_hex(keep_unreachable))
            pruned += int((~still.mask(gone.array)).sum())
        del inv, removed, retained
        store.add_pack_written()
        _clean_temp_files(store, start)
        # Only when there is something to fold: rewriting a million packed refs unchanged
        # would cost more memory than the rest of this gc.
        # Folding refs is the last, optional step: a packed-refs lock held by someone else
        # (or left by a killed gc or import) leaves them loose, readable as ever, and must
        # not turn the object work above into a failed gc.
        refs_not_packed = None
        if pack_refs and refs._list_loose("refs/"):
            try:
                refs.pack_refs()
            except RefLocked as exc:
                refs_not_packed = str(exc)
        return GcResult(
            reachable=len(R),
            packed=len(to_pack),
            pruned=pruned,
            kept_recent=len(keep_unreachable),
            loose_removed=loose_removed,
            packs_removed=packs_removed,
            pack=new_idx.name if new_idx else None,
            stored_before=before,
            stored_after=stored_bytes(store),
            missing=sorted(reach.missing),
            refs_not_packed=refs_not_packed,
        )
