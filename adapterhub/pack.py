"""Pack files: many stored records in one file, found through a sorted index.

A million adapters as loose files would be millions of inodes and directory entries; a
pack holds them in one file and its index finds any one with a 256-way fan-out and a
binary search over sorted ids, without reading the pack. Byte layout in
docs/format/packs.md:

    pack-<name>.pack   "AHPK" u32 1 | records ... | u64 count | 32-byte BLAKE3 of all before
    pack-<name>.idx    "AHIX" u32 2 | u64 count | u64 large count | 256 x u32 fan-out
                       | count x 32-byte ids (sorted) | count x u32 offsets
                       | count x u32 record lengths | large count x u64 (values >= 2^31)
                       | 32-byte pack checksum | 32-byte BLAKE3 of the index before it

Index version 2 spends 40 bytes per object where version 1 (still read) spent 56: offsets
and lengths are u32 with git's escape to a table of u64 for the rare value of 2 GiB or
more, and the canonical length (which `ah stats` wants) is no longer copied into the
index, since every record's 13-byte header already holds it. For a million small
adapters (four objects each) that is 64 bytes per adapter less.

Records are the same `AHO1` records loose objects hold (store.md), copied byte for byte,
so a pack never re-encodes and every read still re-hashes the decoded object. `<name>` is
the hex pack checksum. A writer streams records into a temp file, then renames the pack
and only then the index into place: readers find packs by their index, so they never see a
pack that is not complete, and a killed writer leaves only `.tmp-*` files.

Nothing here imports numpy at module level (reads must start fast); the bulk helpers for
gc and the index sort of big packs import it when first used (a commit's pack never does).
"""

from __future__ import annotations

import itertools
import mmap
import os
import struct
import sys
import tempfile
import threading
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import blake3

from . import codec
from .errors import CorruptObject, ObjectNotFound
from .fsutil import TMP_PREFIX, GatherWriter, StagedFile, fsync_dir, start_writeback
from .objects import ObjectId

PACK_MAGIC = b"AHPK"
IDX_MAGIC = b"AHIX"
PACK_VERSION = 1
IDX_VERSION = 2
IDX_VERSIONS = (1, 2)
PACK_HEAD = struct.Struct("<4sI")
PACK_TAIL = struct.Struct("<Q32s")
IDX_HEAD_V1 = struct.Struct("<4sIQ")
IDX_HEAD = struct.Struct("<4sIQQ")  # version 2: magic, version, count, large count
FANOUT = struct.Struct("<256I")
OID_LEN = 32
# Per entry. Version 1: id + u64 offset + u64 record length + u64 raw length.
ENTRY_BYTES_V1 = OID_LEN + 8 + 8 + 8
# Version 2: id + u32 offset + u32 record length (escaped to the large table at >= 2^31).
ENTRY_BYTES = OID_LEN + 4 + 4
LARGE = 1 << 31
IDX_TAIL = 32 + 32
# A durable writer asks the kernel to start writing every this many bytes it appended
# (fsutil.start_writeback), so the fsync in `finish` waits for the last stretch only.
# Writing and finishing a 64 MB pack took 112-130 ms without, 67-70 ms with 1 MiB steps;
# 256 kB steps blocked the writer more often (94-140 ms); at 4 MB it is a wash
# (/tmp/ovh/kick.py in the issue-4 notes).
WRITEBACK_STEP = 1 << 20
# Indexes bigger than this are searched with numpy when the process has it loaded.
_NUMPY_SEARCH_MIN = 4096
# add_many copies its records into a buffer of this many bytes (one a thread, kept) and
# hashes and writes it whole each time it fills: a BLAKE3 update per 14 kB record cost
# ~7.6 us, one per MiB of them ~4.4 us a record, and joining records into new 256 kB runs
# instead paid for fresh memory each time. A commit pack's records (thread CPU time, the
# 7th revision of /tmp/ahp/ck): bf16 1.2 MB 1.8-1.95 ms joined, 1.5 buffered; fp32 3.7 MB
# 5.9-6.4 joined, 3.8-4.05 buffered (/tmp/ovh2/addm3.py).
ADD_BUFFER_BYTES = 1 << 20
_add_buffers = threading.local()


def _add_buffer() -> memoryview:
    view = getattr(_add_buffers, "view", None)
    if view is None:
        view = _add_buffers.view = memoryview(bytearray(ADD_BUFFER_BYTES))
    return view


