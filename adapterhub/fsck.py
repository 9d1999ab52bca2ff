"""`ah fsck`: re-hash every stored copy of every object and check what the refs reach.

Checked, read-only (nothing is repaired, created or locked, so a concurrent commit or gc
goes on as usual):

1. Every pack and its index against their checksums (`Pack.verify`); a pack that cannot
   be opened at all (truncated, bad magic) is one finding and its objects go unchecked.
2. Every stored copy of every object: each loose file and each pack's record of it (an
   object may be stored loose and packed, or in two packs) is decoded from that copy and
   re-hashed against its id, with the store's own verified reads (`_read_verified`;
   tensors in batches through `read_tensors`, as a checkout reads them). A copy that
   fails because an object it depends on (delta base, extrapolation source, compression
   dictionary) is missing or damaged is reported apart from the damaged object itself,
   so the root cause stands out from its dependents. Commits, snapshots, tags and evals
   are parsed too.
3. Refs: every branch, tag and other ref (loose, and every record of packed-refs from
   its first) and HEAD name a stored commit (a tag may name a tag object); loose ref
   files with invalid names are reported (no command reads them); then the reachability walk that gc uses
   (reach.walk: history, snapshots, evals, dependency chains) must find everything, and
   every reachable object must be of the type that names it expects (a commit's parents
   are commits and its snapshot a snapshot, its eval list's entries evals; a snapshot's
   tensor entries are tensors and its file and header blobs blobs; a tag's object is of
   the type the tag says): the walk notes what each object it reads names, and the
   types come from the copies read (walk and copy check). A commit whose eval list
   cannot be read is reported and the walk goes on through its parents.
4. Leftovers of killed writers: temp files, packs without an index and lock files older
   than an hour are warnings; younger ones belong to writers at work and are only counted.
   Entries under objects/ that are no object file are warnings too (stray-file).

An entry that cannot be read (a folder where a file belongs, an unreadable file) is a
finding on that entry; the run goes on to its report.

Unreachable objects are counted, not reported one by one (gc prunes them).

Order: list loose files, then packs, then read the refs (refs move after the objects they
name are written, and gc moves objects loose -> pack, so this order sees all the refs
reach); walk first (it decodes, re-hashes and parses every reachable commit, snapshot,
tag and eval: the copy it read of each is not decoded again); then every other copy,
tensors in batches, oldest pack first, with a base cache grown to a few revisions of the
largest adapter once a delta is seen (each delta chain decoded once, not once per level;
without deltas it holds nothing). Lookups go through one sorted id column over all packs
(one search, not one per pack); the types read are noted as bits beside it. Time is the
walk's (as gc's mark) plus native decoding of tensors.

Each finding has a stable id from FINDINGS (documented in docs/user-guide.md): scripts
may rely on ids and severities; messages are for people and may change.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator

from . import codec
from .errors import AhError, BadRefName, CorruptObject, ObjectNotFound, UnsupportedFormat
from .evals import EvalLists
from .fsutil import TMP_PREFIX
from .gc import LOCK_NAME as GC_LOCK, TMP_MAX_AGE_S
from .objects import BLOB, COMMIT, EVAL, PARSERS, SNAPSHOT, TAG, TENSOR, TYPES, ObjectId, Snapshot, is_oid, parse_object
from .pack import Pack, pack_names
from .packstore import PACK_DIR, _open_listed
from .reach import ID_LEN, IdSet, walk
from .packed_refs import FILE_NAME as PACKED_REFS
from .refs import HEADS, TAGS, RefStore, check_full_ref_name
from .store import _HEX_NAME, LooseObjectStore, ObjectStore, _is_fan, _is_rest

ERROR = "error"
WARNING = "warning"

# id -> (severity, what it means). Stable: add ids, never rename or reuse one.
FINDINGS = {
    "object-corrupt": (ERROR, "a stored copy of an object does not decode or does not hash to its id"),
    "object-malformed": (ERROR, "a commit, snapshot, tag or eval hashes right but does not parse"),
    "delta-base-corrupt": (ERROR, "a copy cannot be decoded because an object it depends on is damaged"),
    "delta-base-missing": (ERROR, "a copy depends on an object (delta base, extrapolation source, "
                                  "compression dictionary) that is not in the store"),
    "object-missing": (ERROR, "an object reachable from the refs is not in the store"),
    "wrong-type": (ERROR, "a reachable object is not of the type that names it expects (the message names "
                          "the object that names it)"),
    "eval-list-corrupt": (ERROR, "a reachable commit's eval list cannot be read"),
    "pack-corrupt": (ERROR, "a pack or its index cannot be opened (truncated, bad header)"),
    "pack-checksum": (ERROR, "a pack's bytes do not match its checksum"),
    "index-checksum": (ERROR, "a pack index's bytes do not match its checksum"),
    "ref-corrupt": (ERROR, "a ref file or the packed-refs file cannot be read"),
    "ref-dangling": (ERROR, "a ref names an object that is not in the store"),
    "ref-wrong-type": (ERROR, "a ref names an object that is not a commit (nor, for a tag, a tag object)"),
    "ref-bad-name": (WARNING, "a file under refs/ whose name is no valid ref name: no command reads it, and gc "
                              "does not keep what it names"),
    "head-broken": (ERROR, "HEAD holds neither a valid ref name nor an object id"),
    "head-unborn": (WARNING, "HEAD names a branch that does not exist though its reflog does, while other "
                             "branches do: the branch was lost"),
    "temp-file": (WARNING, "a temp file left by a killed writer (gc removes those in objects/pack/ and "
                           "objects/<xx>/; any other is safe to delete)"),
    "orphan-pack": (WARNING, "a pack file without its index, left by a killed writer (gc removes it)"),
    "stray-file": (WARNING, "an entry under objects/ that is not an object file (a name not of hex digits, "
                            "a file where a fan-out folder belongs, anything else beside those folders or "
                            "in pack/): never read as an object"),
    "stale-lock": (WARNING, "a lock file left by a killed writer: the ref (or file) it locks cannot be "
                            "updated until it is removed"),
}
# What a damaged packed-refs file leaves unknown.
_PACKED_UNKNOWN = ("the refs it holds past the damage are unknown (those a listing still finds were checked): the "
                   "objects only unknown refs reach count as unreachable here and were not checked for "
                   "reachability (do not run `ah gc` before it is repaired)")
# Tensors read_tensors decodes at once: at most this many, of at most this many bytes.
BATCH_OBJECTS = 1024
BATCH_BYTES = 64 << 20
# Records of these encodings are tensors (planes, delta, extrapolated delta): batched.
_TENSOR_ENCODINGS = (codec.ENC_PLANES, codec.ENC_DELTA, codec.ENC_EXTRAPOLATED)
# The encoding byte of a delta's record (its base may be worth keeping decoded).
_DELTA_BYTES = tuple(bytes([e]) for e in codec.DELTA_ENCODINGS)
LOOSE = "loose"


@dataclass(frozen=True)
class Finding:
    """One problem. `object` is what it concerns (object id, ref name, file path or pack
    name); `where` the stored copy (`loose` or a pack file name) when it is about one."""

    id: str
    severity: str
    object: str
    message: str
    where: str | None = None

    def text(self) -> str:
        where = f" ({self.where})" if self.where else ""
        return f"{self.severity}: {self.id} {self.object}{where}: {self.message}"


@dataclass
class FsckResult:
    """What fsck checked and found.

    Attributes:
        ok: no error-severity finding.
        objects_checked: distinct object ids stored (in loose files and packs that open).
        copies_checked: stored copies re-hashed (an object stored twice counts twice).
        bytes_checked: stored bytes of those copies.
        packs: packs listed.
        refs: refs checked (HEAD not counted).
        reachable: objects reachable from the refs (delta bases included).
        unreachable: stored objects no ref reaches (gc prunes them after a grace period).
        in_progress: temp and lock files young enough to belong to a writer at work.
        seconds: wall time.
        findings: the problems, errors first.
    """

    ok: bool = True
    objects_checked: int = 0
    copies_checked: int = 0
    bytes_checked: int = 0
    packs: int = 0
    refs: int = 0
    reachable: int = 0
    unreachable: int = 0
    in_progress: int = 0
    seconds: float = 0.0
    findings: list[Finding] = field(default_factory=list)

    @property
    def errors(self) -> int:
        return sum(f.severity == ERROR for f in self.findings)

    @property
    def warnings(self) -> int:
        return sum(f.severity == WARNING for f in self.findings)

    def to_json(self) -> dict:
        out = asdict(self)
        out["seconds"] = round(self.seconds, 3)
        out["errors"], out["warnings"] = self.errors, self.warnings
        return out


def list_loose(objects_dir: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """(ids of the loose object files, (path under objects/, why) of every other entry:
    in the fan-out folders, beside them, and in pack/ other than packs and indexes). fsck
    lists them itself: a name that is not 62 lowercase hex digits under a folder of 2 is
    no object file (the store never reads it), and must neither crash the check nor pass
    unseen. Temp files are check_leftovers'."""
    ids: list[str] = []
    stray: list[tuple[str, str]] = []
    try:
        fans = os.listdir(objects_dir)
    except (FileNotFoundError, NotADirectoryError):
        return ids, stray
    for fan in fans:
        if fan.startswith(TMP_PREFIX):
            continue
        if fan == PACK_DIR:
            with contextlib.suppress(OSError):  # an unlistable pack folder is the packs' check
                stray += [(f"{PACK_DIR}/{name}", "neither a pack nor a pack index: never read")
                          for name in os.listdir(os.path.join(objects_dir, fan))
                          if not name.startswith(TMP_PREFIX) and not name.endswith((".pack", ".idx"))]
            continue
        if len(fan) != 2:
            stray.append((fan, "neither a folder of loose objects (2 hex digits) nor pack/: never read"))
            continue
        try:
            names = os.listdir(os.path.join(objects_dir, fan))
        except NotADirectoryError:
            stray.append((fan, "a file where a folder of loose objects belongs"))
            continue
        except FileNotFoundError:
            continue
        except OSError as exc:
            stray.append((fan, f"a folder of loose objects that cannot be listed: {exc.strerror or exc}"))
            continue
        hex_fan = _is_fan(fan)
        for name in names:
            if name.startswith(TMP_PREFIX):
                continue
            if hex_fan and _is_rest(name):  # as the store names them (LooseObjectStore.iter_files)
                ids.append(fan + name)
            else:
                stray.append((f"{fan}/{name}", "not an object file (an object's is named by its 64 lowercase hex "
                                               "digits, 2 as its folder): never read as one"))
    return ids, stray


