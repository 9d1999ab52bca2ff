"""Pack files: many stored records in one file, found through a sorted index.

A million adapters as loose files would be millions of inodes and directory entries; a
pack holds them in one file and its index finds any one with a 256-way fan-out and a
binary search over sorted ids, without reading the pack. Byte layout in
docs/format/packs.md:

    pack-<name>.pack   "AHPK" u32 version | records ... | u64 count | 32-byte BLAKE3 of all before
    pack-<name>.idx    "AHIX" u32 version | u64 count | 256 x u32 fan-out
                       | count x 32-byte ids (sorted) | count x u64 offsets
                       | count x u64 record lengths | count x u64 raw lengths
                       | 32-byte pack checksum | 32-byte BLAKE3 of the index before it

Records are the same `AHO1` records loose objects hold (store.md), copied byte for byte,
so a pack never re-encodes and every read still re-hashes the decoded object. `<name>` is
the hex pack checksum. A writer streams records into a temp file, then renames the pack
and only then the index into place: readers find packs by their index, so they never see a
pack that is not complete, and a killed writer leaves only `.tmp-*` files.
"""

from __future__ import annotations

import mmap
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import blake3

from .errors import CorruptObject, ObjectNotFound
from .fsutil import TMP_PREFIX, atomic_write, fsync_dir
from .objects import ObjectId

PACK_MAGIC = b"AHPK"
IDX_MAGIC = b"AHIX"
VERSION = 1
PACK_HEAD = struct.Struct("<4sI")
PACK_TAIL = struct.Struct("<Q32s")
IDX_HEAD = struct.Struct("<4sIQ")
FANOUT = struct.Struct("<256I")
OID_LEN = 32
# Per entry: id + offset + record length + raw length.
ENTRY_BYTES = OID_LEN + 8 + 8 + 8
IDX_TAIL = 32 + 32


@dataclass(frozen=True)
class PackEntry:
    """Where one object lives in a pack.

    Attributes:
        oid: object id.
        offset: byte offset of its record in the pack file.
        length: length of the stored record.
        raw_len: length of the object's canonical bytes (for stats, without reading).
    """

    oid: ObjectId
    offset: int
    length: int
    raw_len: int


def _corrupt(path: Path, reason: str) -> CorruptObject:
    return CorruptObject(f"pack {path.name}", reason)


def _map(path: Path) -> mmap.mmap | bytes:
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size == 0:
            return b""
        return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)


