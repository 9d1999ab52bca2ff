"""The object store: put canonical objects in, get verified objects out.

`ObjectStore` is the contract every backend meets (loose files now; packs and remotes
later), checked by one shared test class in tests/test_store_contract.py. Every read
re-hashes the canonical bytes and compares with the requested id, so a flipped bit on
disk, in a pack or from a remote is an error naming the object, never silent damage.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import threading
from collections import OrderedDict
from concurrent.futures import Executor
from pathlib import Path
from typing import Iterator

from . import codec
from .encoding import kernels
from .errors import AmbiguousRevision, CorruptObject, ObjectNotFound, UnsupportedFormat
from .fsutil import NotARegularFile, atomic_write, open_regular
from .encoding.chain import DeltaBase
from .objects import BLOB, COMMIT, SNAPSHOT, TAG, TENSOR, Commit, ObjectId, Snapshot, Tag, hash_object, header, parse_object, split_canonical


# A loose object's folder and file names: lowercase hex (2 and 62 digits). Only names that
# are ids count: temp files, and anything else put there by hand (`ah fsck` reports it),
# are not objects (gc and stats passed such a name on as an id and crashed on it).
_HEX_NAME = re.compile("[0-9a-f]+")


def _is_fan(name: str) -> bool:
    return len(name) == 2 and _HEX_NAME.fullmatch(name) is not None


def _is_rest(name: str) -> bool:
    return len(name) == 62 and _HEX_NAME.fullmatch(name) is not None


# The base cache grows (BaseCache.reserve) to at most this share of physical memory.
MAX_MEMORY_SHARE = 1 / 8


# Where a Linux container's memory limit is read (cgroup v2, then v1).
_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


@functools.cache
def _memory_ceiling() -> int:
    """MAX_MEMORY_SHARE of the memory this process may use: the machine's, or its
    container's limit when that is lower (a share of the host's would overrun it)."""
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # no sysconf: assume a small machine
        memory = 8 << 30
    for path in _CGROUP_LIMITS:
        try:
            with open(path) as fh:
                memory = min(memory, int(fh.read().strip()))
            break
        except (OSError, ValueError):  # absent, or "max": no limit there
            continue
    return int(memory * MAX_MEMORY_SHARE)


class BaseCache:
    """Bounded LRU of verified tensor bodies that deltas may need as their base.

    Reading a tensor at chain depth d decodes d+1 records; a training loop that commits
    checkpoint after checkpoint, or a checkout of consecutive revisions, would decode the
    same bases again and again. Only bodies that were hashed against their id (on put or
    on a verified read) enter, and only delta decoding and delta-base selection look
    here: a caller's own `read` always goes to the backend and re-hashes.

    A committed file's tensors enter as views of the bytes the commit read (add_written):
    copying them cost a commit ~2 ms of its 5 MB. The budget counts what is really held,
    so a view counts its whole underlying bytes object, once, while any entry uses it.
    """

    def __init__(self, max_bytes: int = 64 << 20):
        self.max_bytes = max_bytes
        # id -> (body, chain depth, id of its delta base or None)
        self._items: OrderedDict[str, tuple[bytes | memoryview, int, str | None]] = OrderedDict()
        self._bytes = 0
        # id(bytes object) -> [that object, entries whose body views it]
        self._held: dict[int, list] = {}
        self._lock = threading.Lock()

    def reserve(self, nbytes: int) -> None:
        """Raise the budget to at least `nbytes`, up to MAX_MEMORY_SHARE of the machine's
        memory; it never shrinks. A commit's working set is three revisions of its
        adapter: its own tensors (the next commit's bases), its parent's (its bases) and
        its grandparent's (the second extrapolation source). The fixed 64 MB evicted them
        for adapters over ~20 MB, and each commit then decoded its bases back from the
        store: 90 ms of a 30 MB fp32 checkpoint's 210 ms commit."""
        with self._lock:
            self.max_bytes = max(self.max_bytes, min(nbytes, _memory_ceiling()))

    def get(self, oid: str) -> tuple[bytes | memoryview, int, str | None] | None:
        with self._lock:
            item = self._items.get(oid)
            if item is not None:
                self._items.move_to_end(oid)
            return item

    def add(self, oid: str, body: bytes, depth: int, base: str | None = None) -> None:
        self.add_written([(oid, body, depth, base)])

    def add_written(self, items: list[tuple[str, bytes | memoryview, int, str | None]]) -> None:
        """add() of many (id, body, depth, base), under one lock. A body that views a bytes
        object of at most half the budget (a commit's tensors view the file it read), when
        these items use at least half of that object, is kept as a view; any other is
        copied to bytes when it enters."""
        limit = self.max_bytes // 4
        with self._lock:
            entries, held = self._items, self._held
            # What these items would use of each owner: one is held whole only when they use
            # most of it (a file whose tensors mostly exist already, say frozen layers, is
            # copied: held whole it crowded the last revisions' tensors out of the cache).
            used: dict[int, int] = {}
            for oid, body, _, _ in items:
                if isinstance(body, memoryview) and len(body) <= limit and oid not in entries:
                    used[id(body.obj)] = used.get(id(body.obj), 0) + body.nbytes
            for oid, body, depth, base in items:
                if len(body) > limit or oid in entries:
                    continue
                owner = body.obj if isinstance(body, memoryview) else None
                if (type(owner) is bytes and len(owner) <= self.max_bytes // 2 and body.contiguous
                        and body.format == "B" and (id(owner) in held or 2 * used[id(owner)] >= len(owner))):
                    body = memoryview(body)  # a view of our own: the caller may release theirs
                    share = held.get(id(owner))
                    if share is None:
                        held[id(owner)] = [owner, 1]
                        self._bytes += len(owner)
                    else:
                        share[1] += 1
                else:
                    body = bytes(body)
                    self._bytes += len(body)
                entries[oid] = (body, depth, base)
                while self._bytes > self.max_bytes and entries:
                    self._forget(entries.popitem(last=False)[1][0])

    def _forget(self, body: bytes | memoryview) -> None:
        """Take a body that left the cache off the budget (a view: its owner, with its last entry)."""
        if isinstance(body, memoryview):
            share = self._held[id(body.obj)]
            share[1] -= 1
            if not share[1]:
                del self._held[id(body.obj)]
                self._bytes -= len(share[0])
        else:
            self._bytes -= len(body)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._held.clear()
            self._bytes = 0


class ObjectStore:
    """Backend contract. Subclasses implement the four primitives below."""

    # (id, body) of a `blob` used as a zstd dictionary for new snapshots and commits
    # (set by bulk import, where a million alike small JSON objects share most bytes).
    structured_dict: tuple[str, bytes] | None = None

    @property
    def base_cache(self) -> BaseCache:
        # Created on first use so that subclasses need not call a base __init__.
        cache = self.__dict__.get("_base_cache")
        if cache is None:
            cache = self.__dict__["_base_cache"] = BaseCache()
        return cache

    @property
    def damaged_bases(self) -> set[str]:
        """Ids of tensors found damaged when offered as delta bases (see _delta_base)."""
        return self.__dict__.setdefault("_damaged_bases", set())

    # --- primitives ---------------------------------------------------------------
    def has(self, oid: str) -> bool:
        raise NotImplementedError

    def _read_record(self, oid: str) -> bytes:
        """Stored record bytes for `oid`; raise ObjectNotFound if absent."""
        raise NotImplementedError

    def _read_record_head(self, oid: str) -> bytes:
        """The first codec.RECORD_HEAD_MAX bytes of `oid`'s record (all of a shorter one):
        every header a dependency walk (gc, stats, fsck) parses. Backends override it to
        copy no more than that."""
        return self._read_record(oid)[: codec.RECORD_HEAD_MAX]

    def _write_record(self, oid: ObjectId, record: bytes) -> None:
        raise NotImplementedError

    def _write_records(self, written: list[tuple[ObjectId, bytes]]) -> None:
        """_write_record of each (id, record), in order (a backend may take them at once)."""
        for oid, record in written:
            self._write_record(oid, record)

    def iter_ids(self) -> Iterator[ObjectId]:
        raise NotImplementedError

    def _stored(self, oid: str) -> bool:
        """Whether `put` can skip storing `oid`: `has`, except that a backend may miss an
        object another process stored since it last looked (a pack gc or a concurrent
        commit just wrote). `put` then stores a second copy, which every reader and gc
        already accept, so a store may answer this without the system calls `has` needs
        to be exact."""
        return self.has(oid)

    def _stored_many(self, oids: list[str]) -> list[bool]:
        """_stored of each id (a backend may answer them with fewer system calls)."""
        return [self._stored(oid) for oid in oids]

    def _freshen(self, oid: ObjectId) -> bool:
        """Mark an existing object as just written (a put found it already stored).

        gc keeps unreachable objects younger than its grace period; a commit that reuses
        an old unreachable object must make it young again, or gc could remove it between
        this put and the ref update that makes it reachable. Backends without ages skip it.
        False when the object vanished since `has` (gc pruned it): the caller writes it again.
        """
        return True

    def batch(self):
        """A block whose writes may be grouped (one pack per commit in the packed store);
        every object is stored once the block ends. Here: written one by one at once."""
        return contextlib.nullcontext()

    # --- shared behaviour -----------------------------------------------------------
    def put(
        self, obj_type: str, body: bytes | memoryview, *, dtype: str | None = None, delta_base: str | None = None
    ) -> ObjectId:
        """Store an object (no-op when present) and return its id.

        Hints only change how a tensor is stored, never its id: `dtype` (safetensors
        name) lets it be cut into byte planes; `delta_base` names a tensor (usually the
        same-named one of the parent revision) it may be stored as a delta against.
        """
        return self.put_ex(obj_type, body, dtype=dtype, delta_base=delta_base)[0]

    def put_ex(
        self, obj_type: str, body: bytes | memoryview, *, dtype: str | None = None, delta_base: str | None = None
    ) -> tuple[ObjectId, bool]:
        """Like put, and also say whether the object was new to this store."""
        oid = hash_object(obj_type, body)
        if self._stored(oid) and self._freshen(oid):
            return oid, False
        record = self.encode_record(oid, obj_type, body, dtype=dtype, delta_base=delta_base)
        self._write_record(oid, record)
        if obj_type == TENSOR and dtype is not None:
            self._remember_written(oid, body, record)
        return oid, True

    def _remember_written(self, oid: str, body: bytes | memoryview, record: bytes, base: DeltaBase | None = None) -> None:
        """Offer a tensor just written to the base cache with the chain its record names,
        so the next revision's delta against it needs no read. `base`, when the caller
        offered the record's writer one, spares parsing the record for it."""
        if base is not None:
            delta = record[codec.ENCODING_AT] in codec.DELTA_ENCODINGS
            depth, base_id = (base.depth + 1, base.oid) if delta else (0, None)
        else:
            ref = codec.delta_ref(oid, record)
            depth, base_id = (ref.depth, ref.base) if ref else (0, None)
        self.base_cache.add(oid, bytes(body), depth, base_id)

    def put_tensors(
        self, items: list[tuple[bytes | memoryview, str | None, str | None]], pool: Executor | None = None, workers: int = 1
    ) -> list[tuple[ObjectId, bool]]:
        """put_ex of many tensors, given as (body, dtype, delta base id), in three phases.

        The ids are hashed in one call (native: on `workers` C threads); existence is
        asked of the store for all of them at once (_stored_many) and the delta bases are
        looked up one by one; then codec.encode_tensors makes the records (one native call
        on `workers` C threads; `pool` serves only its Python fallback); then they are
        written in order in one call (_write_records: one hand-over to the batch's pack)
        and the base cache learns them under one lock.
        """
        oids = kernels.hash_objects(TENSOR, [body for body, _, _ in items], workers)
        stored = self._stored_many(oids)
        results: list[tuple[ObjectId, bool]] = []
        todo: list[int] = []
        seen: set[str] = set()
        for i, oid in enumerate(oids):
            new = oid not in seen and not (stored[i] and self._freshen(oid))
            seen.add(oid)
            results.append((oid, new))
            if new:
                todo.append(i)
        self._fetch_bases([(items[i][2], len(items[i][0])) for i in todo if items[i][2] and items[i][1] is not None], workers)
        jobs = []
        for i in todo:
            body, dtype, base_id = items[i]
            base = self._delta_base(oids[i], base_id, len(body)) if base_id and dtype is not None else None
            jobs.append((header(TENSOR, len(body)), body, dtype, base))
        records = codec.encode_tensors(jobs, workers, pool)
        self._write_records([(oids[i], record) for i, record in zip(todo, records)])
        # What the base cache learns (as _remember_written): a record is a delta only
        # when its job offered a base.
        delta_at, delta_encodings = codec.ENCODING_AT, codec.DELTA_ENCODINGS
        self.base_cache.add_written([
            (oids[i], body, base.depth + 1, base.oid) if base is not None and record[delta_at] in delta_encodings
            else (oids[i], body, 0, None)
            for i, (_, body, dtype, base), record in zip(todo, jobs, records) if dtype is not None
        ])
        return results

    def _fetch_bases(self, bases: list[tuple[str, int]], workers: int) -> None:
        """Bring the delta bases a file's tensors name into the base cache in one batched
        read (read_tensors: every level of their chains at once), as far as half the cache
        holds them. A fresh process (each `ah commit` from the command line) found none
        there and decoded each base's chain one record at a time: ~240 ms of a 5 MB
        checkpoint's commit at chain depth 6. Nothing is decided here: a base this read
        cannot bring (missing, damaged, not a tensor) is looked up one by one by
        _delta_base as before, which keeps its rules."""
        if kernels.read_tensors is None:  # without the native codec it would read one by one anyway
            return
        cache = self.base_cache
        wanted, room = [], cache.max_bytes // 2
        for base_id, size in dict.fromkeys(bases):
            if size > room:
                break
            if cache.get(base_id) is None:
                wanted.append(base_id)
                room -= size
        if wanted:
            try:
                self.read_tensors(wanted, workers)
            except (ObjectNotFound, CorruptObject, UnsupportedFormat):
                pass

    def encode_record(
        self, oid: str, obj_type: str, body: bytes | memoryview, *, dtype: str | None = None, delta_base: str | None = None
    ) -> bytes:
        """The stored record for an object, choosing the smallest encoding the hints allow."""
        head = header(obj_type, len(body))
        if obj_type in (SNAPSHOT, COMMIT) and self.structured_dict is not None:
            plain = codec.encode([head, body])
            primed = codec.encode_with_dict([head, body], *self.structured_dict)
            return primed if len(primed) < len(plain) else plain
        if obj_type != TENSOR or dtype is None:
            return codec.encode([head, body])
        base = self._delta_base(oid, delta_base, len(body)) if delta_base else None
        return codec.encode_tensor(head, body, dtype, base)

    def _delta_base(self, oid: str, base_id: str, length: int) -> DeltaBase | None:
        """The base for a delta, or None when it is unusable (missing, damaged, other size,
        chain full).

        A damaged base (its record or one below it) leaves the tensor stored whole and its
        id in `damaged_bases`, for the commit to tell the user: refusing the commit instead
        stopped every later commit of a training run on one bad object in its parent.
        When the base is itself a delta, its own base's body comes along (`prev`) so the
        codec may diff against their extrapolation (encoding 4)."""
        if base_id == oid:
            return None
        try:
            body, depth, prev_id = self._tensor_for_delta(base_id)
        except ObjectNotFound:
            return None
        except (CorruptObject, UnsupportedFormat):
            self.damaged_bases.add(base_id)
            return None
        if body is None or len(body) != length or depth >= codec.MAX_CHAIN:
            return None
        prev = None
        if prev_id is not None:
            try:
                prev_body = self._tensor_for_delta(prev_id)[0]
            except (ObjectNotFound, CorruptObject, UnsupportedFormat):
                prev_body = None
            prev = prev_body if prev_body is not None and len(prev_body) == length else None
        return DeltaBase(base_id, body, depth, prev, prev_id if prev is not None else None)

    def _tensor_for_delta(self, oid: str) -> tuple[bytes | None, int, str | None]:
        """(body, depth, its delta base) of a tensor, from the base cache or a verified
        read; body None when the object is not a tensor."""
        cached = self.base_cache.get(oid)
        if cached is not None:
            return cached
        obj_type, body, depth = self._read_verified(oid)
        if obj_type != TENSOR:
            return None, 0, None
        return body, depth, self.delta_base_of(oid) if depth else None

    def read_tensor(self, oid: str) -> bytes:
        """The body of a stored tensor, verified; CorruptObject when the id names another type."""
        obj_type, body = self.read(oid)
        if obj_type != TENSOR:
            raise CorruptObject(oid, f"expected a tensor, found a {obj_type}")
        return body

    def read_tensors(self, oids: list[str], threads: int = 1) -> list[bytes]:
        """read_tensor of many tensors (a checkout's), the same bodies and errors.

        With the native codec their plane and delta records are decoded and re-hashed in
        native calls on `threads` C threads without the GIL, one call per level of their
        delta chains: the bases they need come from the base cache (a checkout of the next
        revision finds the last one's there), or are decoded here first, all of a level
        at once (a cold checkout of a deep chain was one Python-driven decode per record
        and level). Whatever those calls do not take (other encodings, a base that cannot
        be read) or find damaged is read again one by one by read_tensor, which raises the
        exact error."""
        return [body for run in self.iter_read_tensors(oids, threads) for body in run]

    def iter_read_tensors(self, oids: list[str], threads: int = 1) -> Iterator[list[bytes]]:
        """read_tensors' bodies in order, a run of them at a time.

        While every base a record needs is at hand (the base cache holds the revision
        checked out before), the tensors go in runs of about READ_RUN_BYTES: a run is
        handed to a kept C thread (kernels.read_tensors_start) while this thread plans the
        next one, joins it (decoding what the C thread has not taken), hands over the next
        and only then gives the run to the caller, who writes it while the next decodes.
        The first record that needs a base decoded first ends the runs: the rest is
        planned and decoded level by level (read_tensors above) and comes as one list.
        While the caller holds a run, the kept C threads are its (another thread's batch
        call runs alone): take the runs without pausing long, or close the iterator."""
        native, start = kernels.read_tensors, kernels.read_tensors_start
        if native is None:
            yield [self.read_tensor(oid) for oid in oids]
            return
        plan = _ReadPlan(self)
        add, budget, nodes = plan.add, codec.READ_BUDGET, plan.order
        memo = plan.bodies
        decoded: set[str] = set()  # what was read from its own record (memo also holds cached sources)
        done = handed = 0  # oids[:done] given to the caller; nodes[:handed] to a native call
        pending = None  # (end of its run in oids, its nodes, the PendingRead)
        run_bytes, i = 0, 0
        try:
            while start is not None and i < len(oids):
                before = len(nodes)
                add(oids[i], budget, requested=True)
                i += 1
                for node in nodes[before:]:
                    if node.height > 1:
                        break
                    run_bytes += node.plan[1]
                else:
                    if run_bytes < READ_RUN_BYTES and i < len(oids):
                        continue
                    level, jobs = self._jobs(nodes[handed:], memo)
                    handed, run_bytes = len(nodes), 0
                    end = self._finish(pending, memo, decoded) if pending is not None else done
                    pending = (i, level, start(jobs, threads) if jobs else None)
                    if done < end:
                        yield [memo[oid] if oid in decoded else self.read_tensor(oid) for oid in oids[done:end]]
                        done = end
                    continue
                break  # a base to decode first: the rest level by level
            if pending is not None:
                self._finish(pending, memo, decoded)
            if i < len(oids) or handed < len(nodes):
                for oid in dict.fromkeys(oids[i:]):  # in order: the plan must not depend on set order
                    add(oid, budget, requested=True)
                self._decode_levels(nodes[handed:], memo, decoded, set(oids), threads)
            # The rest one by one, in order: the first bad id raises, as it would one by one.
            if done < len(oids):
                yield [memo[oid] if oid in decoded else self.read_tensor(oid) for oid in oids[done:]]
        finally:
            pending = None  # a run still with the kept threads: joined and let go here, not when the frame is

    def _jobs(self, nodes: list[_ReadNode], memo: dict[str, bytes]) -> tuple[list[_ReadNode], list[tuple]]:
        """The native jobs of the nodes whose sources are in memo, and those nodes."""
        level, jobs = [], []
        for node in nodes:
            for source in node.sources:
                if source not in memo:
                    break
            else:
                job = node.job(self, memo)
                if job is not None:
                    level.append(node)
                    jobs.append(job)
        return level, jobs

    def _finish(self, pending: tuple, memo: dict[str, bytes], decoded: set[str]) -> int:
        """Wait for a run handed to a C thread and learn it; the end of its run in oids."""
        end, level, handle = pending
        self._learn(level, handle.wait() if handle is not None else (), memo, decoded)
        return end

    def _learn(self, level: list[_ReadNode], bodies, memo: dict[str, bytes], decoded: set[str]) -> None:
        """Keep what a native call decoded (None: damaged, read one by one later) and teach
        the base cache its chains, under one lock."""
        learnt = []
        for node, body in zip(level, bodies):
            if body is not None:
                memo[node.oid] = body
                decoded.add(node.oid)
                learnt.append((node.oid, body, node.plan[6], node.plan[5]))
        self.base_cache.add_written(learnt)

    def _decode_levels(
        self, todo: list[_ReadNode], memo: dict[str, bytes], decoded: set[str], wanted: set[str], threads: int
    ) -> None:
        """Decode planned nodes a level per native call, lowest first; a base no later
        level needs leaves memory unless it was asked for."""
        levels: dict[int, list[_ReadNode]] = {}
        for node in todo:
            levels.setdefault(node.height, []).append(node)
        uses: dict[str, int] = {}
        if len(levels) > 1:  # one level (the bases at hand): no base to let go of early
            for node in todo:
                for source in node.sources:
                    uses[source] = uses.get(source, 0) + 1
        native = kernels.read_tensors
        for height in sorted(levels):
            level, jobs = self._jobs(levels[height], memo)
            self._learn(level, native(jobs, threads) if jobs else (), memo, decoded)
            if uses:
                for node in levels[height]:
                    for source in node.sources:
                        uses[source] -= 1
                        if not uses[source] and source not in wanted:
                            memo.pop(source, None)

    def read(self, oid: str) -> tuple[str, bytes]:
        """(type, body) of a stored object, verified against its id."""
        obj_type, body, _depth = self._read_verified(oid)
        return obj_type, body

    def _read_verified(self, oid: str, budget: int = codec.READ_BUDGET, memo: dict | None = None) -> tuple[str, bytes, int]:
        """(type, body, declared delta depth) of an object, re-hashed; reading at most
        `budget` levels of bases. `memo` holds the tensors this read already decoded, so
        a chain of extrapolated deltas (each naming two older tensors) reads each once
        whatever the base cache admits."""
        record = self._read_record(oid)
        memo = {} if memo is None else memo

        def load_base(base_id: str, base_budget: int) -> bytes:
            body = memo.get(base_id)
            if body is not None:
                return body
            cached = self.base_cache.get(base_id)
            if cached is not None:
                return cached[0]
            try:
                base_type, body, _ = self._read_verified(base_id, base_budget, memo)
            except ObjectNotFound:
                raise CorruptObject(oid, f"its delta base {base_id} is missing from the store") from None
            if base_type != TENSOR:
                raise CorruptObject(oid, f"its delta base {base_id} is a {base_type}, not a tensor")
            memo[base_id] = body
            return body

        def load_dict(dict_id: str) -> bytes:
            cached = self.__dict__.setdefault("_dicts", {}).get(dict_id)
            if cached is not None:
                return cached
            try:
                dict_type, dict_body, _ = self._read_verified(dict_id, 0)
            except ObjectNotFound:
                raise CorruptObject(oid, f"its compression dictionary {dict_id} is missing from the store") from None
            if dict_type != BLOB:
                raise CorruptObject(oid, f"its compression dictionary {dict_id} is a {dict_type}, not a blob")
            self._dicts[dict_id] = dict_body
            return dict_body

        def verify(canonical: bytes) -> bool:  # which encoding-5 dictionary candidate is the one
            try:
                return hash_object(*split_canonical(oid, canonical)) == oid
            except CorruptObject:
                return False

        canonical, ref = codec.decode_ex(oid, record, load_base, budget, load_dict, self._dict_candidates, verify)
        obj_type, body = split_canonical(oid, canonical)
        if hash_object(obj_type, body) != oid:
            raise CorruptObject(oid, "content does not hash to its id")
        body = bytes(body)
        depth = ref.depth if ref else 0
        if obj_type == TENSOR:
            self.base_cache.add(oid, body, depth, ref.base if ref else None)
        return obj_type, body, depth

    def _dict_candidates(self, prefix: str) -> Iterator[tuple[str, bytes | Exception]]:
        """(id, verified body) of each blob whose id starts with `prefix` (an encoding-5
        record names its dictionary so), dictionaries read before first, then the others
        the store lists; a match that is not a self-contained blob comes with the error."""
        known = self.__dict__.setdefault("_dicts", {})
        tried = set()
        for dict_id, body in list(known.items()):
            if dict_id.startswith(prefix):
                tried.add(dict_id)
                yield dict_id, body
        for dict_id in self.find_prefix(prefix):
            if dict_id in tried:
                continue
            try:
                if not codec.self_contained(dict_id, self._read_record_head(dict_id)):
                    raise CorruptObject(dict_id, "is stored in an encoding that needs another object")
                dict_type, body, _ = self._read_verified(dict_id, 0)
                if dict_type != BLOB:
                    raise CorruptObject(dict_id, f"is a {dict_type}, not a blob")
            except (ObjectNotFound, CorruptObject) as exc:
                yield dict_id, exc
                continue
            known[dict_id] = body
            yield dict_id, body

    def dependencies_of(self, oid: str) -> tuple[ObjectId, ...]:
        """The objects a stored record cannot be decoded without (delta base, the second
        extrapolation source, or a compression dictionary: every match of its prefix),
        read from its header."""
        return tuple(ObjectId(d) for d in codec.dependencies(oid, self._read_record_head(oid), self.find_prefix))

    def delta_base_of(self, oid: str) -> ObjectId | None:
        """The object a stored record depends on (its delta base), read from the record header."""
        ref = codec.delta_ref(oid, self._read_record_head(oid))
        return ObjectId(ref.base) if ref else None

    def get(self, oid: str, expect_type: str | None = None):
        obj_type, body = self.read(oid)
        if expect_type is not None and obj_type != expect_type:
            raise CorruptObject(oid, f"expected a {expect_type}, found a {obj_type}")
        return parse_object(oid, obj_type, body)

    def get_commit(self, oid: str) -> Commit:
        return self.get(oid, COMMIT)

    def get_snapshot(self, oid: str) -> Snapshot:
        return self.get(oid, SNAPSHOT)

    def get_tag(self, oid: str) -> Tag:
        return self.get(oid, TAG)

    def object_type(self, oid: str) -> str:
        return self.read(oid)[0]

    def find_prefix(self, prefix: str) -> list[ObjectId]:
        """Ids starting with `prefix` (lowercase hex)."""
        return [oid for oid in self.iter_ids() if oid.startswith(prefix)]

    def resolve_prefix(self, prefix: str) -> ObjectId | None:
        matches = self.find_prefix(prefix)
        if len(matches) > 1:
            shown = ", ".join(m[:12] for m in sorted(matches)[:5])
            raise AmbiguousRevision(f"short id {prefix} is ambiguous: it matches {shown}")
        return matches[0] if matches else None


class LooseObjectStore(ObjectStore):
    """One file per object under `objects/<2 hex>/<62 hex>`, written atomically."""

    def __init__(self, root: Path, *, durable: bool = True):
        self.root = Path(root)
        self.durable = durable
        self._prefix = os.path.join(os.fspath(self.root), "")  # "<root>/"

    def _path(self, oid: str) -> Path:
        return self.root / oid[:2] / oid[2:]

    def _path_str(self, oid: str) -> str:
        # Plain strings on the per-object paths: a commit asks `has` once per tensor, nearly
        # always for an object that is not there, and pathlib spent 15 of its 20 us a miss.
        return f"{self._prefix}{oid[:2]}/{oid[2:]}"

    def has(self, oid: str) -> bool:
        return os.path.isfile(self._path_str(oid))

    def _read_record(self, oid: str, limit: int = -1) -> bytes:
        try:
            fd = open_regular(self._path_str(oid))
        except (FileNotFoundError, NotADirectoryError):
            raise ObjectNotFound(oid) from None
        except (NotARegularFile, IsADirectoryError):
            raise CorruptObject(oid, "its loose file is not a regular file") from None
        with open(fd, "rb") as fh:
            return fh.read(limit)

    def _read_record_head(self, oid: str) -> bytes:
        return self._read_record(oid, codec.RECORD_HEAD_MAX)

    def _freshen(self, oid: ObjectId) -> bool:
        try:
            os.utime(self._path_str(oid))
        except FileNotFoundError:
            return False
        return True

    def _write_record(self, oid: ObjectId, record: bytes) -> None:
        path = self._path(oid)
        path.parent.mkdir(exist_ok=True)
        atomic_write(path, record, durable=self.durable)

    def iter_ids(self) -> Iterator[ObjectId]:
        if not self.root.is_dir():
            return
        for fan in sorted(os.listdir(self.root)):
            if _is_fan(fan):
                for rest in sorted(os.listdir(self.root / fan)):
                    if _is_rest(rest):
                        yield ObjectId(fan + rest)

    def iter_files(self) -> Iterator[tuple[ObjectId, Path]]:
        """(id, path) of every object file, unsorted (gc and stats stat them)."""
        if not self.root.is_dir():
            return
        for fan in os.listdir(self.root):
            if _is_fan(fan):
                folder = self.root / fan
                for name in os.listdir(folder):
                    if _is_rest(name):
                        yield ObjectId(fan + name), folder / name

    def find_prefix(self, prefix: str) -> list[ObjectId]:
        # Only the one fan-out folder can hold matches: no full scan.
        fan_dir = self.root / prefix[:2]
        if len(prefix) < 2 or not fan_dir.is_dir():
            return super().find_prefix(prefix) if len(prefix) < 2 else []
        rest = prefix[2:]
        return [ObjectId(prefix[:2] + n) for n in sorted(os.listdir(fan_dir)) if n.startswith(rest) and _is_rest(n)]

    def remove(self, oid: str) -> None:
        self._path(oid).unlink(missing_ok=True)


# A checkout's tensors whose bases are at hand are decoded in runs of about this many bytes
# (iter_read_tensors): a C thread decodes one while Python plans the next and writes the last.
READ_RUN_BYTES = 512 << 10


class _ReadNode:
    """A tensor record read_tensors decodes natively: its read_plan, the ids of the bodies
    it needs (delta base, extrapolation source), its level (1 + theirs; 1 when it needs
    none, or only bodies at hand) and the read budget its chain needs (0 for planes, else
    1 + its sources'; a body at hand needs none). A level-1 record (a checkout of the next
    revision: every base in the base cache) is kept from planning for the job, which the
    first native call takes at once; a higher one is read again for its job: a plan of
    deep chains would otherwise hold every record of every level. (Reading only heads at
    planning cost a warm checkout a second lookup per tensor and gained a cold one
    nothing measurable.)"""

    __slots__ = ("oid", "plan", "height", "need", "sources", "record")

    def __init__(self, oid: str, plan: tuple, height: int, need: int, record: bytes | None):
        self.oid, self.plan, self.height, self.need, self.record = oid, plan, height, need, record
        base_id, prev_id = plan[5], plan[7]
        self.sources = () if base_id is None else (base_id,) if prev_id is None else (base_id, prev_id)

    def job(self, store: ObjectStore, bodies: dict[str, bytes]) -> tuple | None:
        """The native job, or None when the record cannot be read now (gc moved or removed
        it: the one-by-one read then says what is wrong; a record that changed under the
        plan fails the native checks or the re-hash and is read one by one too)."""
        record, self.record = self.record, None
        if record is None:
            try:
                record = store._read_record(self.oid)
            except (ObjectNotFound, CorruptObject, UnsupportedFormat, OSError):
                return None
            # Read again: this may be another copy of the object (stored twice, with
            # other bases) or damaged, whose layout the native call would refuse whole.
            if kernels.read_plan(record) != self.plan:
                return None
        pos, body_len, width, rotate, kind, base_id, _depth, prev_id = self.plan
        base = bodies[base_id] if base_id is not None else None
        prev = bodies[prev_id] if prev_id is not None else None
        return (self.oid, record, pos, body_len, width, rotate, base, kind, prev)


class _ReadPlan:
    """Which records read_tensors decodes, level by level, and the bodies at hand.

    The budget rules are _read_verified's: a delta record spends one level and its
    sources get the rest, so a hand-made cycle ends; a node planned once is reused only
    where the budget left covers what its chain needs. A requested tensor is always
    decoded from its record (a caller's read re-hashes what is stored), a source may come
    from the base cache. A source that read_plan cannot plan (another encoding) is read
    verified one by one, as before. What cannot be planned is left out: read_tensors then
    reads it one by one, which raises the exact error."""

    def __init__(self, store: ObjectStore):
        self.store = store
        self._cache = store.base_cache
        self.nodes: dict[str, _ReadNode] = {}
        self.order: list[_ReadNode] = []  # the nodes as planned: a base before what needs it
        self.bodies: dict[str, bytes] = {}
        self._refused: dict[str, int] = {}  # id -> the largest budget it was refused with
        self._open: set[str] = set()  # the ids being planned (a cycle ends here)

    def add(self, oid: str, budget: int, *, requested: bool = False, length: int | None = None) -> tuple[int, int] | None:
        """(level after which `oid`'s body is available, 0 when at hand now; the budget its
        chain needs), or None when it cannot be planned within `budget`."""
        node = self.nodes.get(oid)
        if node is None and not requested:
            body = self._at_hand(oid)
            if body is not None:
                return (0, 0) if length is None or len(body) == length else None
        if node is not None:
            if node.need > budget or (length is not None and node.plan[1] != length):
                return None
            return node.height, node.need
        if oid in self._open or self._refused.get(oid, -1) >= budget:
            return None
        planned = self._plan(oid, budget, requested, length)
        if planned is None:
            self._refused[oid] = max(budget, self._refused.get(oid, -1))
        return planned

    def _at_hand(self, oid: str) -> bytes | None:
        """The body of `oid` when this plan holds it or the base cache does."""
        body = self.bodies.get(oid)
        if body is None:
            cached = self._cache.get(oid)
            if cached is not None:
                body = self.bodies[oid] = cached[0]
        return body

    def _plan(self, oid: str, budget: int, requested: bool, length: int | None) -> tuple[int, int] | None:
        store = self.store
        try:
            record = store._read_record(oid)
        except (ObjectNotFound, CorruptObject, UnsupportedFormat, OSError):
            # left to the one-by-one read, which raises it in the caller's order (an I/O
            # error on a later tensor must not overtake damage found on an earlier one)
            return None
        plan = kernels.read_plan(record)
        if plan is None:
            if requested:
                return None
            try:  # a source in another encoding, read as _read_verified reads it
                obj_type, body, _ = store._read_verified(oid, budget)
            except (ObjectNotFound, CorruptObject, UnsupportedFormat):
                return None
            if obj_type != TENSOR or (length is not None and len(body) != length):
                return None
            self.bodies[oid] = body
            return 0, 0
        body_len, base_id, prev_id = plan[1], plan[5], plan[7]
        if length is not None and body_len != length:
            return None
        height, need = 1, 0
        if base_id is not None:
            if budget < 1:
                return None
            sources = (base_id,) if prev_id is None else (base_id, prev_id)
            nodes, at_hand = self.nodes, self._at_hand
            for source in sources:  # all at hand, as add would say (0, 0) for each?
                body = None if source in nodes else at_hand(source)
                if body is None:
                    break
                if len(body) != body_len:
                    return None
            if body is not None:
                need = 1
            else:
                record = None  # sources to plan first, maybe a deep chain: not held meanwhile
                self._open.add(oid)
                try:
                    for source in sources:
                        below = self.add(source, budget - 1, length=body_len)
                        if below is None:
                            return None
                        height, need = max(height, below[0] + 1), max(need, below[1] + 1)
                finally:
                    self._open.discard(oid)
        node = self.nodes[oid] = _ReadNode(oid, plan, height, need, record)  # None unless at level 1
        self.order.append(node)
        return height, need
