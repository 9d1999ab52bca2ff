"""The packed-refs file: every ref in one sorted file, found by binary search.

A million branches as loose files are a million inodes, and listing or resolving them
through the file system gets slow; one sorted file answers a lookup with ~20 probes into
a memory map, and a prefix listing with one probe and a sequential read. Loose refs stay
the place where updates happen (lock file + rename, `refs.py`); this file is rewritten
only by `ah pack-refs` / gc (folding loose refs in), by a delete of a packed ref, and by
bulk import (many new refs at once), always under `packed-refs.lock` and by rename.

Two formats (docs/format/refs.md), told apart by their first line:
- version 1 (read only): `# ah packed-refs 1`, then `<64 hex id> <refname>\\n` per ref.
- version 2 (written): binary records, each a refname as the length of the prefix it
  shares with the previous name plus the rest, then the raw 32-byte id; every
  `RESTART_INTERVAL`-th record spells its whole name (a restart), and a table of restart
  offsets at the end makes a lookup a binary search over restarts plus a short scan.
  Per ref this is ~37 bytes where version 1 spent 94 on a million `users/userNNNNNNN`
  branches (the metadata budget of issue 4): names that share all but their last digits
  cost two or three bytes, and an id 32 instead of 65.
Both sort names by their bytes and keep them unique.
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
from pathlib import Path
from typing import Iterable, Iterator

from .errors import CorruptObject
from .objects import ObjectId, is_oid

HEADER_V1 = b"# ah packed-refs 1\n"
HEADER_V2 = b"# ah packed-refs 2\n"
HEADER = HEADER_V2  # what `render` writes
FILE_NAME = "packed-refs"
_OID_LEN = 64
_ID_BYTES = 32
# Records between restarts (git's reftable uses 16): a lookup decodes at most this many
# records after its binary search; a restart costs its whole name and a 4-byte offset.
RESTART_INTERVAL = 16
# Version 2 ends with the restart table (u32 offsets) and this footer.
_FOOTER = struct.Struct("<I4s")
_U32 = struct.Struct("<I")
_TRAILER = b"APR2"


class PackedRefs:
    """Read side of `.ah/packed-refs`, re-mapped whenever the file is replaced."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._stamp: tuple | None = None
        self._reader: _Reader | None = None

    def _load(self) -> "_Reader | None":
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._stamp, self._reader = None, None
            return None
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        if stamp != self._stamp:
            if not stat.S_ISREG(st.st_mode):  # a FIFO would block the open below forever
                raise CorruptObject(FILE_NAME, f"{self.path} is not a regular file")
            with open(self.path, "rb") as fh:
                data = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if st.st_size else b""
            if data[: len(HEADER_V2)] == HEADER_V2:
                reader: _Reader = _BinaryV2(data, self.path)
            elif data[: len(HEADER_V1)] == HEADER_V1:
                reader = _TextV1(data, self.path)
            else:
                raise CorruptObject(FILE_NAME, f"{self.path} does not start with {HEADER_V2.strip().decode()!r} "
                                               f"or {HEADER_V1.strip().decode()!r}")
            self._reader, self._stamp = reader, stamp
        return self._reader

    def get(self, refname: str) -> ObjectId | None:
        reader = self._load()
        if reader is None:
            return None
        key = refname.encode()
        for name, oid in reader.scan(key):
            return oid if name == key else None
        return None

    def iter_prefix(self, prefix: str) -> Iterator[tuple[str, ObjectId]]:
        """(refname, id) of every packed ref starting with `prefix`, sorted."""
        reader = self._load()
        if reader is None:
            return
        key = prefix.encode()
        for name, oid in reader.scan(key):
            if not name.startswith(key):
                return
            try:
                text = name.decode()
            except UnicodeDecodeError:
                raise reader.corrupt(f"holds a name that is not UTF-8: {name!r}") from None
            yield text, oid

    def has_under(self, refname: str) -> str | None:
        """A packed ref below `refname/` (a name/folder conflict), or None."""
        for name, _ in self.iter_prefix(refname + "/"):
            return name
        return None


class _Reader:
    """One format's view of a mapped file."""

    def __init__(self, data, path: Path):
        self.data = data
        self.path = path

    def corrupt(self, what: str) -> CorruptObject:
        return CorruptObject(FILE_NAME, f"{self.path} {what}")

    def scan(self, key: bytes) -> Iterator[tuple[bytes, ObjectId]]:
        """(name, id) of every ref whose name is >= key, in order; raises CorruptObject
        on damage met on the way (names out of order among them)."""
        raise NotImplementedError