@dataclass(frozen=True)
class PackEntry:
    """Where one object lives in a pack.

    Attributes:
        oid: object id.
        offset: byte offset of its record in the pack file.
        length: length of the stored record.
        raw_len: length of the object's canonical bytes (from the index in version 1,
            from the record header in version 2).
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


_HASH_SLICE = 16 << 20


def _release(m) -> None:
    if isinstance(m, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
        try:
            m.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):
            pass  # closed, or not supported here: only memory accounting is at stake


def _hash_mapped(m, end: int) -> bytes:
    """BLAKE3 of `m[:end]`, slice by slice, releasing the mapped pages as it goes."""
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    view = memoryview(m)
    try:
        for at in range(0, end, _HASH_SLICE):
            h.update(view[at : min(end, at + _HASH_SLICE)])
            _release(m)
    finally:
        view.release()
    return h.digest()


class Pack:
    """One pack and its index, memory-mapped; checks structure on open, records on read."""

    def __init__(self, idx_path: Path):
        self.idx_path = Path(idx_path)
        self.path = self.idx_path.with_suffix(".pack")
        self._idx = _map(self.idx_path)
        self._id_array = None
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
        if len(idx) < IDX_HEAD_V1.size + FANOUT.size + IDX_TAIL:
            raise _corrupt(path, f"index is truncated ({len(idx)} bytes)")
        magic, version, count = IDX_HEAD_V1.unpack_from(idx)
        if magic != IDX_MAGIC:
            raise _corrupt(path, "index has a bad magic number")
        if version not in IDX_VERSIONS:
            raise _corrupt(path, f"index version {version} is not supported (this build reads {IDX_VERSIONS})")
        self.version = version
        if version == 1:
            head, large, entry_bytes = IDX_HEAD_V1.size, 0, ENTRY_BYTES_V1
        else:
            if len(idx) < IDX_HEAD.size + FANOUT.size + IDX_TAIL:
                raise _corrupt(path, f"index is truncated ({len(idx)} bytes)")
            head, large, entry_bytes = IDX_HEAD.size, IDX_HEAD.unpack_from(idx)[3], ENTRY_BYTES
        expect = head + FANOUT.size + count * entry_bytes + large * 8 + IDX_TAIL
        if len(idx) != expect:
            raise _corrupt(path, f"index is truncated or padded: {len(idx)} bytes, {count} entries need {expect}")
        # The index checksum is checked by verify() (gc, fsck), not here: hashing a
        # million-adapter index (hundreds of MB) would cost every `ah` command a tenth of
        # a second, and reads do not need it: a damaged id is a miss, a damaged offset or
        # length reaches bytes that fail the record's own checks and re-hash.
        self._idx_end = expect
        self.fanout = FANOUT.unpack_from(idx, head)
        if self.fanout[255] != count or any(self.fanout[i] > self.fanout[i + 1] for i in range(255)):
            raise _corrupt(path, "index fan-out table is inconsistent")
        self.count = count
        self._ids_at = head + FANOUT.size
        self._off_at = self._ids_at + count * OID_LEN
        width = 8 if version == 1 else 4
        self._width = width
        self._len_at = self._off_at + count * width
        self._raw_at = self._len_at + count * width  # version 1 only
        self._large_at = self._len_at + count * width  # version 2 only
        self._large = large
        self.checksum = bytes(idx[expect - IDX_TAIL : expect - 32])

    def _check_pack(self) -> None:
        pack = self._pack
        if len(pack) < PACK_HEAD.size + PACK_TAIL.size:
            raise _corrupt(self.path, f"pack is truncated ({len(pack)} bytes)")
        magic, version = PACK_HEAD.unpack_from(pack)
        if magic != PACK_MAGIC or version != PACK_VERSION:
            raise _corrupt(self.path, "pack has a bad magic number or an unsupported version")
        count, checksum = PACK_TAIL.unpack_from(pack, len(pack) - PACK_TAIL.size)
        if checksum != self.checksum or count != self.count:
            raise _corrupt(self.path, "pack is truncated or damaged: its trailer does not match its index")
        self.data_end = len(pack) - PACK_TAIL.size

    def verify(self) -> None:
        """Re-hash the index and the whole pack against their checksums (gc and fsck;
        reads check per object). Hashed in slices whose mapped pages are dropped after
        use, so verifying a pack of gigabytes does not make them resident in this process."""
        if _hash_mapped(self._idx, self._idx_end - 32) != bytes(self._idx[self._idx_end - 32 : self._idx_end]):
            raise _corrupt(self.idx_path, "index checksum does not match its content")
        if _hash_mapped(self._pack, len(self._pack) - 32) != self.checksum:
            raise _corrupt(self.path, "pack checksum does not match its content")

    def release_pages(self) -> None:
        """Drop this process's mapping of pack pages read so far (they stay in the page
        cache): a walk over every commit of a million adapters touches nearly every page
        of the pack, and mapped pages count as the walker's resident memory."""
        _release(self._pack)

    def advise_random(self, on: bool) -> None:
        """Tell the kernel reads of this pack are scattered (no read-ahead) or not. A walk
        reading one small record here and there would otherwise map 128 kB around each."""
        advice = getattr(mmap, "MADV_RANDOM" if on else "MADV_NORMAL", None)
        if isinstance(self._pack, mmap.mmap) and advice is not None:
            try:
                self._pack.madvise(advice)
            except (OSError, ValueError):
                pass

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
        if self.count > _NUMPY_SEARCH_MIN and "numpy" in sys.modules:
            # A process that already has numpy (gc, import, checkout) searches a big index
            # in C: ~3 us instead of ~20 probes in Python. Others never import it for this.
            if self._id_array is None:
                self._id_array = self.id_array()
            i = int(self._id_array.searchsorted(key))
        else:
            i = self._lower_bound(key)
        return i if i < self.count and self._id(i) == key else None

    def _field(self, at: int, i: int) -> int:
        """Entry `i` of the u32 (version 2, large-table escaped) or u64 column at `at`."""
        if self._width == 8:
            return struct.unpack_from("<Q", self._idx, at + i * 8)[0]
        v = struct.unpack_from("<I", self._idx, at + i * 4)[0]
        if v < LARGE:
            return v
        j = v - LARGE
        if j >= self._large:
            return -1  # damaged: callers treat it as an entry pointing outside the pack
        return struct.unpack_from("<Q", self._idx, self._large_at + j * 8)[0]

    def location(self, i: int) -> tuple[int, int]:
        """(offset, record length) of entry `i`."""
        return self._field(self._off_at, i), self._field(self._len_at, i)

    def entry(self, i: int) -> PackEntry:
        oid = ObjectId(self._id(i).hex())
        offset, length = self.location(i)
        if self.version == 1:
            raw_len = struct.unpack_from("<Q", self._idx, self._raw_at + i * 8)[0]
        else:
            raw_len = self._raw_len_at(oid, offset, length)
        return PackEntry(oid, offset, length, raw_len)

    def _raw_len_at(self, oid: str, offset: int, length: int) -> int:
        if not self._inside(offset, length) or length < codec.RECORD_HEADER.size:
            raise CorruptObject(oid, f"its entry in {self.path.name} points outside the pack (truncated pack?)")
        return codec.raw_length(oid, self._pack[offset : offset + codec.RECORD_HEADER.size])

    def _inside(self, offset: int, length: int) -> bool:
        return offset >= PACK_HEAD.size and length >= 0 and offset + length <= self.data_end

    def read_record(self, oid: str, limit: int | None = None) -> bytes:
        i = self.find(oid)
        if i is None:
            raise ObjectNotFound(oid)
        return self.record_at(oid, *self.location(i), limit)

    def record_at(self, oid: str, offset: int, length: int, limit: int | None = None) -> bytes:
        """The record at a known location (checked to lie inside the record area), or only
        its first `limit` bytes: a header read need not copy a tensor's megabytes."""
        if not self._inside(offset, length):
            raise CorruptObject(oid, f"its entry in {self.path.name} points outside the pack (truncated pack?)")
        if limit is not None and limit < length:
            length = limit
        return self._pack[offset : offset + length]

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
        # Hex of up to 4096 ids at a time, then sliced: a slice, hex and call per id cost
        # ~0.6 us, and a store maps every id of each commit's pack as it lists it.
        step = 4096
        for first in range(0, self.count, step):
            at = self._ids_at + first * OID_LEN
            block = self._idx[at : at + min(step, self.count - first) * OID_LEN].hex()
            for i in range(0, len(block), 2 * OID_LEN):
                yield block[i : i + 2 * OID_LEN]

    def iter_entries(self) -> Iterator[PackEntry]:
        for i in range(self.count):
            yield self.entry(i)

    # --- bulk access (gc, stats): numpy arrays, no Python object per entry ---------------
    def id_array(self):
        """The sorted ids as a numpy `S32` array (a view of the index mapping, no copy)."""
        import numpy as np

        return np.frombuffer(self._idx, dtype="S32", count=self.count, offset=self._ids_at)

    def location_arrays(self):
        """(offsets, record lengths) of every entry, in index order, as numpy uint64 arrays."""
        import numpy as np

        n = self.count
        if self._width == 8:
            off = np.frombuffer(self._idx, dtype="<u8", count=n, offset=self._off_at).astype(np.uint64)
            ln = np.frombuffer(self._idx, dtype="<u8", count=n, offset=self._len_at).astype(np.uint64)
            return off, ln
        large = np.frombuffer(self._idx, dtype="<u8", count=self._large, offset=self._large_at)
        out = []
        for at in (self._off_at, self._len_at):
            v = np.frombuffer(self._idx, dtype="<u4", count=n, offset=at).astype(np.uint64)
            esc = v >= LARGE
            if esc.any():
                j = v[esc] - LARGE
                if (j >= len(large)).any():
                    raise _corrupt(self.idx_path, "an entry escapes to a large-table slot that does not exist")
                v[esc] = large[j.astype(np.int64)]
            out.append(v)
        return out[0], out[1]

    def raw_length_array(self):
        """Canonical length of every entry, in index order (numpy uint64): version 1 has a
        column for it; version 2 reads each record's 13-byte header, 0 where an entry or
        header is damaged (fsck reports those; `ah stats` adds up the rest)."""
        import numpy as np

        if self.version == 1:
            return np.frombuffer(self._idx, dtype="<u8", count=self.count, offset=self._raw_at).astype(np.uint64)
        offsets, lengths = self.location_arrays()
        out = np.zeros(self.count, dtype=np.uint64)
        head = codec.RECORD_HEADER.size
        ok = (offsets >= PACK_HEAD.size) & (lengths >= head) & (offsets + lengths <= self.data_end)
        if not ok.any():
            return out
        data = np.frombuffer(self._pack, dtype=np.uint8)
        magic = np.frombuffer(codec.MAGIC, dtype=np.uint8)
        step = 1 << 16
        for at in range(0, self.count, step):
            good = np.nonzero(ok[at : at + step])[0] + at
            if len(good):
                heads = data[offsets[good].astype(np.int64)[:, None] + np.arange(head)]
                raw = np.ascontiguousarray(heads[:, 5:13]).view("<u8").ravel().astype(np.uint64)
                raw[~(heads[:, :4] == magic).all(axis=1) | (raw > codec.MAX_RAW_LEN)] = 0
                out[good] = raw
                _release(self._pack)
        del data
        return out

    def read_span(self, fd: int, offset: int, length: int) -> bytes:
        """`length` bytes at `offset` of the pack read with pread on `fd` (an open pack
        file): bulk copies read this way so that gc's resident memory does not grow with
        the pages of every pack it copies (mapped pages count as resident)."""
        if offset < PACK_HEAD.size or offset + length > self.data_end:
            raise _corrupt(self.path, f"bytes {offset}..{offset + length} lie outside the record area")
        data = os.pread(fd, length, offset)
        if len(data) != length:
            raise _corrupt(self.path, "pack is shorter than its index says")
        return data

    @property
    def size(self) -> int:
        return len(self._pack) + len(self._idx)

    def close(self) -> None:
        self._id_array = None
        for m in (self._idx, self._pack):
            if isinstance(m, mmap.mmap):
                try:
                    m.close()
                except BufferError:
                    pass  # a record slice or id array is still referenced; the mapping goes with it