class _Stored:
    """Every id stored (packs that open, loose files listed), as `IdSet` answers `in`,
    `mask` and `len`, without a copy of the packs' id column (32 bytes an id): the
    column itself, where an id stored in two packs is twice, and the loose ids no pack
    holds."""

    def __init__(self, column, loose_ids: Iterable[str]):
        import numpy as np

        self.packed = IdSet(column)  # sorted, with duplicates: `in` and mask hold, len does not
        loose = np.frombuffer(b"".join(bytes.fromhex(o) for o in loose_ids), dtype="S32")
        self.loose = IdSet.build([loose[~self.packed.mask(loose)]])
        distinct = int(np.count_nonzero(column[1:] != column[:-1])) + 1 if len(column) else 0
        self._len = distinct + len(self.loose)

    def __len__(self) -> int:
        return self._len

    def __contains__(self, oid: object) -> bool:
        return oid in self.packed or oid in self.loose

    def mask(self, keys):
        return self.packed.mask(keys) | self.loose.mask(keys)

    def count_in(self, ids: IdSet) -> int:
        """How many of `ids` (each once) are stored."""
        return int(self.mask(ids.array).sum())


def _age_key(pack: Pack) -> int:
    try:
        return os.stat(pack.path).st_mtime_ns
    except OSError:
        return 0