class _TextV1(_Reader):
    """Version 1: sorted text lines, binary-searched by byte offset."""

    def __init__(self, data, path: Path):
        super().__init__(data, path)
        if data[-1:] != b"\n":
            raise self.corrupt("is truncated (its last line has no newline)")

    def _line(self, start: int) -> tuple[bytes, ObjectId, int]:
        """(refname, id, start of the next line) of the line at `start`."""
        data = self.data
        end = data.find(b"\n", start)
        if end < 0 or end - start < _OID_LEN + 2 or data[start + _OID_LEN : start + _OID_LEN + 1] != b" ":
            raise CorruptObject(FILE_NAME, f"malformed line at byte {start} of {self.path}")
        oid = data[start : start + _OID_LEN].decode("ascii", "replace")
        if not is_oid(oid):
            raise CorruptObject(FILE_NAME, f"line at byte {start} of {self.path} does not start with an object id")
        return data[start + _OID_LEN + 1 : end], ObjectId(oid), end + 1

    def _lower_bound(self, key: bytes) -> int:
        """Offset of the first line whose name is >= key (lines start at lo; hi is a line start)."""
        data = self.data
        lo, hi = len(HEADER_V1), len(data)
        while lo < hi:
            mid = (lo + hi) // 2
            nl = data.rfind(b"\n", lo, mid)
            start = lo if nl < 0 else nl + 1
            name, _oid, nxt = self._line(start)
            if name < key:
                lo = nxt
            else:
                hi = start
        return lo

    def scan(self, key: bytes) -> Iterator[tuple[bytes, ObjectId]]:
        at = self._lower_bound(key)
        last = b""
        while at < len(self.data):
            name, oid, at = self._line(at)
            if name <= last:
                raise self.corrupt(f"is not sorted at {name.decode(errors='replace')!r}")
            last = name
            yield name, oid


class _BinaryV2(_Reader):
    """Version 2: prefix-compressed binary records with a restart table.

    Damage is found where it is met, without a pass over the whole file at open (which
    would cost a million-ref registry milliseconds per command): the footer and table
    bounds at open; each restart probed by a search must lie between the offsets and
    names of the probes around it; a scan must land exactly on every restart it crosses
    and see strictly increasing names.
    """

    def __init__(self, data, path: Path):
        super().__init__(data, path)
        size = len(data)
        if size < len(HEADER_V2) + _FOOTER.size:
            raise self.corrupt("is truncated (no restart table)")
        count, trailer = _FOOTER.unpack_from(data, size - _FOOTER.size)
        if trailer != _TRAILER:
            raise self.corrupt("is truncated (its footer is missing)")
        self.table = size - _FOOTER.size - 4 * count  # start of the restart table = end of records
        if self.table < len(HEADER_V2):
            raise self.corrupt(f"has a bad restart table ({count} restarts do not fit)")
        self.count = count
        if count == 0 and self.table != len(HEADER_V2):
            raise self.corrupt("has a bad restart table (records but no restarts)")
        if count and (self._restart(0) != len(HEADER_V2) or self._restart(count - 1) >= self.table):
            raise self.corrupt("has a bad restart table (first or last offset out of place)")
        if count and data[len(HEADER_V2)] != 0:
            raise self.corrupt("has a bad restart table (its first record is not a whole name)")

    def _restart(self, i: int) -> int:
        """Offset of restart `i` (the table is read where probed, never copied)."""
        return _U32.unpack_from(self.data, self.table + 4 * i)[0]

    def _record(self, pos: int, prev: bytes) -> tuple[bytes, bytes, int]:
        """(name, raw id, next position) of the record at `pos` after name `prev`."""
        data, end = self.data, self.table
        shared, pos = _varint(self, data, pos, end)
        length, pos = _varint(self, data, pos, end)
        if shared > len(prev):
            raise self.corrupt(f"has a record at byte {pos} sharing {shared} bytes with a {len(prev)}-byte name")
        stop = pos + length + _ID_BYTES
        if stop > end:
            raise self.corrupt(f"is truncated (a record at byte {pos} runs past the restart table)")
        name = prev[:shared] + data[pos : pos + length]
        return name, data[pos + length : stop], stop

    def _restart_name(self, i: int, lo: tuple[int, bytes], hi: tuple[int, bytes]) -> bytes:
        """Whole name of restart `i`, checked against the probes `lo` and `hi` around it
        ((offset, name); name b"" and offset -1 / end of records where there is none)."""
        off = self._restart(i)
        if not lo[0] < off < hi[0]:
            raise self.corrupt(f"has a bad restart table (restart {i} at byte {off} is out of order)")
        shared, _ = _varint(self, self.data, off, self.table)
        if shared:
            raise self.corrupt(f"has a bad restart table (restart {i} at byte {off} is not a whole name)")
        name = self._record(off, b"")[0]
        if not (lo[1] < name and (hi[1] is None or name < hi[1])):
            raise self.corrupt(f"is not sorted at {name.decode(errors='replace')!r}")
        return name

    def scan(self, key: bytes) -> Iterator[tuple[bytes, ObjectId]]:
        n = self.count
        if not n:
            return
        # The first restart whose name is >= key; the records before it that are >= key
        # (if any) follow the restart before it.
        lo, hi = 0, n
        lo_probe, hi_probe = (len(HEADER_V2) - 1, b""), (self.table, None)
        while lo < hi:
            mid = (lo + hi) // 2
            name = self._restart_name(mid, lo_probe, hi_probe)
            if name < key:
                lo, lo_probe = mid + 1, (self._restart(mid), name)
            else:
                hi, hi_probe = mid, (self._restart(mid), name)
        # Restart lo - 1 was probed (or is restart 0, checked at open): a whole name.
        r = max(lo - 1, 0)
        pos, prev, count = self._restart(r), b"", 0
        next_restart = self._restart(r + 1) if r + 1 < n else self.table
        while pos < self.table:
            if pos >= next_restart:
                if pos != next_restart:
                    raise self.corrupt(f"has a bad restart table (restart {r + 1} at byte {next_restart} "
                                       f"is inside a record)")
                r += 1
                next_restart = self._restart(r + 1) if r + 1 < n else self.table
                if self.data[pos]:
                    raise self.corrupt(f"has a bad restart table (restart {r} at byte {pos} is not a whole name)")
            name, raw, pos = self._record(pos, prev)
            if count and name <= prev:
                raise self.corrupt(f"is not sorted at {name.decode(errors='replace')!r}")
            prev, count = name, count + 1
            if name >= key:
                yield name, ObjectId(raw.hex())
        if r != n - 1:
            raise self.corrupt(f"has a bad restart table (restart {r + 1} lies past the last record)")


