"""Fingerprint of a base model's weights: BLAKE3 over its safetensors tensors.

An adapter only means something on top of the exact base weights it was trained on, and a
model name plus revision can be re-pointed; a hash of the weights cannot. The fingerprint
covers every tensor of every `*.safetensors` file in the folder: its name, dtype, shape
and bytes, taken in tensor-name order, so the same weights give the same fingerprint
however they are sharded or ordered on disk, and metadata-only edits (`__metadata__`,
file names) do not change it. docs/provenance.md gives the exact construction.

Hashing a 15 GB model takes a while, so per-file results are cached in
`$AH_HOME/fingerprint-cache.json` (default `~/.config/adapterhub`) keyed by the file's
absolute path, size and mtime; a changed file is re-hashed. Tensors are hashed on a
thread pool (BLAKE3 releases the GIL) and large tensors with BLAKE3's own threads.

`mode="header"` is the cheap mode for huge models: it hashes names, dtypes, shapes and
sizes only (the safetensors headers), never the bytes, and is recorded as such so nobody
mistakes it for a full fingerprint.
"""

from __future__ import annotations

import json
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import blake3

from .errors import MalformedSafetensors, UsageError
from .fsutil import atomic_write
from .safetensors_file import parse_layout

ALGORITHM = "blake3-safetensors-v1"
MODES = ("full", "header")
CACHE_FILE = "fingerprint-cache.json"
CACHE_VERSION = 1
WORKERS = min(8, os.cpu_count() or 1)
_BIG_TENSOR = 1 << 24  # above this, let BLAKE3 split the tensor over its own threads


class FingerprintError(UsageError):
    """The base model folder cannot be fingerprinted (missing, no safetensors, malformed)."""


def ah_home() -> Path:
    """The user's config folder: `$AH_HOME`, default `~/.config/adapterhub`."""
    return Path(os.environ.get("AH_HOME") or Path.home() / ".config" / "adapterhub")


@dataclass(frozen=True)
class Fingerprint:
    """What `fingerprint_model` measured.

    Attributes:
        digest: 64-hex BLAKE3 digest over all tensors (see module doc).
        mode: "full" (tensor bytes hashed) or "header" (names/dtypes/shapes/sizes only).
        files: number of safetensors files.
        tensors: number of tensors.
        bytes: total tensor bytes covered.
        cached_files: how many files came from the cache (0 on a cold run).
    """

    digest: str
    mode: str
    files: int
    tensors: int
    bytes: int
    cached_files: int = 0

    def to_json(self) -> dict:
        """The provenance form: everything but the cache statistics."""
        return {
            "algorithm": ALGORITHM,
            "mode": self.mode,
            "digest": self.digest,
            "files": self.files,
            "tensors": self.tensors,
            "bytes": self.bytes,
        }


def _tensor_entry(mm: mmap.mmap | bytes, span, mode: str) -> list:
    """[name, dtype, shape, nbytes, digest-or-None] for one tensor."""
    nbytes = span.end - span.start
    digest = None
    if mode == "full":
        threads = blake3.blake3.AUTO if nbytes > _BIG_TENSOR else 1
        digest = blake3.blake3(memoryview(mm)[span.start : span.end], max_threads=threads).hexdigest()
    return [span.name, span.dtype, list(span.shape), nbytes, digest]


def _scan_file(path: Path, mode: str, pool: ThreadPoolExecutor) -> list[list]:
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size == 0:
            raise FingerprintError(f"{path}: empty file is not safetensors")
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            try:
                layout = parse_layout(mm, str(path))
            except MalformedSafetensors as exc:
                raise FingerprintError(f"cannot fingerprint base model: {exc}") from None
            return list(pool.map(lambda s: _tensor_entry(mm, s, mode), layout.tensors))
        finally:
            mm.close()


class _Cache:
    """Per-file tensor entries keyed by (absolute path, size, mtime_ns, mode)."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict = {}
        self.dirty = False
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict) and data.get("version") == CACHE_VERSION and isinstance(data.get("files"), dict):
                self.entries = data["files"]
        except (OSError, ValueError):
            pass  # a missing or damaged cache only costs a re-hash

    @staticmethod
    def key(path: Path, st: os.stat_result, mode: str) -> str:
        return f"{mode}:{st.st_size}:{st.st_mtime_ns}:{path}"

    def get(self, key: str):
        value = self.entries.get(key)
        return value if isinstance(value, list) else None

    def put(self, key: str, path: Path, tensors: list) -> None:
        # Drop stale keys of the same file so the cache does not grow with every edit.
        suffix = f":{path}"
        for old in [k for k in self.entries if k.endswith(suffix)]:
            del self.entries[old]
        self.entries[key] = tensors
        self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, json.dumps({"version": CACHE_VERSION, "files": self.entries}).encode())
        except OSError:
            pass  # the cache is an optimisation; a read-only home must not fail a commit


def model_files(folder: Path) -> list[Path]:
    """The `*.safetensors` files under `folder`, sorted by relative path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FingerprintError(f"base model folder {folder} does not exist or is not a folder")
    files = sorted(p for p in folder.rglob("*.safetensors") if p.is_file())
    if not files:
        raise FingerprintError(f"base model folder {folder} holds no .safetensors files to fingerprint")
    return files


