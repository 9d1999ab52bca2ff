"""Adapter folder <-> snapshot object.

Committing splits every `.safetensors` file into its header and one `tensor` object per
tensor (so an unchanged tensor is stored once, across revisions and adapters), and
stores every other file whole. Checkout writes each file back byte for byte. Both
directions refuse pickle weights, malformed safetensors and unsafe names.
"""

from __future__ import annotations

import math
import mmap
import os
import stat
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from .errors import BadAdapter, CheckoutError, CorruptObject, MalformedSafetensors, PickleRefused
from .fsutil import atomic_write
from .objects import BLOB, SNAPSHOT, FileEntry, ObjectId, Snapshot, TensorEntry
from .paths import check_relpath, ensure_real_dir
from .safetensors_file import DTYPE_SIZES, parse_layout, rebuild_prefix
from .store import ObjectStore

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
SAFETENSORS_SUFFIX = ".safetensors"


def _threads_wanted() -> int:
    """AH_THREADS when it is a positive whole number, else one per core up to 4 (a value
    that is not is reported once and ignored: a typo must not stop every command)."""
    default = min(4, os.cpu_count() or 1)
    value = os.environ.get("AH_THREADS", "").strip()
    if not value:
        return default
    if value.isdigit() and int(value) > 0:
        return int(value)
    warnings.warn(f"AH_THREADS={value!r} is not a positive whole number; using {default} threads", stacklevel=2)
    return default


# Threads for hashing and encoding a file's tensors at commit and for decoding them at
# checkout (the native codec's own C threads; the Python pool below only when it is
# missing). Files under PARALLEL_MIN_BYTES (a few-kB adapter of a bulk import) stay on
# one thread: waking the others costs more. AH_THREADS sets the count (1: one thread),
# like git's pack.threads.
WORKERS = _threads_wanted()
PARALLEL_MIN_BYTES = 1 << 20
# A checkout decodes a file's tensors in batches of about this many bytes (iter_file_bytes).
READ_BATCH_BYTES = 64 << 20
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def codec_pool() -> ThreadPoolExecutor:
    """The process's WORKERS Python threads for the codec's fallback path (no native batch
    encoder: numpy kernels, or no libzstd; the native one keeps C threads of its own),
    made on first use and kept: a thread keeps its zstd contexts and scratch memory from
    one file and commit to the next, where a pool per commit paid for them again each
    time. A forked child starts without it."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="ah-codec")
        return _pool


def _forget_pool_in_child() -> None:
    # The parent's threads do not exist in a forked child: a pool there would never run
    # a task. The child makes its own on first use.
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool_in_child)


Progress = Callable[[int], None]


def looks_like_pickle(head: bytes) -> bool:
    """Pickle protocol 2+ stream, or a torch.save zip archive (which wraps a pickle)."""
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return True
    return head.startswith(b"PK\x03\x04") and b".pkl" in head


def _refuse_pickle(rel: str, why: str) -> None:
    raise PickleRefused(
        f"{rel}: {why}; pickle weights can run code when loaded and are never unpickled. "
        "Convert them to safetensors (e.g. model.save_pretrained(..., safe_serialization=True))"
    )


def _parse_safetensors(data, rel: str):
    """parse_layout; a file that fails it and opens like a pickle is reported as a pickle.

    The pickle sniff must not run first on a `.safetensors` file: a valid one whose 8-byte
    header length begins 0x80 0x02..0x05 (a 640, 896, 1152 or 1408-byte header) opens
    exactly like a pickle stream.
    """
    try:
        return parse_layout(data, rel)
    except MalformedSafetensors:
        if looks_like_pickle(bytes(data[:4096])):
            _refuse_pickle(rel, "file content is a pickle or torch.save archive")
        raise


def check_file(rel: str, full: Path) -> None:
    """Refuse pickle weights and malformed safetensors, reading only headers.

    `store_folder` runs this over every file before it stores a single object, so a
    refused folder leaves no orphan objects behind (the safetensors data region is
    mapped, not read: only its header is touched).
    """
    lower = rel.lower()
    if lower.endswith(PICKLE_SUFFIXES):
        _refuse_pickle(rel, "pickle-based weights file")
    with open(full, "rb") as fh:
        if lower.endswith(SAFETENSORS_SUFFIX):
            if os.fstat(fh.fileno()).st_size == 0:
                parse_layout(b"", rel)
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as view:
                _parse_safetensors(view, rel)
        elif looks_like_pickle(fh.read(4096)):
            _refuse_pickle(rel, "file content is a pickle or torch.save archive")


def list_adapter_files(folder: Path) -> list[tuple[str, Path]]:
    """(relative POSIX path, absolute path) of every file, sorted; refuses symlinks."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BadAdapter(f"{folder} is not a folder")
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in list(dirnames) + filenames:
            full = Path(dirpath) / name
            rel = full.relative_to(folder).as_posix()
            check_relpath(rel)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                raise BadAdapter(f"{rel} is a symlink; adapter folders must hold plain files")
            if name in filenames and not stat.S_ISREG(st.st_mode):
                raise BadAdapter(f"{rel} is not a regular file")
        for name in filenames:
            full = Path(dirpath) / name
            out.append((full.relative_to(folder).as_posix(), full))
    out.sort()
    if not out:
        raise BadAdapter(f"{folder} holds no files")
    return out