class _Listed(ObjectStore):
    """A read-only view of the objects as listed once: loose files plus the packs that
    open. Unlike PackedObjectStore, a pack that cannot be opened is set aside (and
    reported) instead of failing every read, and no pack is listed again behind fsck's
    back. Reads take the first copy: packs, then loose.

    Every object read whole through `read` (the reachability walk reads each commit,
    snapshot, tag and eval so) was re-hashed against its id there: the view notes which
    copy it came from (`walked`, per source), its type and its size, so the copy check
    need not decode it a second time."""

    def __init__(self, root: Path, loose_ids: list[str] | None = None):
        self.root = Path(root)
        self.loose = LooseObjectStore(self.root, durable=False)
        if loose_ids is None:
            loose_ids = list_loose(self.root)[0]
        self.loose_ids = set(loose_ids)
        self.pack_dir = self.root / PACK_DIR
        self.packs: list[Pack] = []
        self.broken: list[tuple[str, str]] = []  # (pack index name, why it cannot be opened)
        for name in pack_names(self.pack_dir):
            try:
                self.packs.append(_open_listed(self.pack_dir / name))
            except FileNotFoundError:
                continue  # removed by a gc since listed
            except CorruptObject as exc:
                self.broken.append((name, exc.reason))
            except OSError as exc:  # a folder named as an index, an unreadable file
                self.broken.append((name, f"cannot be read: {exc.strerror or exc}"))
        # Oldest first: a commit's pack holds deltas against tensors of older packs, so the
        # copy check finds their bases decoded already (base cache) instead of decoding
        # each chain again under every pack that depends on it.
        self.packs.sort(key=_age_key)
        self._index_packs()
        self.walked: dict[int, bytearray] = {}  # source (pack position, -1 loose) -> raw ids read whole
        self.walked_copies = 0
        self.walked_bytes = 0
        # Types of the copies read whole or checked (walk and copy check), noted by id
        # (note_type): pending ones, then as bits in _type_bits (the packed ids) and, for
        # ids stored only loose, in per-type buffers of raw ids.
        self._pending_keys, self._pending_bits = bytearray(), bytearray()
        self._loose_typed: dict[str, bytearray] = {t: bytearray() for t in TYPES}
        self._loose_sets: dict[str, tuple[int, IdSet]] = {}
        self.deltas = False  # whether a record the walk read the head of is a delta (dependencies_of)
        self.on_read: Callable[[str, str, bytes, int], None] | None = None  # told of each object the walk reads
        self.progress: Callable[[int], None] | None = None  # told of copies the walk re-hashed
        self._top: str | None = None  # the id `read` is reading, until its record is found
        self._top_from: tuple[int, int] | None = None  # (its source, record length)

    def _index_packs(self) -> None:
        """One sorted id column over every pack, with each entry's pack (position in
        `packs`) and its index in that pack: a lookup is one binary search, not one per
        pack (1,200 packs of one commit each took 8.5 s, 7 million searches, to check).
        The ids are sorted straight into the column (no sorted copy, no bytes copy of
        it) and the fan-out is searched on their first two bytes as they lie there: the
        column costs 41 bytes an id (with its pack, entry and type bits), its making 40
        more for a moment (the joined ids, the sort order)."""
        import numpy as np

        arrays = [p.id_array() for p in self.packs]
        counts = np.array([len(a) for a in arrays], dtype=np.int64)
        total = int(counts.sum())
        # Searched in Python within the fan-out bucket of the id's first two bytes (a few
        # entries): a numpy search per lookup cost ~3 us of conversions.
        self._raw = bytearray(total * ID_LEN)
        self._column = np.frombuffer(self._raw, dtype="S32")
        self._type_bits = np.zeros(total, dtype=np.uint8)  # see note_type
        if not total:
            self._fan = [0] * (_FAN + 1)
            self._pack_of = self._entry_of = np.empty(0, dtype=np.int32)
            return
        ids = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
        del arrays
        order = np.argsort(ids, kind="stable")  # stable: copies of one id stay in pack order
        np.take(ids, order, out=self._column)
        del ids
        pack_of = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
        self._pack_of = pack_of[order]
        del pack_of
        entry_of = order.astype(np.int32)
        del order
        entry_of -= (np.cumsum(counts) - counts).astype(np.int32)[self._pack_of]
        self._entry_of = entry_of
        heads = np.ndarray((total,), dtype=">u2", buffer=self._raw, strides=(ID_LEN,))
        self._fan = np.searchsorted(heads, np.arange(_FAN, dtype=np.uint16)).tolist() + [total]

    def locate(self, oid: str) -> list[tuple[int, int]]:
        """(position in `packs`, index entry) of every packed copy of `oid`, oldest pack first."""
        try:
            key = bytes.fromhex(oid)
        except ValueError:
            return []
        if len(key) != ID_LEN:
            return []
        bucket = key[0] << 8 | key[1]
        lo, hi = self._fan[bucket], self._fan[bucket + 1]
        raw = self._raw
        while lo < hi:
            mid = (lo + hi) // 2
            if raw[mid * ID_LEN : (mid + 1) * ID_LEN] < key:
                lo = mid + 1
            else:
                hi = mid
        out = []
        while raw[lo * ID_LEN : (lo + 1) * ID_LEN] == key:
            out.append((int(self._pack_of[lo]), int(self._entry_of[lo])))
            lo += 1
        return out

    def stored(self) -> _Stored:
        """Every id stored (packs that open, loose files listed)."""
        return _Stored(self._column, self.loose_ids)

    def has(self, oid: str) -> bool:
        return bool(self.locate(oid)) or oid in self.loose_ids or self.loose.has(oid)

    def _read_record(self, oid: str) -> bytes:
        found = self.locate(oid)
        if found:
            n, i = found[0]
            pack = self.packs[n]
            record = pack.record_at(oid, *pack.location(i))
        else:
            record, n = self.loose_record(oid), -1
        if oid == self._top:
            self._top, self._top_from = None, (n, len(record))
        return record

    def loose_record(self, oid: str, limit: int | None = None) -> bytes:
        """The loose file's record (its first `limit` bytes); CorruptObject when it cannot
        be read (a folder where the file belongs, an unreadable file): damage of that copy,
        not a reason to stop."""
        try:
            return self.loose._read_record(oid, -1 if limit is None else limit)
        except OSError as exc:
            raise CorruptObject(oid, f"its loose file cannot be read: {exc.strerror or exc}") from None

    def _read_record_head(self, oid: str) -> bytes:
        found = self.locate(oid)
        if found:
            n, i = found[0]
            pack = self.packs[n]
            return pack.record_at(oid, *pack.location(i), codec.RECORD_HEAD_MAX)
        return self.loose_record(oid, codec.RECORD_HEAD_MAX)

    def read(self, oid: str) -> tuple[str, bytes]:
        """(type, body) from the first copy that reads whole and re-hashes: a damaged copy
        is reported by the copy check, and the walk goes on through a sound one (gc keeps
        a loose copy before a packed one). An unknown storage encoding (a damaged encoding
        byte, most likely) is damage here too, not a reason to stop."""
        self._top, self._top_from = oid, None
        try:
            obj_type, body = super().read(oid)
            source, size = self._top_from
        except (CorruptObject, UnsupportedFormat) as exc:
            obj_type, body, source, size = self._read_other_copy(oid, exc)
        finally:
            self._top = None
        key = bytes.fromhex(oid)
        self.walked.setdefault(source, bytearray()).extend(key)
        self.walked_copies += 1
        self.walked_bytes += size
        self.note_type(key, obj_type)
        if self.on_read is not None:
            self.on_read(oid, obj_type, body, source)
        if self.progress is not None and self.walked_copies % 256 == 0:
            self.progress(256)  # the walk is most of fsck's time on many small adapters
        return obj_type, body

    def _read_other_copy(self, oid: str, exc: Exception) -> tuple[str, bytes, int, int]:
        first = self._top_from[0] if self._top_from is not None else None
        for source, record in self.copies(oid):
            if source == first or record is None:
                continue
            view = _Copy(self, lambda o, record=record: record if o == oid else None)
            try:
                obj_type, body, _ = view._read_verified(oid)
            except (ObjectNotFound, CorruptObject, UnsupportedFormat):
                continue
            return obj_type, body, source, len(record)
        if isinstance(exc, UnsupportedFormat):
            raise CorruptObject(oid, str(exc)) from None
        raise exc

    def note_type(self, key: bytes, obj_type: str) -> None:
        """Note that a copy of the object with raw id `key`, read whole, is of `obj_type`.
        A bit per type and per id of the packed column (a byte an id, where a buffer of
        raw ids per type cost 32 and sets of them 64 more): noted in batches, one numpy
        search for many ids."""
        self._pending_keys += key
        self._pending_bits.append(_TYPE_BIT[obj_type])
        if len(self._pending_bits) >= _CHUNK:
            self._flush_types()

    def _flush_types(self) -> None:
        import numpy as np

        if not self._pending_bits:
            return
        keys_buf, bits_buf = self._pending_keys, self._pending_bits
        self._pending_keys, self._pending_bits = bytearray(), bytearray()
        keys, bits = np.frombuffer(keys_buf, dtype="S32"), np.frombuffer(bits_buf, dtype=np.uint8)
        found, pos = IdSet(self._column).positions(keys)
        np.bitwise_or.at(self._type_bits, pos[found], bits[found])
        if not found.all():
            for obj_type in TYPES:
                self._loose_typed[obj_type] += keys[~found & (bits == _TYPE_BIT[obj_type])].tobytes()

    def _loose_set(self, obj_type: str) -> IdSet:
        buf = self._loose_typed[obj_type]
        cached = self._loose_sets.get(obj_type)
        if cached is None or cached[0] != len(buf):
            cached = self._loose_sets[obj_type] = (len(buf), IdSet.build([bytes(buf)]))
        return cached[1]

    def type_bits(self, keys):
        """For each id of the `S32` array `keys`, the bits (_TYPE_BIT) of the types its
        copies read whole were found to be; 0 for one never read whole."""
        import numpy as np

        self._flush_types()
        out = np.zeros(len(keys), dtype=np.uint8)
        if len(self._column):
            found, pos = IdSet(self._column).positions(keys)
            out[found] = self._type_bits[pos[found]]
        for obj_type in TYPES:
            if self._loose_typed[obj_type]:
                out[self._loose_set(obj_type).mask(keys)] |= _TYPE_BIT[obj_type]
        return out

    def typed_ids(self, obj_type: str) -> IdSet:
        """Every id a copy of which was read whole and found of `obj_type`."""
        self._flush_types()
        packed = self._column[(self._type_bits & _TYPE_BIT[obj_type]) != 0]  # sorted, each id once
        loose = self._loose_set(obj_type)
        return IdSet.build([packed, loose.array]) if len(loose) else IdSet(packed)

    def _write_record(self, oid, record) -> None:
        raise AhError("fsck never writes to the store")

    def find_prefix(self, prefix: str) -> list[ObjectId]:
        import numpy as np

        found = set(self.loose.find_prefix(prefix))
        if not prefix or len(prefix) % 2 or not _HEX_NAME.fullmatch(prefix):
            for pack in self.packs:
                found.update(pack.find_prefix(prefix))
            return sorted(found)
        key = bytes.fromhex(prefix)
        raw = self._raw
        at = int(np.searchsorted(np.frombuffer(raw, dtype="S32"), key)) if raw else 0
        while raw[at * ID_LEN : at * ID_LEN + len(key)] == key:
            found.add(ObjectId(raw[at * ID_LEN : (at + 1) * ID_LEN].hex()))
            at += 1
        return sorted(found)

    def copies(self, oid: str, limit: int | None = None) -> list[tuple[int, bytes | None]]:
        """(source: position in `packs`, -1 for loose; record, None when unreadable) of
        every stored copy of `oid`; with `limit`, only the first `limit` bytes of each."""
        out = []
        for n, i in self.locate(oid):
            pack = self.packs[n]
            try:
                out.append((n, pack.record_at(oid, *pack.location(i), limit)))
            except CorruptObject:
                out.append((n, None))
        if oid in self.loose_ids:  # listed: a file per miss would cost a failed open each
            try:
                out.append((-1, self.loose_record(oid, limit)))
            except ObjectNotFound:
                pass
            except CorruptObject:
                out.append((-1, None))
        return out

    def dependencies_of(self, oid: str) -> tuple[ObjectId, ...]:
        """What every copy needs (as PackedObjectStore answers: reach.walk relies on it)."""
        records = [r for _, r in self.copies(oid, codec.RECORD_HEAD_MAX) if r is not None]
        if not records:
            raise ObjectNotFound(oid)
        deps: list[ObjectId] = []
        for record in records:
            if record[codec.ENCODING_AT : codec.ENCODING_AT + 1] in _DELTA_BYTES:
                self.deltas = True
            try:
                found = codec.dependencies(oid, record, self.find_prefix)
            except UnsupportedFormat as exc:
                raise CorruptObject(oid, str(exc)) from None
            for dep in found:
                if dep not in deps:
                    deps.append(ObjectId(dep))
        return tuple(deps)

    def release_pages(self) -> None:
        for pack in self.packs:
            pack.release_pages()

    @contextlib.contextmanager
    def scattered_reads(self):
        for pack in self.packs:
            pack.advise_random(True)
        try:
            yield
        finally:
            for pack in self.packs:
                pack.advise_random(False)
            self.release_pages()

    def close(self) -> None:
        for pack in self.packs:
            pack.close()