class Pack:
    """One pack and its index, memory-mapped; checks structure on open, records on read."""

    def __init__(self, idx_path: Path):
        self.idx_path = Path(idx_path)
        self.path = self.idx_path.with_suffix(".pack")
        self._idx = _map(self.idx_path)
        self._load_index()
        try:
            self._pack = _map(self.path)
        except FileNotFoundError:
            raise _corrupt(self.idx_path, f"its pack file {self.path.name} is missing") from None
        self._check_pack()

    # --- opening -------------------------------------------------------------------------
    def _load_index(self) -> None:
        idx = self._idx
        path = self.idx_path
        if len(idx) < IDX_HEAD.size + FANOUT.size + IDX_TAIL:
            raise _corrupt(path, f"index is truncated ({len(idx)} bytes)")
        magic, version, count = IDX_HEAD.unpack_from(idx)
        if magic != IDX_MAGIC:
            raise _corrupt(path, "index has a bad magic number")
        if version != VERSION:
            raise _corrupt(path, f"index version {version} is not supported (this build reads {VERSION})")
        expect = IDX_HEAD.size + FANOUT.size + count * ENTRY_BYTES + IDX_TAIL
        if len(idx) != expect:
            raise _corrupt(path, f"index is truncated or padded: {len(idx)} bytes, {count} entries need {expect}")
        # The index checksum is checked by verify() (gc, fsck), not here: hashing a
        # million-adapter index (hundreds of MB) would cost every `ah` command a tenth of
        # a second, and reads do not need it: a damaged id is a miss, a damaged offset or
        # length reaches bytes that fail the record's own checks and re-hash.
        self._idx_end = expect
        self.fanout = FANOUT.unpack_from(idx, IDX_HEAD.size)
        if self.fanout[255] != count or any(self.fanout[i] > self.fanout[i + 1] for i in range(255)):
            raise _corrupt(path, "index fan-out table is inconsistent")
        self.count = count
        self._ids_at = IDX_HEAD.size + FANOUT.size
        self._off_at = self._ids_at + count * OID_LEN
        self._len_at = self._off_at + count * 8
        self._raw_at = self._len_at + count * 8
        self.checksum = bytes(idx[expect - IDX_TAIL : expect - 32])

    def _check_pack(self) -> None:
        pack = self._pack
        if len(pack) < PACK_HEAD.size + PACK_TAIL.size:
            raise _corrupt(self.path, f"pack is truncated ({len(pack)} bytes)")
        magic, version = PACK_HEAD.unpack_from(pack)
        if magic != PACK_MAGIC or version != VERSION:
            raise _corrupt(self.path, "pack has a bad magic number or an unsupported version")
        count, checksum = PACK_TAIL.unpack_from(pack, len(pack) - PACK_TAIL.size)
        if checksum != self.checksum or count != self.count:
            raise _corrupt(self.path, "pack is truncated or damaged: its trailer does not match its index")
        self.data_end = len(pack) - PACK_TAIL.size

    def verify(self) -> None:
        """Re-hash the index and the whole pack against their checksums (gc and fsck;
        reads check per object)."""
        idx_body = memoryview(self._idx)[: self._idx_end - 32]
        if blake3.blake3(idx_body, max_threads=blake3.blake3.AUTO).digest() != bytes(self._idx[self._idx_end - 32 : self._idx_end]):
            raise _corrupt(self.idx_path, "index checksum does not match its content")
        body = memoryview(self._pack)[: len(self._pack) - 32]
        if blake3.blake3(body, max_threads=blake3.blake3.AUTO).digest() != self.checksum:
            raise _corrupt(self.path, "pack checksum does not match its content")

    # --- lookups -------------------------------------------------------------------------
    def _id(self, i: int) -> bytes:
        at = self._ids_at + i * OID_LEN
        return self._idx[at : at + OID_LEN]

    def _lower_bound(self, key: bytes) -> int:
        lo = self.fanout[key[0] - 1] if key[0] else 0
        hi = self.fanout[key[0]]
        while lo < hi:
            mid = (lo + hi) // 2
            if self._id(mid) < key:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def find(self, oid: str) -> int | None:
        """Position of `oid` in the index, or None."""
        try:
            key = bytes.fromhex(oid)
        except ValueError:
            return None
        if len(key) != OID_LEN:
            return None
        i = self._lower_bound(key)
        return i if i < self.count and self._id(i) == key else None

    def entry(self, i: int) -> PackEntry:
        oid = ObjectId(self._id(i).hex())
        offset = struct.unpack_from("<Q", self._idx, self._off_at + i * 8)[0]
        length = struct.unpack_from("<Q", self._idx, self._len_at + i * 8)[0]
        raw_len = struct.unpack_from("<Q", self._idx, self._raw_at + i * 8)[0]
        return PackEntry(oid, offset, length, raw_len)

    def read_record(self, oid: str) -> bytes:
        i = self.find(oid)
        if i is None:
            raise ObjectNotFound(oid)
        e = self.entry(i)
        if e.offset < PACK_HEAD.size or e.offset + e.length > self.data_end:
            raise CorruptObject(oid, f"its entry in {self.path.name} points outside the pack (truncated pack?)")
        return self._pack[e.offset : e.offset + e.length]

    def find_prefix(self, prefix: str) -> list[ObjectId]:
        if not prefix:
            return list(self.iter_ids())
        lo_key = bytes.fromhex((prefix + "0" * 64)[:64])
        i = self._lower_bound(lo_key)
        out = []
        while i < self.count:
            h = self._id(i).hex()
            if not h.startswith(prefix):
                break
            out.append(ObjectId(h))
            i += 1
        return out

    def iter_ids(self) -> Iterator[ObjectId]:
        for i in range(self.count):
            yield ObjectId(self._id(i).hex())

    def iter_entries(self) -> Iterator[PackEntry]:
        for i in range(self.count):
            yield self.entry(i)

    @property
    def size(self) -> int:
        return len(self._pack) + len(self._idx)

    def close(self) -> None:
        for m in (self._idx, self._pack):
            if isinstance(m, mmap.mmap):
                try:
                    m.close()
                except BufferError:
                    pass  # a record slice is still referenced; the mapping goes with it