def fingerprint_model(folder: Path | str, mode: str = "full", *, use_cache: bool = True) -> Fingerprint:
    """Fingerprint the safetensors weights in `folder` (see module doc)."""
    if mode not in MODES:
        raise UsageError(f"fingerprint mode must be one of {', '.join(MODES)}, got {mode!r}")
    files = model_files(Path(folder))
    cache = _Cache(ah_home() / CACHE_FILE) if use_cache else None
    tensors: dict[str, list] = {}
    cached = 0
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        for path in files:
            abspath = path.resolve()
            st = abspath.stat()
            key = _Cache.key(abspath, st, mode)
            entries = cache.get(key) if cache else None
            if entries is None:
                entries = _scan_file(abspath, mode, pool)
                if cache:
                    cache.put(key, abspath, entries)
            else:
                cached += 1
            for entry in entries:
                name = entry[0]
                if name in tensors:
                    raise FingerprintError(f"tensor {name!r} appears in more than one file under {folder}")
                tensors[name] = entry
    if cache:
        cache.save()
    h = blake3.blake3(f"{ALGORITHM}\0{mode}\n".encode())
    total = 0
    for name in sorted(tensors):
        _, dtype, shape, nbytes, digest = tensors[name]
        total += nbytes
        line = json.dumps([name, dtype, shape, nbytes] + ([digest] if mode == "full" else []), separators=(",", ":"))
        h.update(line.encode("utf-8") + b"\n")
    return Fingerprint(h.hexdigest(), mode, len(files), len(tensors), total, cached)


# --- datasets -------------------------------------------------------------------------

DATASET_ALGORITHM = "blake3-tree-v1"


def _hash_file(path: Path) -> str:
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_dataset(path: Path | str) -> dict:
    """Content hash of a local dataset file or folder, independent of where it lives.

    A folder is hashed as its sorted list of (relative POSIX path, size, BLAKE3 of the
    bytes); a symlink contributes its target text, never what it points at (so the hash
    cannot wander outside the folder and is deterministic). Returns the provenance form.
    """
    root = Path(path)
    if root.is_file():
        items = [(root.name, root)]
    elif root.is_dir():
        items = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames) + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
                full = Path(dirpath) / name
                items.append((full.relative_to(root).as_posix(), full))
        items.sort()
    else:
        raise FingerprintError(f"dataset path {path} is neither a file nor a folder")
    regular = [p for _, p in items if not p.is_symlink()]
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        digests = dict(zip(regular, pool.map(_hash_file, regular)))
    h = blake3.blake3(f"{DATASET_ALGORITHM}\n".encode())
    total = 0
    for rel, full in items:
        if full.is_symlink():
            entry = [rel, "symlink", os.readlink(full)]
        else:
            size = full.stat().st_size
            total += size
            entry = [rel, size, digests[full]]
        h.update(json.dumps(entry, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n")
    return {
        "algorithm": DATASET_ALGORITHM,
        "kind": "file" if root.is_file() else "folder",
        "digest": h.hexdigest(),
        "files": len(items),
        "bytes": total,
    }


# --- choosing a mode ------------------------------------------------------------------

DEFAULT_FULL_MAX_BYTES = 32 << 30


def choose_mode(folder: Path | str) -> str:
    """`$AH_FINGERPRINT_MODE` (full, header or auto; default auto).

    auto hashes the bytes of models up to `$AH_FINGERPRINT_FULL_MAX` bytes (default 32 GiB)
    and falls back to the header-only mode above that, so a commit against a huge local
    base model does not stall for minutes on its first run.
    """
    mode = os.environ.get("AH_FINGERPRINT_MODE", "auto").strip().lower()
    if mode in MODES:
        return mode
    if mode != "auto":
        raise UsageError(f"AH_FINGERPRINT_MODE must be full, header or auto, got {mode!r}")
    raw = os.environ.get("AH_FINGERPRINT_FULL_MAX")
    try:
        limit = int(raw) if raw else DEFAULT_FULL_MAX_BYTES
    except ValueError:
        raise UsageError(f"AH_FINGERPRINT_FULL_MAX must be a byte count, got {raw!r}") from None
    total = sum(p.stat().st_size for p in model_files(Path(folder)))
    return "full" if total <= limit else "header"