class _Copy(ObjectStore):
    """The store as seen from one source (the loose folder or one pack): an object this
    source holds is read from its copy here, anything else (a delta base stored
    elsewhere) from the listed store. The base cache and the verified dictionaries are
    the listed store's, so a base decoded once serves every source."""

    def __init__(self, listed: _Listed, own: Callable[[str], bytes | None]):
        self.listed = listed
        self._own = own
        # The records being checked, as located when the source was listed: a damaged
        # index may not find its own entries again, and a read must never check another copy.
        self.pinned: dict[str, bytes] = {}
        self.__dict__["_base_cache"] = listed.base_cache
        self.__dict__["_dicts"] = listed.__dict__.setdefault("_dicts", {})

    def _read_record(self, oid: str) -> bytes:
        record = self.pinned.get(oid)
        if record is None:
            record = self._own(oid)
        return record if record is not None else self.listed._read_record(oid)

    def _read_record_head(self, oid: str) -> bytes:
        record = self.pinned.get(oid)
        if record is None:
            record = self._own(oid)
        return record[: codec.RECORD_HEAD_MAX] if record is not None else self.listed._read_record_head(oid)

    def has(self, oid: str) -> bool:
        return self.listed.has(oid)

    def find_prefix(self, prefix: str) -> list[ObjectId]:
        return self.listed.find_prefix(prefix)

    def _write_record(self, oid, record) -> None:
        raise AhError("fsck never writes to the store")


def _pack_copy(pack: Pack, oid: str) -> bytes | None:
    """`pack`'s record of `oid`, or None when it holds none."""
    i = pack.find(oid)
    return None if i is None else pack.record_at(oid, *pack.location(i))


# Copies checked between two releases of a pack's mapped pages.
_RELEASE_EVERY = 1 << 12
# Pack entries listed at a time (ids as Python objects: a few MB, whatever the pack's size).
_CHUNK = 1 << 16


def _pack_order(pack: Pack, skip: IdSet) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """(id, a call reading its record) of every entry of `pack` but those in `skip`, in
    the order the records lie in the pack (read front to back), from the index's
    columns: no search per entry."""
    import numpy as np

    ids = pack.id_array()
    offsets, lengths = pack.location_arrays()
    order = np.argsort(offsets, kind="stable")
    for at in range(0, len(order), _CHUNK):
        part = order[at : at + _CHUNK]
        part = part[~skip.mask(ids[part])]
        for key, off, ln in zip(ids[part].tolist(), offsets[part].tolist(), lengths[part].tolist()):
            oid = key.ljust(ID_LEN, b"\0").hex()
            yield oid, partial(pack.record_at, oid, off, ln)


_FAN = 1 << 16  # buckets of _Listed's id column: by the first two bytes
_TYPE_BIT = {t: 1 << n for n, t in enumerate(TYPES)}  # _Listed.type_bits
# The base cache holds this many times the largest reachable adapter (BaseCache.reserve
# caps it at a share of memory): the revision being checked, the one before (its delta
# bases) and the second extrapolation source, and the cache admits no body over a quarter
# of its budget.
_CACHE_ADAPTERS = 4


class _Everything:
    def __contains__(self, _item) -> bool:
        return True


def _list(value) -> list:
    return value if isinstance(value, list) else []


def _expect(buf: bytearray, oid) -> None:
    """Append `oid`'s raw id to `buf` if it is an id."""
    if isinstance(oid, str) and is_oid(oid):
        buf += bytes.fromhex(oid)