def _varint(reader: _Reader, data, pos: int, end: int) -> tuple[int, int]:
    """(value, next position) of a LEB128 number (at most 5 bytes) before `end`."""
    value = shift = 0
    while pos < end and shift < 35:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise reader.corrupt(f"is truncated or damaged (a length field at byte {pos} does not end)")


def _put_varint(out: bytearray, value: int) -> None:
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _shared_len(a: bytes, b: bytes) -> int:
    """Length of the common prefix of a and b: the highest differing bit of the two as
    big-endian integers says where (a few C-speed operations instead of a Python loop
    per byte; render runs this once per ref)."""
    n = min(len(a), len(b))
    x = int.from_bytes(a[:n], "big") ^ int.from_bytes(b[:n], "big")
    return n - 1 - (x.bit_length() - 1) // 8 if x else n


def render(entries: Iterable[tuple[str, str]]) -> bytes:
    """Version-2 file bytes for (refname, id) pairs (sorted here; names must be unique)."""
    items = sorted((name.encode(), oid) for name, oid in entries)
    out = bytearray(HEADER_V2)
    restarts: list[int] = []
    prev = None
    for i, (name, oid) in enumerate(items):
        if name == prev:
            raise ValueError(f"duplicate ref {name.decode()!r}")
        raw = bytes.fromhex(oid) if len(oid) == _OID_LEN else b""
        if len(raw) != _ID_BYTES:
            raise ValueError(f"not an object id: {oid!r}")
        if i % RESTART_INTERVAL == 0:
            restarts.append(len(out))
            shared = 0
        else:
            shared = _shared_len(prev, name)
        rest = len(name) - shared
        if shared < 0x80 and rest < 0x80:  # nearly always: two one-byte lengths
            out.append(shared)
            out.append(rest)
        else:
            _put_varint(out, shared)
            _put_varint(out, rest)
        out += name[shared:]
        out += raw
        prev = name
    if len(out) >= 1 << 32:
        raise ValueError("packed-refs would exceed 4 GiB (restart offsets are 32-bit)")
    out += struct.pack(f"<{len(restarts)}I", *restarts)
    out += _FOOTER.pack(len(restarts), _TRAILER)
    return bytes(out)
