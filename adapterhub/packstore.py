"""The registry's object store: loose objects for fresh writes, packs for the bulk.

Writes go to loose files (one atomic rename each, no coordination with other writers);
`ah gc` and `ah import` move objects into packs (`adapterhub.pack`). A commit writes inside
`batch()`: its new objects land in ONE new pack when they are big enough to be worth it
(fsyncing one loose file per tensor cost more than encoding the tensors), streamed into the
pack's temp file while the commit is still encoding and made visible when the batch ends. A read looks in the
packs it has listed first (through their indexes), then in the loose folder, then in the
packs again after re-listing them, so an object that gc moved from a loose file into a new
pack while this process was running is still found. An object may be stored in more than
one place (two writers at once); `dependencies_of` answers for every copy.
"""

from __future__ import annotations

import contextlib
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from . import codec
from .errors import CorruptObject, ObjectNotFound
from .objects import ObjectId
from .pack import Pack, PackWriter, pack_names
from .store import LooseObjectStore, ObjectStore

PACK_DIR = "pack"
# A batch of fewer objects than BATCH_PACK_MIN_OBJECTS totalling less than
# BATCH_PACK_MIN_BYTES is written as loose files: a few small objects cost little that
# way, and a pack per small commit would multiply the packs every lookup walks until the
# next gc. Otherwise one pack (three fsyncs) replaces two fsyncs an object: a 1 MB LoRA
# checkpoint of ~80 tensors took ~0.3 s as loose files on this machine's disk.
BATCH_PACK_MIN_BYTES = 1 << 20
BATCH_PACK_MIN_OBJECTS = 16
# Packs with at most this many objects (a commit's) have their ids kept in one in-memory
# map, so a lookup costs one dict probe however many commit packs wait for the next gc,
# instead of one index search per pack.
SMALL_PACK_IDS = 4096
# The last record read from a pack is kept when at most this long (a commit's, a snapshot's).
LAST_READ_MAX = 1 << 16


def _open_listed(idx_path: Path) -> Pack:
    """Open a pack just listed. A remover (gc) unlinks the index, then the pack: opening
    between the two finds the index mapped and the pack gone. If the index is gone too,
    the pack was removed (FileNotFoundError, skipped by the caller); if it is back, it
    was rewritten: open it again. Only a pack missing under a present index is corrupt."""
    try:
        return Pack(idx_path)
    except CorruptObject:
        if not idx_path.exists():
            raise FileNotFoundError(idx_path) from None
        return Pack(idx_path)