# Packs of up to this many objects get their index tables from plain Python: a commit's
# pack holds a few hundred objects, and numpy's import (~115 ms) would be most of what its
# index costs. Bigger ones (bulk import, gc) use numpy, whose sort is several times
# faster and whose arrays take a fraction of the memory of Python lists (a gc of a
# million adapters writes a 4,000,000-object pack). Both write the same bytes (tests).
PYTHON_INDEX_MAX = 50_000


def index_tables(ids: bytes | bytearray, offsets: array, lengths: array) -> tuple[bytes, bytes, bytes, bytes, list[int]] | None:
    """The tables of a pack index for the records added in order (`ids`: their 32-byte ids
    back to back): fan-out, ids sorted, offset and length columns in that order (u32, a
    value of LARGE or more replaced by LARGE + its place in the large-value list), and
    the large values. None when an id occurs twice."""
    if len(offsets) <= PYTHON_INDEX_MAX:
        return _index_tables_python(ids, offsets, lengths)
    return _index_tables_numpy(ids, offsets, lengths)


def _index_tables_python(ids: bytes, offsets: array, lengths: array):
    n = len(offsets)
    keys = [ids[i * OID_LEN : (i + 1) * OID_LEN] for i in range(n)]
    order = sorted(range(n), key=keys.__getitem__)
    keys = [keys[i] for i in order]
    if any(keys[i] == keys[i + 1] for i in range(n - 1)):
        return None
    counts = [0] * 256
    for key in keys:
        counts[key[0]] += 1
    large: list[int] = []
    columns = []
    for values in (offsets, lengths):
        col = array("I")
        for i in order:
            v = values[i]
            col.append(v if v < LARGE else LARGE + len(large))
            if v >= LARGE:
                large.append(v)
        if sys.byteorder != "little":
            col.byteswap()
        columns.append(col.tobytes())
    fan = struct.pack("<256I", *itertools.accumulate(counts))
    return fan, b"".join(keys), columns[0], columns[1], large


