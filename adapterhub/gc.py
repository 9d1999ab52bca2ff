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

from . import codec
from .errors import AhError
from .fsutil import TMP_PREFIX, atomic_write
from .pack import Pack
from .packstore import PackedObjectStore
from .reach import Reachable, add_delta_bases, ref_roots, walk
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
class _Inventory:
    """Every stored object and its age, as listed at one moment."""

    loose: dict[str, int] = field(default_factory=dict)  # id -> mtime_ns
    packed: dict[str, Pack] = field(default_factory=dict)  # id -> first pack holding it
    pack_mtimes: dict[Path, int] = field(default_factory=dict)

    def age_ns(self, oid: str) -> int:
        if oid in self.loose:
            return self.loose[oid]
        return self.pack_mtimes[self.packed[oid].path]


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
            inv.pack_mtimes[pack.path] = os.stat(pack.path).st_mtime_ns
        except FileNotFoundError:
            continue
        for oid in pack.iter_ids():
            inv.packed.setdefault(oid, pack)
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


def collect_garbage(
    ah_dir: Path,
    store: PackedObjectStore,
    refs: RefStore,
    *,
    grace_s: float = DEFAULT_GRACE_S,
    now: float | None = None,
    pack_refs: bool = True,
) -> GcResult:
    """Repack reachable objects into one pack, prune unreachable ones older than `grace_s`,
    and (with `pack_refs`) fold loose refs into packed-refs."""
    if grace_s < 0:
        raise AhError("the grace period cannot be negative")
    with gc_lock(ah_dir):
        start = time.time() if now is None else now
        cutoff_ns = int((start - max(grace_s, MIN_AGE_S)) * 1e9)
        before = stored_bytes(store)
        roots = ref_roots(refs)
        reach = walk(store, roots, ah_dir)
        inv = _inventory(store)
        stored = inv.loose.keys() | inv.packed.keys()

        # Unreachable objects young enough to keep, and whatever their deltas need.
        recent = {o for o in stored - reach.ids if inv.age_ns(o) >= cutoff_ns}
        recent_deps = Reachable(ids=set(recent))
        add_delta_bases(store, recent, recent_deps)
        keep_unreachable = (recent_deps.ids - reach.ids) & stored

        to_pack = sorted(reach.ids & stored)
        new_idx = None
        # Already one pack holding exactly what is reachable (say, right after `ah import`):
        # rewriting it would only copy every byte again.
        if not inv.loose and len(inv.pack_mtimes) == 1 and not (stored - reach.ids):
            new_idx = next(iter(inv.pack_mtimes)).with_suffix(".idx")
        elif to_pack:
            with store.writer() as writer:
                for oid in to_pack:
                    record = store._read_record(oid)
                    writer.add(oid, record, codec.raw_length(oid, record))
                new_idx = writer.finish()
            store.add_pack_written()
            check = Pack(new_idx)
            try:
                check.verify()
            finally:
                check.close()
        new_pack_ids = set(to_pack)

        # Refs that moved while we worked keep what they reach now.
        moved = ref_roots(refs) - roots
        if moved:
            later = walk(store, moved, ah_dir, into=Reachable(ids=set(reach.ids)))
            keep_unreachable |= (later.ids - new_pack_ids) & stored
            reach.missing |= later.missing
        # Objects kept outside the new pack that only old packs hold: write them loose.
        for oid in sorted(keep_unreachable):
            if oid not in inv.loose and oid not in new_pack_ids:
                _write_loose(store, oid, store._read_record(oid), inv.age_ns(oid))

        pruned = loose_removed = 0
        missing_now = bool(reach.missing)
        for oid, mtime_ns in inv.loose.items():
            path = store.loose._path(oid)
            if oid in new_pack_ids:
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

        held_by: dict[Path, list[str]] = {}
        for oid, pack in inv.packed.items():
            held_by.setdefault(pack.path, []).append(oid)
        packs_removed = 0
        for pack_path, mtime_ns in inv.pack_mtimes.items():
            if new_idx is not None and pack_path == new_idx.with_suffix(".pack"):
                continue
            if missing_now:
                continue
            try:
                if os.stat(pack_path).st_mtime_ns != mtime_ns:
                    continue  # a writer reused an object in it: keep it for the next gc
            except FileNotFoundError:
                continue
            held = held_by.get(pack_path, [])
            pruned += sum(1 for o in held if o not in new_pack_ids and o not in keep_unreachable)
            # Index first: without its index a pack is invisible, never half-read.
            pack_path.with_suffix(".idx").unlink(missing_ok=True)
            pack_path.unlink(missing_ok=True)
            packs_removed += 1
        store.add_pack_written()
        _clean_temp_files(store, start)
        if pack_refs:
            refs.pack_refs()
        return GcResult(
            reachable=len(reach.ids),
            packed=len(to_pack),
            pruned=pruned,
            kept_recent=len(keep_unreachable),
            loose_removed=loose_removed,
            packs_removed=packs_removed,
            pack=new_idx.name if new_idx else None,
            stored_before=before,
            stored_after=stored_bytes(store),
            missing=sorted(reach.missing),
        )