class PackWriter:
    """Stream records into a new pack; `finish` makes it visible (pack, then index).

    Use as a context manager: leaving it with an exception removes the temp files, so a
    failed or killed writer never leaves a pack a reader would open.
    """

    def __init__(self, pack_dir: Path, *, durable: bool = True):
        self.pack_dir = Path(pack_dir)
        self.pack_dir.mkdir(parents=True, exist_ok=True)
        self.durable = durable
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".pack", dir=self.pack_dir)
        self._tmp = Path(tmp)
        self._fh = os.fdopen(fd, "wb")
        self._hash = blake3.blake3()
        self._pos = 0
        self._entries: dict[bytes, tuple[int, int, int]] = {}
        self._write(PACK_HEAD.pack(PACK_MAGIC, VERSION))

    def _write(self, data: bytes | memoryview) -> None:
        self._fh.write(data)
        self._hash.update(data)
        self._pos += len(data)

    def __contains__(self, oid: str) -> bool:
        return bytes.fromhex(oid) in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, oid: str, record: bytes | memoryview, raw_len: int) -> bool:
        """Append one record (skipped when this pack already has the id); True if added."""
        key = bytes.fromhex(oid)
        if len(key) != OID_LEN:
            raise ValueError(f"not an object id: {oid!r}")
        if key in self._entries:
            return False
        self._entries[key] = (self._pos, len(record), raw_len)
        self._write(record)
        return True

    def finish(self) -> Path | None:
        """Close the pack, write its index, rename both into place; the index path (None if empty)."""
        if not self._entries:
            self.abort()
            return None
        self._write(struct.pack("<Q", len(self._entries)))
        checksum = self._hash.digest()
        self._fh.write(checksum)
        self._fh.flush()
        if self.durable:
            os.fsync(self._fh.fileno())
        self._fh.close()
        name = f"pack-{checksum.hex()}"
        pack_path = self.pack_dir / f"{name}.pack"
        idx_path = self.pack_dir / f"{name}.idx"
        os.replace(self._tmp, pack_path)
        self._tmp = None
        keys = sorted(self._entries)
        counts = [0] * 256
        for k in keys:
            counts[k[0]] += 1
        fan, total = [], 0
        for c in counts:
            total += c
            fan.append(total)
        parts = [IDX_HEAD.pack(IDX_MAGIC, VERSION, len(keys)), FANOUT.pack(*fan), b"".join(keys)]
        for field in range(3):
            parts.append(struct.pack(f"<{len(keys)}Q", *(self._entries[k][field] for k in keys)))
        parts.append(checksum)
        body = b"".join(parts)
        idx = body + blake3.blake3(body, max_threads=blake3.blake3.AUTO).digest()
        # Index last: a pack is visible only through its index, so readers never see half of one.
        atomic_write(idx_path, idx, durable=self.durable)
        if self.durable:
            fsync_dir(self.pack_dir)
        return idx_path

    def abort(self) -> None:
        if self._tmp is not None:
            self._fh.close()
            self._tmp.unlink(missing_ok=True)
            self._tmp = None

    def __enter__(self) -> "PackWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def pack_paths(pack_dir: Path) -> list[Path]:
    """Index files of the complete packs in `pack_dir` (temp files excluded)."""
    if not Path(pack_dir).is_dir():
        return []
    return sorted(p for p in Path(pack_dir).iterdir() if p.suffix == ".idx" and p.name.startswith("pack-"))