@dataclass(frozen=True)
class SnapshotStats:
    """What a commit stored.

    Attributes:
        files: files in the snapshot.
        tensors: tensors across all safetensors files.
        logical_bytes: total size of the files.
        new_objects: objects that were not in the store before.
        snapshot: the snapshot stored (a caller committing again on top of it offers it
            back as `delta_from`, and so skips reading and parsing it).
    """

    files: int
    tensors: int
    logical_bytes: int
    new_objects: int
    snapshot: Snapshot | None = field(default=None, repr=False, compare=False)


def delta_bases(store: ObjectStore, snap: ObjectId | Snapshot | None) -> dict[tuple[str, str], TensorEntry]:
    """(file path, tensor name) -> tensor entry of a snapshot (given by id, or already in
    hand): where a new revision's tensors look for a delta base (the same-named tensor of
    the parent)."""
    if snap is None:
        return {}
    if not isinstance(snap, Snapshot):
        snap = store.get_snapshot(snap)
    return {(f.path, t.name): t for f in snap.files for t in f.tensors}


def store_folder(
    store: ObjectStore, folder: Path, progress: Progress | None = None, *, delta_from: ObjectId | Snapshot | None = None
) -> tuple[ObjectId, SnapshotStats]:
    """Validate and store an adapter folder; return the snapshot id and what was stored.

    `delta_from` (the parent revision's snapshot, its id or the Snapshot itself) offers
    each tensor the same-named, same-shaped tensor there as a delta base; the store keeps
    the delta only when smaller.
    """
    files = list_adapter_files(Path(folder))
    bases = delta_bases(store, delta_from)
    tensor_bytes = 0
    for rel, full in files:
        check_file(rel, full)
        if rel.lower().endswith(SAFETENSORS_SUFFIX):
            tensor_bytes += full.stat().st_size
    # Room for this revision's tensors, its parent's and its grandparent's (BaseCache.reserve).
    store.base_cache.reserve(3 * tensor_bytes + (16 << 20))
    entries: list[FileEntry] = []
    new = 0
    ntensors = 0
    logical = 0

    def put(obj_type: str, body) -> ObjectId:
        nonlocal new
        oid, created = store.put_ex(obj_type, body)
        new += created
        return oid

    def delta_base_id(rel: str, spec) -> str | None:
        """The parent's same-named tensor, when it has the same dtype and size (a base of
        another size is no delta base: reading it, say a rank-64 parent under a rank-8
        retrain, only cost time and memory)."""
        base = bases.get((rel, spec.name))
        if base is None or base.dtype != spec.dtype or math.prod(base.shape) != math.prod(spec.shape):
            return None
        return base.blob

    for rel, full in files:
        lower = rel.lower()
        if lower.endswith(PICKLE_SUFFIXES):
            _refuse_pickle(rel, "pickle-based weights file")
        data = full.read_bytes()
        logical += len(data)
        if not lower.endswith(SAFETENSORS_SUFFIX) and looks_like_pickle(data[:4096]):
            _refuse_pickle(rel, "file content is a pickle or torch.save archive")
        if lower.endswith(SAFETENSORS_SUFFIX):
            layout = _parse_safetensors(data, rel)
            view = memoryview(data)
            # Threads pay off on big files only; for a few-kB adapter (bulk import)
            # starting them costs more than encoding inline (see WORKERS).
            big = len(data) >= PARALLEL_MIN_BYTES
            stored = store.put_tensors(
                [(view[s.start : s.end], s.dtype, delta_base_id(rel, s)) for s in layout.tensors],
                codec_pool() if big else None,
                WORKERS if big else 1,
            )
            new += sum(created for _, created in stored)
            header_id = put(BLOB, layout.header)
            tensors = tuple(TensorEntry(s.name, s.dtype, s.shape, oid) for s, (oid, _) in zip(layout.tensors, stored))
            ntensors += len(tensors)
            entries.append(FileEntry(rel, "safetensors", len(data), header_id, tensors))
        else:
            entries.append(FileEntry(rel, "file", len(data), put(BLOB, data)))
        if progress:
            progress(len(data))
    snap = Snapshot(tuple(entries))
    snap.check()
    snap_id = put(SNAPSHOT, snap.serialize())
    return snap_id, SnapshotStats(len(entries), ntensors, logical, new, snap)