class _Checker:
    """One fsck run: the steps of check_registry and the findings they add."""

    def __init__(self, ah_dir: Path, listed: _Listed, refs: RefStore, progress: Callable[[int], None] | None, threads: int):
        self.ah_dir = ah_dir
        self.listed = listed
        self.refs = refs
        self.progress = progress
        self.threads = threads
        self.result = FsckResult()
        self.bad: dict[str, int] = {}  # id -> copies that failed
        self.missing_deps: set[str] = set()  # dependencies reported by delta-base-missing
        self.dangling: set[str] = set()  # ref targets reported by ref-dangling
        self._depends: dict[int, tuple[str, ...]] = {}  # finding position -> what that copy depends on
        self._relisted: _Listed | None = None
        # Raw ids each object the walk read names, by the type the naming expects of them.
        self._expected: dict[str, bytearray] = {t: bytearray() for t in TYPES}
        self._evals = EvalLists(ah_dir)
        self._eval_lists = None  # commit ids with an eval list file (_has_eval_list)
        self.wrong_typed: set[str] = set()  # ids reported as wrong-type
        self.largest_snapshot = 0  # bytes of the largest adapter folder the walk read
        self._cache_grown = False  # grow_cache done
        self._cache_default = 0  # the base cache's budget before size_cache set it aside
        self.corrupt_refs: set[str] = set()  # what ref-corrupt findings name

    def size_cache(self) -> None:
        """Before the copy check: room in the base cache for the bases of a revision's
        deltas when the walk met one (grow_cache); else none until a delta turns up
        (unreachable ones): without deltas, no tensor decoded is ever looked up there, and
        the cache only held the last ones checked, as much as its budget (grown to 4
        adapters, or the default 64 MB)."""
        if self.listed.deltas:
            self.grow_cache()
        else:
            cache = self.listed.base_cache
            self._cache_default, cache.max_bytes = cache.max_bytes, 0

    def grow_cache(self) -> None:
        """Room in the base cache for the bases of a revision's deltas (once): with the
        fixed 64 MB, a revision of a 20 MB tensor never entered (a quarter of the budget at
        most) and each of 16 was decoded through its whole chain again, 136 decodes
        instead of 16."""
        if not self._cache_grown:
            self._cache_grown = True
            cache = self.listed.base_cache
            cache.max_bytes = max(cache.max_bytes, self._cache_default)
            cache.reserve(_CACHE_ADAPTERS * self.largest_snapshot)

    def stored_now(self, oid: str) -> bool:
        """Whether `oid` is stored now, listing the objects again (once): a concurrent
        commit may have written it (in a new pack) and moved a ref to it since the first
        listing, or a gc moved it from a loose file into a new pack."""
        if self._relisted is None:
            self._relisted = _Listed(self.listed.root)
        return self._relisted.has(oid)

    def relist(self) -> None:
        """Make the next stored_now list the objects again."""
        self.close()
        self._relisted = None

    def close(self) -> None:
        if self._relisted is not None:
            self._relisted.close()

    def add(self, kind: str, obj: str, message: str, where: str | None = None) -> None:
        self.result.findings.append(Finding(kind, FINDINGS[kind][0], obj, message, where))
        if kind == "ref-corrupt":
            self.corrupt_refs.add(obj)

    # --- refs ----------------------------------------------------------------------------------
    def _ref_chunks(self, report: bool) -> Iterator[tuple[list[str], bytes]]:
        """(names, their targets' raw ids back to back) of every ref, loose refs shadowing
        packed ones, then a detached HEAD, in chunks (a million packed refs are never one
        list). With `report`, unreadable refs and HEAD become findings."""
        refs = self.refs
        loose: dict[str, str] = {}
        for dirpath, _dirs, files in os.walk(self.ah_dir / "refs"):
            for fn in files:
                if fn.endswith(".lock") or fn.startswith(TMP_PREFIX):
                    continue  # locks and temp files: see check_leftovers
                name = (Path(dirpath) / fn).relative_to(self.ah_dir).as_posix()
                try:
                    check_full_ref_name(name)
                except BadRefName as exc:
                    if report:  # refs.read takes it for no ref at all
                        self.add("ref-bad-name", name, f"{exc}: no command reads it as a ref, and `ah gc` does not "
                                                       f"keep what it names")
                    continue
                try:
                    oid = refs.read(name)
                except CorruptObject as exc:
                    if report:
                        self.add("ref-corrupt", name, exc.reason)
                    continue
                except OSError as exc:
                    if report:
                        self.add("ref-corrupt", name, f"cannot be read: {exc.strerror or exc}")
                    continue
                if oid is not None:
                    loose[name] = oid
        yield list(loose), b"".join(bytes.fromhex(o) for o in loose.values())
        branches = any(name.startswith(HEADS) for name in loose)
        names, keys = [], bytearray()
        last = ""  # the last packed name taken, in file order (sorted)
        damaged = False
        # Every record from the file's first one (packed_all): a listing under refs/ starts
        # with a binary search, and one flipped bit in the first name hid every ref of the
        # first restart block; their history then counted as unreachable, with no finding.
        # On damage, the refs a listing under refs/ still finds past what was read are
        # taken too (as `ah log` sees them), so that less counts as unreachable.
        for listing in (refs.packed_all, partial(refs.packed.iter_prefix, "refs/")):
            try:
                for name, oid in listing():
                    if name in loose or name <= last:
                        continue
                    last = name
                    branches = branches or name.startswith(HEADS)
                    names.append(name)
                    keys += bytes.fromhex(oid)
                    if len(names) >= _CHUNK:
                        yield names, bytes(keys)
                        names, keys = [], bytearray()
            except CorruptObject as exc:
                damaged = True
                if report and listing == refs.packed_all:
                    self.add("ref-corrupt", PACKED_REFS, f"{exc.reason}; {_PACKED_UNKNOWN}")
            except OSError as exc:
                damaged = True
                if report and listing == refs.packed_all:
                    self.add("ref-corrupt", PACKED_REFS, f"cannot be read: {exc.strerror or exc}; {_PACKED_UNKNOWN}")
                break
            else:
                break  # all read: no damage
        yield names, bytes(keys)
        try:
            target, head = refs.read_head()
        except CorruptObject as exc:
            if not report:
                pass
            elif exc.oid == "HEAD":
                self.add("head-broken", "HEAD", exc.reason)
            elif exc.oid not in self.corrupt_refs:  # HEAD is fine, the ref it names is not
                self.add("ref-corrupt", exc.oid, exc.reason)
        except OSError as exc:
            if not report:
                pass
            elif exc.filename is None or Path(exc.filename) == self.ah_dir / "HEAD":
                self.add("head-broken", "HEAD", f"cannot be read: {exc.strerror or exc}")
            else:
                name = Path(exc.filename).relative_to(self.ah_dir).as_posix() \
                    if Path(exc.filename).is_relative_to(self.ah_dir) else str(exc.filename)
                if name not in self.corrupt_refs:
                    self.add("ref-corrupt", name, f"cannot be read: {exc.strerror or exc}")
        else:
            if target is None and head is not None:
                yield ["HEAD"], bytes.fromhex(head)
            elif (target is not None and head is None and branches and report and not damaged
                  and (self.ah_dir / "logs" / target).is_file()):  # not when its branch may lie in the damage
                # Unborn beside other branches is how `ah import` leaves a new registry; but
                # a reflog means the branch had commits, and HEAD's branch is never deleted
                # (deleting one removes its reflog too): it was lost.
                self.add("head-unborn", "HEAD", f"names {target}, which does not exist though its reflog does, while "
                                                f"other branches do: the branch was lost (its history may be counted "
                                                f"unreachable) and a commit would start a new history there")

    def roots(self) -> IdSet:
        """What the refs and a detached HEAD name: where the walk starts."""
        return IdSet.build([keys for _names, keys in self._ref_chunks(report=False)])

    def check_refs(self, stored: _Stored, missing: set[str]) -> None:
        """Each ref names a stored commit (under refs/tags/, a tag object will do). Types
        come from the walk, which read every ref's target; a target it could not read
        (`missing`) is damaged and reported as such."""
        import numpy as np

        dangling: list[tuple[str, str]] = []  # (ref, target) not stored, when last listed
        for names, keys in self._ref_chunks(report=True):
            if not names:
                continue
            if names != ["HEAD"]:
                self.result.refs += len(names)
            arr = np.frombuffer(keys, dtype="S32")
            bits = self.listed.type_bits(arr)
            ok, is_tag, present = (bits & _TYPE_BIT[COMMIT]) != 0, (bits & _TYPE_BIT[TAG]) != 0, stored.mask(arr)
            for i in np.nonzero(~ok)[0].tolist():
                name, oid = names[i], keys[i * ID_LEN : (i + 1) * ID_LEN].hex()
                if is_tag[i] and name.startswith(TAGS):
                    continue
                if not present[i]:
                    if not self.stored_now(oid):
                        dangling.append((name, oid))
                elif oid not in missing:
                    self.add("ref-wrong-type", name, f"names {oid}, which is not a commit")
        if dangling:
            # Listed again, now that every ref was read: a ref read after the first
            # relisting may name an object a writer stored after it (a commit lands in a
            # new pack, then moves its ref), which is not lost.
            self.relist()
        for name, oid in dangling:
            if self.stored_now(oid):
                continue  # written since the objects were listed: not checked, not lost
            self.dangling.add(oid)
            self.add("ref-dangling", name, f"names {oid}, which is not in the store{self._unopened()}")

    # --- reachability --------------------------------------------------------------------------
    def walk(self, roots: IdSet):
        """reach.walk from the roots, as gc walks: every reachable commit, snapshot, tag and
        eval is read (re-hashed and parsed) there, through the listed view; what each names
        is noted with the type it must have (check_types)."""
        self.listed.on_read = self._note_names
        try:
            return walk(self.listed, roots, self.ah_dir, on_eval_error=self._eval_list_error,
                        on_snapshot=self._note_snapshot)
        finally:
            self.listed.on_read = None

    def _eval_list_error(self, commit: str, exc: Exception) -> None:
        """The walk could not read `commit`'s eval list: reported, and the walk goes on
        through the commit's parents (the damage must not hide what lies behind it)."""
        if isinstance(exc, CorruptObject):
            self.add("eval-list-corrupt", commit, exc.reason)
        else:
            self.add("eval-list-corrupt", commit, f"cannot be read: {getattr(exc, 'strerror', None) or exc}")

    def _where(self, source: int) -> str:
        return LOOSE if source < 0 else self.listed.packs[source].path.name

    def _note_names(self, oid: str, obj_type: str, body: bytes, source: int) -> None:
        """What the object the walk just read names, by the type it must be: a commit's
        parents are commits, its snapshot a snapshot and its eval list's entries evals; a
        snapshot's tensor entries are tensors and its file and header blobs blobs; a tag's
        object is of the type the tag says. Evals are parsed here (the walk does not)."""
        if obj_type == EVAL:
            try:
                parse_object(oid, obj_type, body)
            except CorruptObject as exc:
                self._bad_copy(oid, self._where(source), "object-malformed", f"{obj_type}: {exc.reason}")
            return
        expect = self._expected
        if obj_type not in (COMMIT, TAG):  # a snapshot: _note_snapshot, handed the walk's parse
            return
        try:
            d = json.loads(bytes(body))
        except ValueError:
            return
        if not isinstance(d, dict):
            return
        if obj_type == COMMIT:
            _expect(expect[SNAPSHOT], d.get("snapshot"))
            for parent in _list(d.get("parents")):
                _expect(expect[COMMIT], parent)
            if self._has_eval_list(oid):
                with contextlib.suppress(CorruptObject, OSError):  # the walk reports those
                    for eid in self._evals.read(oid):
                        expect[EVAL] += bytes.fromhex(eid)
        elif isinstance(d.get("type"), str) and d["type"] in expect:  # a tag
            _expect(expect[d["type"]], d.get("object"))

    def _note_snapshot(self, sid: str, snap: Snapshot) -> None:
        """What a snapshot the walk parsed names: its tensor entries are tensors, its file
        and header blobs blobs (taken from the walk's own parse: parsing every snapshot a
        second time made a walk of many small adapters 45% slower, and matching ids in
        its text missed or invented entries when a snapshot carried an unknown key)."""
        expect = self._expected
        for f in snap.files:
            expect[BLOB] += bytes.fromhex(f.blob)
            for t in f.tensors:
                expect[TENSOR] += bytes.fromhex(t.blob)
        self.largest_snapshot = max(self.largest_snapshot, sum(f.size for f in snap.files))

    def _has_eval_list(self, commit: str) -> bool:
        """Whether `commit` may have an eval list: the eval folder is listed once (few
        commits have one; a failed open per commit cost the walk 5%)."""
        if self._eval_lists is None:
            found: set[str] = set()
            try:
                for fan in os.listdir(self._evals.root):
                    if len(fan) == 2 and (self._evals.root / fan).is_dir():
                        found.update(fan + name for name in os.listdir(self._evals.root / fan))
            except FileNotFoundError:
                pass
            except OSError:
                found = None  # unlistable: read each commit's
            self._eval_lists = found if found is not None else _Everything()
        return commit in self._eval_lists

    def check_types(self) -> None:
        """Every object a reachable one names is of the type the naming expects (noted by
        the walk); the actual types are those of the copies read whole or checked. Each
        wrong one is reported with the object that names it."""
        import numpy as np

        wrong: dict[str, list[tuple[str, str]]] = {}  # id -> [(expected, actual type)]
        for expected, buf in self._expected.items():
            want = IdSet.take(buf)
            other = self.listed.type_bits(want.array) & (0xFF ^ _TYPE_BIT[expected])
            for i in np.nonzero(other)[0].tolist():
                oid = bytes(want.array[i]).ljust(ID_LEN, b"\0").hex()
                wrong.setdefault(oid, []).extend((expected, t) for t in TYPES if other[i] & _TYPE_BIT[t])
        if not wrong:
            return
        namers = self._namers(wrong, [k for t in (COMMIT, SNAPSHOT, TAG)
                                      for k in self.listed.typed_ids(t).array.tolist()])
        for oid in sorted(wrong):
            for expected, obj_type in wrong[oid]:
                by = namers.get((oid, expected), f"a reachable object names it as a {expected}")
                self.wrong_typed.add(oid)
                self.add("wrong-type", oid, f"{by}, but it is a {obj_type}")

    def _namers(self, wrong: dict[str, list[tuple[str, str]]], keys: list[bytes]) -> dict[tuple[str, str], str]:
        """(id, expected type) -> which object names it so, and how: the stored commits,
        snapshots and tags read again until each is found (only when something is wrong)."""
        todo = {(oid, expected) for oid, pairs in wrong.items() for expected, _ in pairs}
        found: dict[tuple[str, str], str] = {}

        def named(oid: str, expected: str, how: str) -> None:
            if (oid, expected) in todo and (oid, expected) not in found:
                found[(oid, expected)] = how

        for key in keys:
            if len(found) == len(todo):
                break
            by = key.ljust(ID_LEN, b"\0").hex()
            try:
                obj_type, body = ObjectStore.read(self.listed, by)
                obj = parse_object(by, obj_type, body)
            except (ObjectNotFound, CorruptObject, UnsupportedFormat):
                continue
            if obj_type == COMMIT:
                named(obj.snapshot, SNAPSHOT, f"commit {by} names it as its snapshot")
                for parent in obj.parents:
                    named(parent, COMMIT, f"commit {by} names it as a parent")
                with contextlib.suppress(CorruptObject, OSError):
                    for eid in self._evals.read(by):
                        named(eid, EVAL, f"the eval list of commit {by} names it as an eval")
            elif obj_type == SNAPSHOT:
                for f in obj.files:
                    named(f.blob, BLOB, f"snapshot {by} names it as the {'header ' if f.tensors else ''}blob of {f.path!r}")
                    for t in f.tensors:
                        named(t.blob, TENSOR, f"snapshot {by} names it as tensor {t.name!r} of {f.path!r}")
            elif obj_type == TAG:
                named(obj.object, obj.object_type, f"tag {by} names it as a {obj.object_type}")
        return found

    def report_unreachable_parts(self, missing: set[str], stored: _Stored) -> None:
        """What the walk could not follow and no other finding explains."""
        for oid in sorted(missing):
            if oid in self.bad or oid in self.missing_deps or oid in self.dangling or oid in self.wrong_typed:
                continue  # reported on its copies / what needs it / the ref naming it
            if oid not in stored:
                if not self.stored_now(oid):
                    self.add("object-missing", oid, f"reachable from the refs but not in the store{self._unopened()}")
                continue
            self._diagnose(oid)

    def _unopened(self) -> str:
        return " (or only in a pack that cannot be opened)" if self.listed.broken else ""

    def _diagnose(self, oid: str) -> None:
        """A reachable object whose copies hash right, yet the walk could not follow it."""
        try:
            obj_type, body = self.listed.read(oid)
        except ObjectNotFound:
            return  # a loose file a concurrent gc packed since listed: nothing to judge
        except CorruptObject as exc:
            self.add("object-corrupt", oid, exc.reason)
            return
        if obj_type in (COMMIT, SNAPSHOT, TAG):
            try:
                parse_object(oid, obj_type, body)
            except CorruptObject as exc:
                self.add("object-malformed", oid, f"{obj_type}: {exc.reason}")
                return
        if obj_type == COMMIT:
            try:
                self._evals.read(oid)
            except CorruptObject as exc:
                self.add("eval-list-corrupt", oid, exc.reason)
                return
            except OSError as exc:
                self.add("eval-list-corrupt", oid, f"cannot be read: {exc.strerror or exc}")
                return
        if obj_type != SNAPSHOT:
            self.add("wrong-type", oid, f"a commit names it as its snapshot, but it is a {obj_type}")
        else:
            self.add("object-corrupt", oid, "reachable, but what it depends on cannot be listed")

    # --- every copy ----------------------------------------------------------------------------
    def check_packs(self) -> None:
        for name, why in self.listed.broken:
            self.add("pack-corrupt", name, f"cannot be opened, its objects were not checked: {why}")
        for n, pack in enumerate(self.listed.packs):
            try:
                pack.verify()
            except CorruptObject as exc:
                kind = "index-checksum" if exc.oid.endswith(".idx") else "pack-checksum"
                self.add(kind, exc.oid.removeprefix("pack "), exc.reason)
            except OSError as exc:
                self.add("pack-corrupt", pack.path.name, f"cannot be read: {exc.strerror or exc}")
            skip = IdSet.build([bytes(self.listed.walked.get(n, b""))])
            try:
                self.check_source(pack.path.name, _Copy(self.listed, partial(_pack_copy, pack)), _pack_order(pack, skip),
                                  pack.release_pages)
            except CorruptObject as exc:  # its index points into a large-offset table it lacks
                self.add("pack-corrupt", pack.idx_path.name, f"its entries cannot be listed: {exc.reason}")
            pack.release_pages()

    def check_loose(self, loose_ids: list[str]) -> None:
        skip = IdSet.build([bytes(self.listed.walked.get(-1, b""))])

        def own(oid: str) -> bytes | None:
            try:
                return self.listed.loose_record(oid)
            except ObjectNotFound:
                return None

        todo = ((oid, partial(own, oid)) for oid in loose_ids if oid not in skip)
        self.check_source(LOOSE, _Copy(self.listed, own), todo)

    def check_source(
        self, where: str, view: _Copy, copies: Iterable[tuple[str, Callable[[], bytes | None]]],
        release: Callable[[], None] | None = None,
    ) -> None:
        """Re-hash each copy `view` holds, given as (id, a call that reads its record), in
        the order given (pack order): tensors in batches, the rest one by one. `release`
        drops the mapped pages of the pack read so far, now and then: mapped pages count
        as this process's memory, and a pack may be gigabytes."""
        batch: list[str] = []
        batch_bytes = 0
        done = 0
        for oid, read in copies:
            try:
                record = read()
            except CorruptObject as exc:  # a pack entry pointing outside its pack
                self._bad_copy(oid, where, "object-corrupt", exc.reason)
                continue
            if record is None:
                continue  # a loose file removed since listed (gc packed or pruned it)
            self.result.copies_checked += 1
            self.result.bytes_checked += len(record)
            done += 1
            if done % 256 == 0:
                if self.progress is not None:
                    self.progress(256)
                if release is not None and done % _RELEASE_EVERY == 0:
                    release()
            if len(record) >= codec.RECORD_HEADER.size and record[:4] == codec.MAGIC and record[4] in _TENSOR_ENCODINGS:
                if not self._cache_grown and record[4] in codec.DELTA_ENCODINGS:
                    self.grow_cache()  # an unreachable delta (the walk saw the reachable ones)
                batch.append(oid)
                view.pinned[oid] = record
                batch_bytes += len(record)
                if len(batch) >= BATCH_OBJECTS or batch_bytes >= BATCH_BYTES:
                    self._check_tensors(where, view, batch)
                    batch, batch_bytes = [], 0
            else:
                view.pinned[oid] = record
                self._check_one(where, view, oid)
                view.pinned.pop(oid, None)
        if batch:
            self._check_tensors(where, view, batch)
        if self.progress is not None and done % 256:
            self.progress(done % 256)

    def _check_tensors(self, where: str, view: _Copy, oids: list[str]) -> None:
        try:
            view.read_tensors(oids, self.threads)
        except (ObjectNotFound, CorruptObject, UnsupportedFormat):
            for oid in oids:  # which ones, and why: one by one
                self._check_one(where, view, oid)
        else:
            note = self.listed.note_type
            for oid in oids:
                note(bytes.fromhex(oid), TENSOR)
        finally:
            view.pinned.clear()

    def _check_one(self, where: str, view: _Copy, oid: str) -> None:
        try:
            obj_type, body, _ = view._read_verified(oid)
        except ObjectNotFound as exc:
            if exc.oid == oid and where == LOOSE:
                return  # removed since listed
            self._classify(where, view, oid, exc)
            return
        except (CorruptObject, UnsupportedFormat) as exc:
            self._classify(where, view, oid, exc)
            return
        if obj_type in PARSERS:  # not read by the walk: unreachable, or a second copy
            try:
                parse_object(oid, obj_type, body)
            except CorruptObject as exc:
                self._bad_copy(oid, where, "object-malformed", f"{obj_type}: {exc.reason}")
                return
        self.listed.note_type(bytes.fromhex(oid), obj_type)

    def _classify(self, where: str, view: _Copy, oid: str, exc: Exception) -> None:
        """Why a copy failed: its own bytes, or an object it depends on (the root cause is
        then reported on that object's own copies)."""
        other = getattr(exc, "oid", oid)
        reason = getattr(exc, "reason", None) or str(exc)
        if other != oid:
            self._bad_copy(oid, where, "delta-base-corrupt", f"cannot be decoded: it depends on {other}, which is damaged ({reason})")
            return
        record = view.pinned.get(oid, b"")
        try:
            deps = codec.dependencies(oid, record, self.listed.find_prefix)
        except (CorruptObject, UnsupportedFormat) as dep_exc:
            if record[codec.ENCODING_AT : codec.ENCODING_AT + 1] == bytes([codec.ENC_DICT_PREFIX]):
                # no object matches the dictionary prefix the record names
                self._bad_copy(oid, where, "delta-base-missing", getattr(dep_exc, "reason", str(dep_exc)))
                return
            deps = ()
        absent = [d for d in deps if not self.listed.has(d)]
        if absent:
            self.missing_deps.update(absent)
            self._bad_copy(oid, where, "delta-base-missing", f"it depends on {absent[0]}, which is not in the store")
            return
        if deps:  # decided once every copy is checked: a dependency may be damaged too
            self._depends[len(self.result.findings)] = deps
        self._bad_copy(oid, where, "object-corrupt", reason)

    def blame_dependencies(self) -> None:
        """A copy that failed on its own id but depends on an object with a damaged copy
        (an encoding-5 record whose dictionary is damaged fails so): the dependency is the
        root cause, reported on its own copies; this one is a dependent."""
        findings = self.result.findings
        for at, deps in self._depends.items():
            damaged = [d for d in deps if d in self.bad]
            if damaged:
                f = findings[at]
                findings[at] = Finding("delta-base-corrupt", ERROR, f.object,
                                       f"cannot be decoded: it depends on {damaged[0]}, which is damaged ({f.message})", f.where)
        self._depends.clear()

    def _bad_copy(self, oid: str, where: str, kind: str, message: str) -> None:
        self.bad[oid] = self.bad.get(oid, 0) + 1
        self.add(kind, oid, message, where)

    # --- leftovers -----------------------------------------------------------------------------
    def check_leftovers(self, now: float) -> None:
        """Temp files, index-less packs and lock files anywhere under .ah/ (gc.lock is not
        one: gc holds it with flock, and the file stays)."""
        for dirpath, _dirs, files in os.walk(self.ah_dir):
            folder = Path(dirpath)
            for fn in files:
                path = folder / fn
                if fn.startswith(TMP_PREFIX):
                    kind = "temp-file"
                elif fn.endswith(".lock") and not (folder == self.ah_dir and fn == GC_LOCK):
                    kind = "stale-lock"
                elif fn.endswith(".pack") and folder == self.listed.pack_dir and not path.with_suffix(".idx").exists():
                    kind = "orphan-pack"
                else:
                    continue
                try:
                    age = now - os.stat(path).st_mtime
                except OSError:  # gone since listed (or unreadable: nothing more to say)
                    continue
                if age <= TMP_MAX_AGE_S:
                    self.result.in_progress += 1
                    continue
                rel = path.relative_to(self.ah_dir).as_posix()
                hours = age / 3600
                if kind == "stale-lock":
                    message = f"left {hours:.0f} h ago by a writer that did not finish; remove it if no process is writing"
                elif folder == self.listed.pack_dir or (folder.parent == self.listed.root and len(folder.name) == 2):
                    message = f"left {hours:.0f} h ago by a writer that did not finish; `ah gc` removes it"
                else:  # gc cleans only objects/pack/ and objects/<xx>/
                    message = (f"left {hours:.0f} h ago by a writer that did not finish; safe to delete "
                               f"(`ah gc` cleans only objects/pack/ and objects/<xx>/)")
                self.add(kind, rel, message)


