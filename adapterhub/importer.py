"""`ah import DIR...`: many adapter folders in one run, straight into packs.

Each folder becomes one commit on the branch named after the folder (with an optional
prefix), on top of that branch's tip when it exists. The expensive part (reading,
validating, hashing and encoding every file) runs in worker processes, one per core;
each worker skips objects the registry or the worker itself already has, so tensors
shared by many adapters are encoded once per worker. The parent only appends the
records it has not seen to a pack (rolled every `PACK_ROLL_OBJECTS`), never writing a
loose file. Refs move last, in one step: new branches go straight into packed-refs (all
or nothing), existing ones by compare-and-swap from the tip read at the start. An import
that fails or is killed before that step leaves only unreachable packs, which gc prunes
after its grace period; it never leaves a branch pointing at a missing object.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import zstandard

from . import codec
from . import provenance as prov
from .errors import AhError, UsageError
from .objects import BLOB, COMMIT, SNAPSHOT, Commit, ObjectId, hash_object, header, parse_object, split_canonical
from .packstore import PackedObjectStore
from .refs import HEADS, check_ref_name
from .snapshot import store_folder
from .encoding.zstd import ZSTD_LEVEL
from .store import ObjectStore

# A pack is closed and a new one started after this many objects: bounds the writer's
# in-memory index, and a very long import becomes visible to gc in pieces.
PACK_ROLL_OBJECTS = 1_000_000
CHUNK = 16
# Adapters encoded in the parent before the workers start; the compression dictionary of
# every snapshot and commit is trained on them (structured_dictionary).
DICT_SAMPLE = 256
# Sizes of trained dictionary tried (trained_dictionary keeps the best on held-out
# adapters): on the scale benchmark's adapters 16 kB or 64 kB was never the best.
DICT_SIZES = (24 * 1024, 32 * 1024, 48 * 1024)


class ImportFailed(AhError):
    """One folder of an import failed; names the folder, keeps the cause's exit code.

    (Both travel in `args`, so the error survives the trip back from a worker process.)
    """

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message, exit_code)
        self.exit_code = exit_code

    def __str__(self) -> str:
        return self.args[0]


@dataclass(frozen=True)
class ImportResult:
    """What an import did.

    Attributes:
        adapters: folders imported (one commit each).
        created: branches created.
        updated: existing branches moved forward.
        objects_written: objects added to packs (shared ones once).
        logical_bytes: total size of the imported files.
        packs: packs written.
        seconds: wall time.
    """

    adapters: int
    created: int
    updated: int
    objects_written: int
    logical_bytes: int
    packs: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.adapters / self.seconds if self.seconds else 0.0


class _CollectingStore(ObjectStore):
    """Records new objects in memory instead of writing them (a worker's side of import)."""

    def __init__(self, backing: ObjectStore):
        self.backing = backing
        self.sent: set[str] = set()
        self.out: list[tuple[str, bytes]] = []

    def has(self, oid: str) -> bool:
        return oid in self.sent or self.backing.has(oid)

    def _read_record(self, oid: str) -> bytes:
        return self.backing._read_record(oid)

    def find_prefix(self, prefix: str) -> list[ObjectId]:
        return sorted(set(self.backing.find_prefix(prefix)) | {o for o in self.sent if o.startswith(prefix)})

    def _write_record(self, oid: ObjectId, record: bytes) -> None:
        self.sent.add(oid)
        self.out.append((oid, record))

    def take(self) -> list[tuple[str, bytes]]:
        out, self.out = self.out, []
        return out


@dataclass(frozen=True)
class _Task:
    folder: str
    parent: str | None
    author: str
    timestamp: int
    message: str


@dataclass(frozen=True)
class _Encoded:
    folder: str
    commit: str
    logical_bytes: int
    records: list


_worker: dict = {}


def _init_worker(objects_dir: str, shared: dict, zdict: tuple[str, bytes] | None = None) -> None:
    _worker["store"] = _CollectingStore(PackedObjectStore(Path(objects_dir)))
    _worker["store"].structured_dict = zdict
    _worker["shared"] = shared


def structured_dictionary(sample: Sequence[_Encoded]) -> tuple[str, bytes, bytes]:
    """(id, body, record) of a dictionary blob for an import's snapshots and commits.

    A zstd dictionary trained on the sample's snapshots and commits (the first adapters;
    `trained_dictionary`), with the hex ids of files and tensors that recur among them
    appended to its content:
    - training gives it entropy tables (literal Huffman, sequence codes) fitted to these
      objects, so a frame no longer carries its own table, and content cut from the
      parts every later object repeats (keys, tensor names, dtypes, shapes, provenance);
    - an id is 64 hex digits that no compression finds elsewhere; the recurring ones
      (shared initialisations, configs, a common base) at the end of the content cost a
      short back-reference each.
    Measured on the scale benchmark's adapters (bare frames of encoding 5): snapshot and
    commit frames 122 + 77 bytes with the recurring ids plus the first adapter's own
    objects as raw content, 100-106 + 58 with this. Where zstd cannot train (too few or
    too alike samples): raw content of the recurring ids and the first snapshot and
    commit, as before training.
    """
    seen: dict[str, int] = {}
    firsts: dict[str, bytes] = {}
    by_type: dict[str, list[bytes]] = {SNAPSHOT: [], COMMIT: []}
    for enc in sample:
        for oid, record in enc.records:
            canonical = codec.decode(oid, record)
            obj_type, body = split_canonical(oid, canonical)
            if obj_type not in (SNAPSHOT, COMMIT):
                continue
            by_type[obj_type].append(bytes(canonical))
            firsts.setdefault(obj_type, bytes(body))
            if obj_type == SNAPSHOT:
                for b in parse_object(oid, obj_type, bytes(body)).blob_ids():
                    seen[b] = seen.get(b, 0) + 1
    recurring = "".join(b for b, n in seen.items() if n > 1).encode()
    data = trained_dictionary(by_type[SNAPSHOT], by_type[COMMIT], recurring)
    if data is None:
        data = recurring + firsts.get(SNAPSHOT, b"") + firsts.get(COMMIT, b"")
    dict_id = hash_object(BLOB, data)
    return dict_id, data, codec.encode([header(BLOB, len(data)), data])


def trained_dictionary(snapshots: list[bytes], commits: list[bytes], suffix: bytes) -> bytes | None:
    """The best of a few trained dictionaries (each + `suffix`) for these canonical
    snapshots and commits, or None where zstd cannot train on them.

    zstd's trainer is sensitive to its inputs: on the scale benchmark's adapters the
    snapshot frames came out 100 to 121 bytes depending on the dictionary size and on
    whether the samples were grouped by type or interleaved, with no setting best every
    time. So candidates (DICT_SIZES x both orders) are trained on the first 7/8 of the
    sample and scored on the rest, frames they have not seen, as the later adapters are
    (~0.4 s for 256 adapters; scored on seen frames the candidate that memorised their
    own ids would win). Samples too few to hold some out: one candidate, no scoring.
    """
    cut = len(snapshots) * 7 // 8 if len(snapshots) >= 8 else len(snapshots)
    train_s, train_c = snapshots[:cut], commits[:cut]
    held = snapshots[cut:] + commits[cut:]
    orders = [train_s + train_c, [x for pair in zip(train_s, train_c) for x in pair]]
    total = sum(map(len, train_s + train_c))
    best = None
    for size in DICT_SIZES if held else DICT_SIZES[:1]:
        for samples in orders if held else orders[:1]:
            try:
                data = zstandard.train_dictionary(min(size, total), samples, level=ZSTD_LEVEL).as_bytes() + suffix
            except zstandard.ZstdError:
                continue
            cctx = codec.bare_frame_compressor(data)
            score = sum(len(cctx.compress(x)) for x in held)
            if best is None or score < best[0]:
                best = (score, data)
    return best[1] if best else None


def _encode(task: _Task) -> _Encoded:
    """Validate, hash and encode one folder and its commit (in a worker process)."""
    store: _CollectingStore = _worker["store"]
    try:
        snap_id, stats = store_folder(store, Path(task.folder))
        record = prov.collect(Path(task.folder), shared=_worker["shared"])
        commit = Commit(snap_id, (ObjectId(task.parent),) if task.parent else (), task.author, task.timestamp,
                        task.message, record)
        cid = store.put(COMMIT, commit.serialize())
    except AhError as exc:
        store.take()
        raise ImportFailed(f"{task.folder}: {exc}", exc.exit_code) from None
    return _Encoded(task.folder, cid, stats.logical_bytes, store.take())


def _reencode(enc: _Encoded) -> _Encoded:
    """`enc` with its snapshot and commit records encoded again with the worker store's
    dictionary (the sample adapters were encoded before the dictionary existed)."""
    store: _CollectingStore = _worker["store"]
    records = []
    for oid, record in enc.records:
        obj_type, body = split_canonical(oid, codec.decode(oid, record))
        if obj_type in (SNAPSHOT, COMMIT):
            record = store.encode_record(oid, obj_type, bytes(body))
        records.append((oid, record))
    return _Encoded(enc.folder, enc.commit, enc.logical_bytes, records)


def branch_names(folders: Sequence[Path], prefix: str = "") -> list[str]:
    """Branch name per folder (prefix + folder name), checked and unique."""
    names = []
    seen: dict[str, Path] = {}
    for folder in folders:
        base = Path(folder).name
        name = prefix + (base if base not in ("", ".", "..") else Path(folder).resolve().name)
        check_ref_name(name)
        if name in seen:
            raise UsageError(f"{seen[name]} and {folder} would both import into branch {name!r}")
        seen[name] = Path(folder)
        names.append(name)
    return names


def import_folders(
    ah_dir: Path,
    store: PackedObjectStore,
    refs,
    folders: Sequence[Path | str],
    *,
    prefix: str = "",
    message: str | None = None,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> ImportResult:
    """Import each folder as a commit on branch `prefix + <folder name>`."""
    start = time.perf_counter()
    folders = [Path(f) for f in folders]
    if not folders:
        raise UsageError("nothing to import: give one or more adapter folders")
    for f in folders:
        if not f.is_dir():
            raise UsageError(f"{f} is not a folder")
    names = branch_names(folders, prefix)
    tips = {n: refs.read(HEADS + n) for n in names}
    author = prov.default_author()
    stamp = prov.now()
    tasks = [
        _Task(str(f), tips[n], author, stamp, message or f"import {f.name}") for f, n in zip(folders, names)
    ]
    commit_of: dict[str, str] = {}
    logical = written = packs = 0
    seen: set[bytes] = set()
    writer = store.writer(dedup=False)  # `seen` below keeps ids unique
    workers = workers or os.cpu_count() or 1
    shared = prov.shared_context()
    try:
        # The first folders in process, without a dictionary: what they share becomes the
        # dictionary the workers compress every snapshot and commit with (kept only where
        # smaller); their own snapshots and commits are then re-encoded with it.
        _init_worker(str(store.root), shared)
        sample = [_encode(t) for t in tasks[:DICT_SAMPLE]]
        zdict_id, zdict_data, zdict_record = structured_dictionary(sample)
        zdict = (zdict_id, zdict_data)
        _worker["store"].structured_dict = zdict
        sample = [_reencode(enc) for enc in sample]
        if not store.has(zdict_id):
            writer.add(zdict_id, zdict_record)
            written += 1
        seen.add(bytes.fromhex(zdict_id))
        rest = tasks[DICT_SAMPLE:]
        if workers > 1 and len(rest) > CHUNK:
            pool = multiprocessing.get_context("fork").Pool(workers, _init_worker, (str(store.root), shared, zdict))
            results = itertools.chain(sample, pool.imap_unordered(_encode, rest, chunksize=CHUNK))
        else:
            pool = None
            results = itertools.chain(sample, map(_encode, rest))
        try:
            for enc in results:
                for oid, record in enc.records:
                    # Workers already skipped what the registry held when they looked;
                    # `seen` catches what two workers both encoded during this import.
                    key = bytes.fromhex(oid)
                    if key in seen:
                        continue
                    seen.add(key)
                    writer.add(key, record)
                    written += 1
                if len(writer) >= PACK_ROLL_OBJECTS:
                    writer.finish()
                    packs += 1
                    writer = store.writer(dedup=False)
                commit_of[enc.folder] = enc.commit
                logical += enc.logical_bytes
                if progress:
                    progress(1)
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
        if writer.finish() is not None:
            packs += 1
    except BaseException:
        writer.abort()
        raise
    store.add_pack_written()
    # Refs last: every object they point at is in a finished pack by now.
    new = {HEADS + n: ObjectId(commit_of[str(f)]) for f, n in zip(folders, names) if tips[n] is None}
    if new:
        refs.create_packed(new, who=author, message="import")
    updated = 0
    for f, n in zip(folders, names):
        if tips[n] is not None:
            refs.update(HEADS + n, ObjectId(commit_of[str(f)]), expected=tips[n], who=author,
                        message=f"import: {f.name}")
            updated += 1
    return ImportResult(len(tasks), len(new), updated, written, logical, packs, time.perf_counter() - start)