def _index_tables_numpy(ids: bytes, offsets: array, lengths: array):
    import numpy as np

    n = len(offsets)
    view = np.frombuffer(ids, dtype="S32", count=n)
    order = np.argsort(view, kind="stable")
    keys = view[order]
    del view
    if n > 1 and (keys[1:] == keys[:-1]).any():
        return None
    fan = np.cumsum(np.bincount(keys.view(np.uint8)[::OID_LEN], minlength=256)).astype("<u4")
    large: list[int] = []
    columns = []
    for values in (offsets, lengths):
        v = np.frombuffer(values, dtype=np.uint64)[order]
        col = v.astype("<u4")
        esc = np.nonzero(v >= LARGE)[0]
        if len(esc):
            col[esc] = LARGE + len(large) + np.arange(len(esc))
            large.extend(int(x) for x in v[esc])
        columns.append(col.tobytes())
    return fan.tobytes(), keys.tobytes(), columns[0], columns[1], large


class PackWriter:
    """Stream records into a new pack; `finish` makes it visible (pack, then index).

    Entries are kept in flat arrays (32-byte ids in one bytearray, offsets and lengths in
    `array('Q')`), about 48 bytes an object, not a Python object each: gc and import
    write millions. With `dedup` (the default) the writer also keeps a set of the ids it
    holds and skips a repeat; bulk writers that already know their ids are unique (gc,
    import) pass `dedup=False` and save that set, and `finish` refuses duplicates.

    Use as a context manager: leaving it with an exception removes the temp files, so a
    failed or killed writer never leaves a pack a reader would open.
    """

    def __init__(self, pack_dir: Path, *, durable: bool = True, dedup: bool = True):
        self.pack_dir = Path(pack_dir)
        self.pack_dir.mkdir(parents=True, exist_ok=True)
        self.durable = durable
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".pack", dir=self.pack_dir)
        self._tmp = Path(tmp)
        self._fd = fd
        self._out = GatherWriter(fd)  # records are many small pieces: one writev per ~1 MiB
        self._hash = blake3.blake3()
        self._pos = 0
        self._ids = bytearray()
        self._offsets = array("Q")
        self._lengths = array("Q")
        self._keys: set[bytes] | None = set() if dedup else None
        self._kicked = 0  # bytes already handed to start_writeback
        self._write(PACK_HEAD.pack(PACK_MAGIC, PACK_VERSION))

    def _write(self, data: bytes | memoryview) -> None:
        self._out.write(data)
        self._hash.update(data)
        self._pos += len(data)

    def __len__(self) -> int:
        return len(self._offsets)

    def add(self, oid: str | bytes, record: bytes | memoryview) -> bool:
        """Append one record (with `dedup`, skipped when this pack already has the id);
        True if added. `oid` is hex or the raw 32 bytes. The record is written later (one
        writev per ~1 MiB, fsutil.GatherWriter): its bytes must not change after this."""
        key = oid if isinstance(oid, bytes) else bytes.fromhex(oid)
        if len(key) != OID_LEN:
            raise ValueError(f"not an object id: {oid!r}")
        if self._keys is not None:
            if key in self._keys:
                return False
            self._keys.add(key)
        self._ids += key
        self._offsets.append(self._pos)
        self._lengths.append(len(record))
        self._write(record)
        self._kick()
        return True

    def add_many(self, keys: bytes, records: list) -> None:
        """add() of many records at once (a commit's), `keys` their 32-byte ids back to back.

        For a writer without `dedup`, whose caller knows each id once (`finish` still
        refuses a repeat); the pack's bytes are those of add() one by one. Records are
        copied into a kept buffer, hashed and written a buffer at a time (ADD_BUFFER_BYTES);
        one that does not fit is written as it is."""
        if len(keys) != len(records) * OID_LEN:
            raise ValueError(f"{len(keys)} bytes of ids for {len(records)} records")
        if self._keys is not None:
            for i, record in enumerate(records):
                self.add(keys[i * OID_LEN : (i + 1) * OID_LEN], record)
            return
        self._ids += keys
        offsets, lengths, at = self._offsets, self._lengths, self._pos
        buf, fill = _add_buffer(), 0
        for record in records:
            n = len(record)
            offsets.append(at)
            lengths.append(n)
            at += n
            if fill and fill + n > ADD_BUFFER_BYTES:
                self._write_buffered(buf[:fill])
                fill = 0
            if n >= ADD_BUFFER_BYTES:
                self._write(record)
                self._kick()
            else:
                buf[fill : fill + n] = record
                fill += n
        if fill:
            self._write_buffered(buf[:fill])

    def _write_buffered(self, view: memoryview) -> None:
        """_write of bytes in add_many's buffer: on disk before the buffer is filled again."""
        self._out.write(view, now=True)
        self._hash.update(view)
        self._pos += len(view)
        self._kick()

    def _kick(self) -> None:
        """Start the disk on what was appended since the last kick, every WRITEBACK_STEP."""
        if self.durable and self._pos - self._kicked >= WRITEBACK_STEP:
            self._out.flush()
            start_writeback(self._fd, self._kicked, self._pos - self._kicked)
            self._kicked = self._pos

    def finish(self) -> Path | None:
        """Close the pack, write its index, rename both into place; the index path (None if empty)."""
        if not self._offsets:
            self.abort()
            return None
        n = len(self._offsets)
        tables = index_tables(self._ids, self._offsets, self._lengths)
        self._ids = bytearray()
        if tables is None:
            self.abort()
            raise ValueError("a pack writer without dedup was given the same id twice")
        fan, ids, offsets, lengths, large = tables
        self._write(struct.pack("<Q", n))
        checksum = self._hash.digest()
        self._out.write(checksum)
        self._out.flush()
        if self.durable:  # the last stretch goes to disk while the index is built
            start_writeback(self._fd, self._kicked, self._pos + len(checksum) - self._kicked)
        name = f"pack-{checksum.hex()}"
        pack_path = self.pack_dir / f"{name}.pack"
        idx_path = self.pack_dir / f"{name}.idx"
        head = IDX_HEAD.pack(IDX_MAGIC, IDX_VERSION, n, len(large))
        parts = [head, fan, ids, offsets, lengths, struct.pack(f"<{len(large)}Q", *large), checksum]
        h = blake3.blake3(max_threads=blake3.blake3.AUTO)
        for p in parts:
            h.update(p)
        parts.append(h.digest())
        # Both files' bytes are fsynced under temp names first (back to back), then the pack
        # is renamed and the folder fsynced, and only then the index: a pack is visible only
        # through its index, so readers never see half of one, and after a power cut an
        # index never names a pack that is not there.
        index = StagedFile(idx_path, parts, durable=self.durable)
        try:
            if self.durable:
                os.fsync(self._fd)
            self._close()
            os.replace(self._tmp, pack_path)
            self._tmp = None
            if self.durable:
                fsync_dir(self.pack_dir)
        except BaseException:
            index.discard()
            raise
        index.publish()
        return idx_path

    def _close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def abort(self) -> None:
        if self._tmp is not None:
            self._close()
            self._tmp.unlink(missing_ok=True)
            self._tmp = None

    def __enter__(self) -> "PackWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def pack_paths(pack_dir: Path) -> list[Path]:
    """Index files of the complete packs in `pack_dir` (temp files excluded)."""
    return [Path(pack_dir) / name for name in pack_names(pack_dir)]


def pack_names(pack_dir: Path | str) -> list[str]:
    """File names of pack_paths, sorted: a store re-lists its packs after every commit, and
    a Path per folder entry cost ~7 us (12 packs: 167 us against 20 for the names)."""
    try:
        names = os.listdir(pack_dir)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(n for n in names if n.startswith("pack-") and n.endswith(".idx"))