def check_registry(
    ah_dir: Path,
    objects_dir: Path,
    refs: RefStore,
    *,
    progress_total: Callable[[int], None] | None = None,
    progress: Callable[[int], None] | None = None,
    threads: int | None = None,
) -> FsckResult:
    """Check a registry's store and refs (module docstring); never writes.

    `progress_total(n)` is told the number of stored copies once they are listed, and
    `progress(k)` each time k more were checked.
    """
    start = time.monotonic()
    now = time.time()
    ah_dir = Path(ah_dir)
    if threads is None:
        from .snapshot import WORKERS as threads
    # Refs move after the objects they name are written, and gc moves objects loose ->
    # pack: listing loose files first, then packs, then reading the refs sees everything
    # the refs name (what is written later is not checked, and not reported missing).
    loose_ids, stray = list_loose(Path(objects_dir))
    listed = _Listed(objects_dir, loose_ids)
    checker = _Checker(ah_dir, listed, refs, progress, threads)
    result = checker.result
    try:
        result.packs = len(listed.packs) + len(listed.broken)
        stored = listed.stored()
        result.objects_checked = len(stored)
        if progress_total is not None:
            progress_total(len(loose_ids) + sum(p.count for p in listed.packs))
        # The walk first: it reads (re-hashes, parses) every reachable commit, snapshot,
        # tag and eval once, and the copy check then skips the copies it read.
        listed.progress = progress
        reach = checker.walk(checker.roots())
        listed.progress = None
        result.copies_checked, result.bytes_checked = listed.walked_copies, listed.walked_bytes
        if progress is not None and listed.walked_copies % 256:
            progress(listed.walked_copies % 256)
        checker.size_cache()  # the walk read the head of every reachable tensor: listed.deltas
        checker.check_packs()
        checker.check_loose(loose_ids)
        checker.blame_dependencies()
        del loose_ids
        checker.check_types()
        checker.check_refs(stored, reach.missing)
        checker.report_unreachable_parts(reach.missing, stored)
        result.reachable = len(reach.ids)
        result.unreachable = len(stored) - stored.count_in(reach.ids)
        del reach, stored
        checker.check_leftovers(now)
        for path, why in stray:
            checker.add("stray-file", (Path(objects_dir) / path).relative_to(ah_dir).as_posix()
                        if Path(objects_dir).is_relative_to(ah_dir) else path, why)
    finally:
        checker.close()
        listed.close()
    order = {ERROR: 0, WARNING: 1}
    result.findings.sort(key=lambda f: order[f.severity])
    result.ok = result.errors == 0
    result.seconds = time.monotonic() - start
    return result