class PackedObjectStore(ObjectStore):
    """Loose objects under `root/<xx>/`, packs under `root/pack/`.

    Attributes:
        root: the objects folder (`.ah/objects`).
        loose: the loose store inside it, where new objects are written.
        pack_dir: the folder of packs.
    """

    def __init__(self, root: Path, *, durable: bool = True):
        self.root = Path(root)
        self.loose = LooseObjectStore(self.root, durable=durable)
        self.pack_dir = self.root / PACK_DIR
        self._pack_dir_str = os.fspath(self.pack_dir)
        self.durable = durable
        self._packs: dict[str, Pack] = {}
        self._small_ids: dict[str, tuple[Pack, int]] = {}  # id -> small pack holding it, position there
        self._small_again: dict[str, list[Pack]] = {}  # id -> other small packs holding it
        self._big_packs: list[Pack] = []
        # Listed packs that cannot be opened (truncated, damaged index, pack file gone):
        # name -> why. They are left out, so the rest of the store stays readable and new
        # objects can still be written; a read of an object found nowhere else names them.
        self.unreadable_packs: dict[str, str] = {}
        self._listing: tuple | None = None
        self._lock = threading.Lock()
        # The open batch (see `batch()`) belongs to the thread that opened it: its
        # pending records (id -> record, not yet on disk), their size, and its pack once
        # the batch is sure to become one (_write_record). Other threads neither see nor
        # join it.
        self._batch_state = threading.local()
        self._last_read: tuple[str, bytes] | None = None  # (id, record) last read from a pack

    @property
    def _pending(self) -> dict[str, bytes] | None:
        return getattr(self._batch_state, "pending", None)

    @_pending.setter
    def _pending(self, value: dict[str, bytes] | None) -> None:
        self._batch_state.pending = value

    @property
    def _pending_bytes(self) -> int:
        return getattr(self._batch_state, "size", 0)

    @_pending_bytes.setter
    def _pending_bytes(self, value: int) -> None:
        self._batch_state.size = value

    @property
    def _stream(self) -> PackWriter | None:
        return getattr(self._batch_state, "stream", None)

    @_stream.setter
    def _stream(self, value: PackWriter | None) -> None:
        self._batch_state.stream = value

    # --- packs ---------------------------------------------------------------------------
    def packs(self) -> list[Pack]:
        """The packs as last listed (listed on first use)."""
        if self._listing is None:
            self.rescan()
        return list(self._packs.values())

    def rescan(self) -> bool:
        """Re-list the pack folder; True when the set of packs changed."""
        with self._lock:
            try:
                st = os.stat(self._pack_dir_str)
                stamp = (st.st_mtime_ns, st.st_ino, st.st_size)
            except FileNotFoundError:
                stamp = None
            if stamp == self._listing and self._listing is not None:
                return False
            names = pack_names(self._pack_dir_str)
            current = set(names)
            removed = [name for name in self._packs if name not in current]
            for name in removed:
                self._packs.pop(name).close()
            added, unreadable = [], {}
            for name in names:
                if name not in self._packs:
                    try:
                        self._packs[name] = _open_listed(self.pack_dir / name)
                    except FileNotFoundError:
                        continue  # removed by gc between listing and opening
                    except CorruptObject as exc:
                        unreadable[name] = str(exc)[len("corrupt object "):]  # "pack <file>: why"
                        continue
                    added.append(self._packs[name])
            self.unreadable_packs = unreadable
            # Removals (gc) are rare: rebuild the id map then; additions extend it. New
            # maps are swapped in whole, so lock-free readers see an old or a new one.
            small = {} if removed else dict(self._small_ids)
            # Ids that more than one small pack holds (concurrent commits storing one
            # object): their other packs, for `dependencies_of`.
            again: dict[str, list[Pack]] = {} if removed else {k: list(v) for k, v in self._small_again.items()}
            for pack in self._packs.values() if removed else added:
                if pack.count <= SMALL_PACK_IDS:
                    for i, oid in enumerate(pack.iter_ids()):
                        if small.setdefault(oid, (pack, i))[0] is not pack:
                            again.setdefault(oid, []).append(pack)
            self._small_ids = small
            self._small_again = again
            self._big_packs = [p for p in self._packs.values() if p.count > SMALL_PACK_IDS]
            self._listing = stamp
            return True

    def _lookup(self, oid: str) -> Pack | None:
        return self._locate(oid)[0]

    def _locate(self, oid: str) -> tuple[Pack | None, int | None]:
        """(pack, position in its index) of `oid`, or (None, None); no re-listing."""
        found = self._small_ids.get(oid)
        if found is not None:
            return found
        for pack in self._big_packs:
            i = pack.find(oid)
            if i is not None:
                return pack, i
        return None, None

    def _find_in_packs(self, oid: str) -> Pack | None:
        if self._listing is None:
            self.rescan()
        found = self._lookup(oid)
        if found is None:
            # Look again even when this thread's rescan saw no change: another thread's
            # rescan may have listed the pack a moment ago and published its ids since.
            self.rescan()
            found = self._lookup(oid)
        return found

    def dependencies_of(self, oid: str) -> tuple[ObjectId, ...]:
        """What every stored copy of `oid` needs (its header says; see ObjectStore).

        One object can be stored twice with different bases: two commits storing the same
        new tensor at once, or a writer whose freshening lost its race with gc and wrote
        it loose again. A read may get either copy, and gc may keep either, so what keeps
        an object alive must keep the dependencies of all of them."""
        records = []  # the head of each copy: its header is all that is parsed
        head = codec.RECORD_HEAD_MAX
        pending = self._pending
        if pending is not None and oid in pending:
            records.append(pending[oid][:head])
        with contextlib.suppress(ObjectNotFound):
            records.append(self.loose._read_record_head(oid))
        if self._listing is None:
            self.rescan()
        small = self._small_ids.get(oid)
        packs = ([small[0]] if small is not None else []) + self._small_again.get(oid, [])
        for pack in packs:
            records.append(pack.read_record(oid, head))
        for pack in self._big_packs:
            i = pack.find(oid)
            if i is not None:
                records.append(pack.record_at(oid, *pack.location(i), head))
        if not records:
            raise ObjectNotFound(oid)
        deps: list[ObjectId] = []
        for record in records:
            for dep in codec.dependencies(oid, record, self.find_prefix):
                if dep not in deps:
                    deps.append(ObjectId(dep))
        return tuple(deps)

    def release_pages(self) -> None:
        """Drop mapped pack pages read so far from this process (see Pack.release_pages)."""
        for pack in list(self._packs.values()):
            pack.release_pages()

    @contextmanager
    def scattered_reads(self):
        """A block that reads small records all over the packs (gc's and stats' walk): no
        read-ahead, and the pages read are dropped from this process when it ends."""
        packs = self.packs()
        for pack in packs:
            pack.advise_random(True)
        try:
            yield
        finally:
            for pack in packs:
                pack.advise_random(False)
            self.release_pages()

    def writer(self, *, dedup: bool = True) -> PackWriter:
        """A writer for a new pack in this store (bulk import, gc: see PackWriter's `dedup`)."""
        return PackWriter(self.pack_dir, durable=self.durable, dedup=dedup)

    def add_pack_written(self) -> None:
        """Make packs written since the last listing visible to this store at once."""
        self._listing = None
        self.rescan()

    @contextmanager
    def batch(self):
        """Hold the objects written inside the block; write them all when it ends.

        They go into one new pack (complete and indexed before this returns, so a ref
        moved afterwards never names an object a reader cannot find), or as loose files
        when they are few and small (BATCH_PACK_MIN_*). Leaving the block with an exception
        stores nothing (the pack's temp file is removed): no orphan objects from a refused
        or failed commit. The batch is the opening thread's: its writes join it, nested
        batches join the outer one; another thread's writes go on as outside a batch, and
        its own batch is its own. Two threads committing through one Registry thus never
        share a pack writer (one flushing while the other still added records lost
        commits and published packs that did not match their index).
        """
        if self._pending is not None:
            yield
            return
        self._pending = {}
        self._pending_bytes = 0
        try:
            yield
            self._flush(self._pending)
        except BaseException:
            if self._stream is not None:
                self._stream.abort()
            # Nothing of the batch was stored: forget what the base cache learnt from
            # it, or a later delta could be chosen against a chain that does not exist.
            self.base_cache.clear()
            raise
        finally:
            self._pending = None
            self._stream = None

    def _flush(self, pending: dict[str, bytes]) -> None:
        stream = self._stream
        if stream is None:  # few and small: loose files (BATCH_PACK_MIN_*)
            for oid, record in pending.items():
                self.loose._write_record(ObjectId(oid), record)
            return
        stream.finish()
        self.add_pack_written()

    def _hold(self, oid: ObjectId, record: bytes) -> None:
        """Add a record to the open batch. Once the batch is big enough to become a pack,
        its records stream into the pack's temp file as they come (the first at once),
        so the disk writes them while the rest of the commit is still being encoded and
        the fsync at the end has little left to wait for. The pack is invisible to
        readers until `_flush` finishes it; the records stay in `_pending` for them."""
        self._hold_many([(oid, record)])

    def _hold_many(self, written: list[tuple[ObjectId, bytes]]) -> None:
        """_hold of many (id, record) pairs, in order, handed to the pack in one call."""
        pending = self._pending  # this thread's batch: no lock needed
        ids, records = [], []
        for oid, record in written:
            if oid in pending:
                continue  # first wins: the base cache learnt this object's chain from it
            pending[oid] = record
            self._pending_bytes += len(record)
            ids.append(oid)
            records.append(record)
        if self._stream is None:
            if self._pending_bytes < BATCH_PACK_MIN_BYTES and len(pending) < BATCH_PACK_MIN_OBJECTS:
                return
            self._stream = self.writer(dedup=False)  # `pending` already holds each id once
            ids, records = list(pending), list(pending.values())
        if ids:
            self._stream.add_many(bytes.fromhex("".join(ids)), records)

    # --- contract primitives -------------------------------------------------------------
    def has(self, oid: str) -> bool:
        pending = self._pending
        if pending is not None and oid in pending:
            return True
        # The packs as listed cost no system call: ask them first. Then the loose folder,
        # then the packs after a re-list (gc may have moved a loose object into a new pack).
        if self._listing is not None and self._lookup(oid) is not None:
            return True
        return self.loose.has(oid) or self._find_in_packs(oid) is not None

    def _stored(self, oid: str) -> bool:
        # `has` without its re-list of the packs: one stat (the loose path) per new object
        # instead of two. Missed: an object gc moved from loose into a pack this process has
        # not listed yet; put then writes it again (see ObjectStore._stored).
        pending = self._pending
        if pending is not None and oid in pending:
            return True
        if self._listing is None:
            self.rescan()
        return self._lookup(oid) is not None or self.loose.has(oid)

    def _stored_many(self, oids: list[str]) -> list[bool]:
        # _stored of each, with one listing of the objects folder instead of a failed stat
        # of a loose path per new object: a loose object lies in its fan-out folder, so
        # one whose folder was not listed is not there (or came since: see _stored).
        pending = self._pending
        if self._listing is None:
            self.rescan()
        small, big = self._small_ids, self._big_packs
        fans: set[str] | None = None  # the objects folder's names, listed at the first miss
        listed = False
        out = []
        for oid in oids:
            if (pending is not None and oid in pending) or oid in small or (big and self._lookup(oid) is not None):
                out.append(True)
                continue
            if not listed:
                listed = True
                try:
                    fans = set(os.listdir(self.root))
                except OSError:  # not listable: ask each path, as _stored does
                    fans = None
            out.append((fans is None or oid[:2] in fans) and self.loose.has(oid))
        return out

    def _read_record(self, oid: str) -> bytes:
        return self._record_bytes(oid, None)

    def _read_record_head(self, oid: str) -> bytes:
        return self._record_bytes(oid, codec.RECORD_HEAD_MAX)

    def _record_bytes(self, oid: str, limit: int | None) -> bytes:
        """A record's bytes, or only its first `limit` (all of a shorter one)."""
        pending = self._pending
        if pending is not None and oid in pending:
            record = pending[oid]
            return record if limit is None else record[:limit]
        # Packs first, without re-listing: after gc or import nearly everything is packed,
        # and a failed open of a loose path per read cost more than the read (gc's mark
        # reads two objects per adapter). Then loose, then packs again after a re-list:
        # an object gc moved from a loose file into a new pack meanwhile is still found.
        last = self._last_read
        if last is not None and last[0] == oid:
            return last[1] if limit is None else last[1][:limit]
        if self._listing is not None:
            pack, i = self._locate(oid)
            if pack is not None:
                record = pack.read_record(oid, limit) if i is None else pack.record_at(oid, *pack.location(i), limit)
                # The walk of gc and stats asks for an object's dependency (a second
                # read of the same record) right after reading it. Small records only.
                if limit is None and len(record) <= LAST_READ_MAX:
                    self._last_read = (oid, record)
                return record
        try:
            return self.loose._read_record(oid) if limit is None else self.loose._read_record_head(oid)
        except ObjectNotFound:
            pass
        pack = self._find_in_packs(oid)
        if pack is None:
            unreadable = self.unreadable_packs
            if unreadable:  # it may be in one of them: say so rather than "not found"
                raise CorruptObject(oid, f"it is in no readable pack nor loose, and {len(unreadable)} pack(s) "
                                         f"cannot be read: {next(iter(unreadable.values()))}")
            raise ObjectNotFound(oid)
        return pack.read_record(oid, limit)

    def _write_record(self, oid: ObjectId, record: bytes) -> None:
        if self._pending is not None:
            self._hold(oid, record)
            return
        self.loose._write_record(oid, record)

    def _write_records(self, written: list[tuple[ObjectId, bytes]]) -> None:
        if self._pending is not None:
            self._hold_many(written)
            return
        for oid, record in written:
            self.loose._write_record(oid, record)

    def _freshen(self, oid: ObjectId) -> bool:
        pending = self._pending
        if pending is not None and oid in pending:
            return True
        if self.loose._freshen(oid):
            return True
        pack = self._find_in_packs(oid)
        if pack is None:
            return False
        try:
            os.utime(pack.path)
        except FileNotFoundError:
            return False  # gc replaced the pack: the caller writes a loose copy
        return True

    def iter_ids(self) -> Iterator[ObjectId]:
        seen = set(self.loose.iter_ids())
        for pack in self.packs():
            seen.update(pack.iter_ids())
        yield from sorted(seen)

    def find_prefix(self, prefix: str) -> list[ObjectId]:
        found = set(self.loose.find_prefix(prefix))
        self.rescan()
        for pack in self.packs():
            found.update(pack.find_prefix(prefix))
        return sorted(found)

    def remove(self, oid: str) -> None:
        """Remove a loose copy (objects in packs go only when gc replaces the pack)."""
        self.loose.remove(oid)