def iter_file_bytes(store: ObjectStore, entry: FileEntry, snap_id: str = "") -> Iterator[bytes]:
    """The bytes of one snapshot file, in order, each piece verified on read."""
    for pieces in _file_batches(store, entry):
        yield from pieces


def _file_batches(store: ObjectStore, entry: FileEntry) -> Iterator[list[bytes]]:
    """iter_file_bytes' pieces, a list at a time: the blob; or the safetensors prefix, then
    each batch of tensors (materialize writes a list with one system call)."""
    if entry.kind == "file":
        yield [_read_blob(store, entry.blob, BLOB)]
        return
    header = _read_blob(store, entry.blob, BLOB)
    pieces = [rebuild_prefix(header)]  # goes out with the first batch

    # Tensors are read in batches of up to READ_BATCH_BYTES (one native call each, on
    # WORKERS threads for big files), so memory stays bounded whatever the file's size.
    threads = WORKERS if entry.size >= PARALLEL_MIN_BYTES else 1
    batch: list[tuple[TensorEntry, int]] = []
    batch_bytes = 0
    for i, entry_t in enumerate(entry.tensors):
        expected = DTYPE_SIZES.get(entry_t.dtype, 0)
        for d in entry_t.shape:
            expected *= d
        batch.append((entry_t, expected))
        batch_bytes += expected
        if batch_bytes < READ_BATCH_BYTES and i + 1 < len(entry.tensors):
            continue
        # Run by run (ObjectStore.iter_read_tensors): the caller writes one while the next decodes.
        checked = 0
        for bodies in store.iter_read_tensors([t.blob for t, _ in batch], threads):
            for (t, expected), data in zip(batch[checked:], bodies):
                if len(data) != expected:
                    raise CorruptObject(t.blob, f"tensor {t.name!r} has {len(data)} bytes, its shape needs {expected}")
            checked += len(bodies)
            pieces += bodies
            yield pieces
            pieces = []
        batch, batch_bytes = [], 0
    if pieces:
        yield pieces


def _read_blob(store: ObjectStore, oid: str, obj_type: str) -> bytes:
    got_type, body = store.read(oid)
    if got_type != obj_type:
        raise CorruptObject(oid, f"expected a {obj_type}, found a {got_type}")
    return body


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def materialize(
    store: ObjectStore, snap_id: ObjectId, out: Path, *, force: bool = False, progress: Progress | None = None
) -> Snapshot:
    """Write a snapshot's files into `out`.

    `out` must be missing or empty unless `force`; with `force`, snapshot files replace
    what is there (a symlink in the way is replaced, never followed) and other files stay.
    """
    snap = store.get_snapshot(snap_id)
    out = Path(out)
    # An adapter may hold files named `HEAD` or `config.json`: written into a registry's
    # own `.ah/` (a mistyped `-o` with --force), they would overwrite the registry.
    if any(part.lower() == ".ah" for part in out.resolve().parts):
        raise CheckoutError(f"refusing to check out into {out}: it is inside a registry's .ah/ folder")
    if os.path.lexists(out):
        if out.is_symlink():
            raise CheckoutError(f"refusing to check out into {out}: it is a symlink")
        if not out.is_dir():
            raise CheckoutError(f"{out} exists and is not a folder")
        if not force and not _is_empty_dir(out):
            raise CheckoutError(f"{out} is not empty; use --force to overwrite the adapter's files in it")
    else:
        out.mkdir(parents=True)
    for entry in snap.files:
        check_relpath(entry.path)
        parent_rel, _, _name = entry.path.rpartition("/")
        parent = ensure_real_dir(out, parent_rel)
        target = parent / _name
        written = 0

        def counted(batches):
            nonlocal written
            for pieces in batches:
                written += sum(map(len, pieces))
                yield pieces

        atomic_write(target, counted(_file_batches(store, entry)), durable=False, user_file=True)
        if written != entry.size:
            raise CorruptObject(snap_id, f"{entry.path} rebuilt to {written} bytes, snapshot says {entry.size}")
        if progress:
            progress(entry.size)
    return snap
