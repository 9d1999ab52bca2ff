"""The packed-refs file: every ref in one sorted file, found by binary search.

A million branches as loose files are a million inodes, and listing or resolving them
through the file system gets slow; one sorted file answers a lookup with ~20 probes into
a memory map, and a prefix listing with one probe and a sequential read. Loose refs stay
the place where updates happen (lock file + rename, `refs.py`); this file is rewritten
only by `ah pack-refs` / gc (folding loose refs in), by a delete of a packed ref, and by
bulk import (many new refs at once), always under `packed-refs.lock` and by rename.

Format (docs/format/refs.md): the line `# ah packed-refs 1`, then one line per ref,
`<64 hex id> <refname>\\n`, sorted by refname bytes, names unique.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import Iterable, Iterator

from .errors import CorruptObject
from .objects import ObjectId, is_oid

HEADER = b"# ah packed-refs 1\n"
FILE_NAME = "packed-refs"
_OID_LEN = 64


class PackedRefs:
    """Read side of `.ah/packed-refs`, re-mapped whenever the file is replaced."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._stamp: tuple | None = None
        self._data: mmap.mmap | bytes = b""

    def _load(self) -> mmap.mmap | bytes:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._stamp, self._data = None, b""
            return self._data
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        if stamp != self._stamp:
            with open(self.path, "rb") as fh:
                data = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if st.st_size else b""
            if data[: len(HEADER)] != HEADER:
                raise CorruptObject(FILE_NAME, f"{self.path} does not start with {HEADER.strip().decode()!r}")
            if data[-1:] != b"\n":
                raise CorruptObject(FILE_NAME, f"{self.path} is truncated (its last line has no newline)")
            self._data, self._stamp = data, stamp
        return self._data

    def _line(self, data, start: int) -> tuple[bytes, ObjectId, int]:
        """(refname, id, start of the next line) of the line at `start`."""
        end = data.find(b"\n", start)
        if end < 0 or end - start < _OID_LEN + 2 or data[start + _OID_LEN : start + _OID_LEN + 1] != b" ":
            raise CorruptObject(FILE_NAME, f"malformed line at byte {start} of {self.path}")
        oid = data[start : start + _OID_LEN].decode("ascii", "replace")
        if not is_oid(oid):
            raise CorruptObject(FILE_NAME, f"line at byte {start} of {self.path} does not start with an object id")
        return data[start + _OID_LEN + 1 : end], ObjectId(oid), end + 1

    def _lower_bound(self, data, key: bytes) -> int:
        """Offset of the first line whose name is >= key (lines start at lo; hi is a line start)."""
        lo, hi = len(HEADER), len(data)
        while lo < hi:
            mid = (lo + hi) // 2
            nl = data.rfind(b"\n", lo, mid)
            start = lo if nl < 0 else nl + 1
            name, _oid, nxt = self._line(data, start)
            if name < key:
                lo = nxt
            else:
                hi = start
        return lo

    def get(self, refname: str) -> ObjectId | None:
        data = self._load()
        if not data:
            return None
        key = refname.encode()
        at = self._lower_bound(data, key)
        if at >= len(data):
            return None
        name, oid, _ = self._line(data, at)
        return oid if name == key else None

    def iter_prefix(self, prefix: str) -> Iterator[tuple[str, ObjectId]]:
        """(refname, id) of every packed ref starting with `prefix`, sorted."""
        data = self._load()
        if not data:
            return
        key = prefix.encode()
        at = self._lower_bound(data, key)
        last = b""
        while at < len(data):
            name, oid, at = self._line(data, at)
            if not name.startswith(key):
                return
            if name <= last:
                raise CorruptObject(FILE_NAME, f"{self.path} is not sorted at {name.decode(errors='replace')!r}")
            last = name
            yield name.decode(), oid

    def has_under(self, refname: str) -> str | None:
        """A packed ref below `refname/` (a name/folder conflict), or None."""
        for name, _ in self.iter_prefix(refname + "/"):
            return name
        return None


def render(entries: Iterable[tuple[str, str]]) -> bytes:
    """File bytes for (refname, id) pairs (sorted here; names must be unique)."""
    items = sorted((name.encode(), oid) for name, oid in entries)
    out = [HEADER]
    prev = None
    for name, oid in items:
        if name == prev:
            raise ValueError(f"duplicate ref {name.decode()!r}")
        prev = name
        out.append(b"%s %s\n" % (oid.encode("ascii"), name))
    return b"".join(out)
