"""The object store: put canonical objects in, get verified objects out.

`ObjectStore` is the contract every backend meets (loose files now; packs and remotes
later), checked by one shared test class in tests/test_store_contract.py. Every read
re-hashes the canonical bytes and compares with the requested id, so a flipped bit on
disk, in a pack or from a remote is an error naming the object, never silent damage.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

from . import codec
from .errors import AmbiguousRevision, CorruptObject, ObjectNotFound
from .fsutil import TMP_PREFIX, atomic_write
from .objects import COMMIT, SNAPSHOT, TAG, Commit, ObjectId, Snapshot, Tag, hash_object, header, parse_object, split_canonical


class ObjectStore:
    """Backend contract. Subclasses implement the four primitives below."""

    # --- primitives ---------------------------------------------------------------
    def has(self, oid: str) -> bool:
        raise NotImplementedError

    def _read_record(self, oid: str) -> bytes:
        """Stored record bytes for `oid`; raise ObjectNotFound if absent."""
        raise NotImplementedError

    def _write_record(self, oid: ObjectId, record: bytes) -> None:
        raise NotImplementedError

    def iter_ids(self) -> Iterator[ObjectId]:
        raise NotImplementedError

    # --- shared behaviour -----------------------------------------------------------
    def put(self, obj_type: str, body: bytes | memoryview) -> ObjectId:
        """Store an object (no-op when present) and return its id."""
        return self.put_ex(obj_type, body)[0]

    def put_ex(self, obj_type: str, body: bytes | memoryview) -> tuple[ObjectId, bool]:
        """Like put, and also say whether the object was new to this store."""
        oid = hash_object(obj_type, body)
        if self.has(oid):
            return oid, False
        self._write_record(oid, codec.encode([header(obj_type, len(body)), body]))
        return oid, True

    def read(self, oid: str) -> tuple[str, bytes]:
        """(type, body) of a stored object, verified against its id."""
        canonical = codec.decode(oid, self._read_record(oid))
        obj_type, body = split_canonical(oid, canonical)
        if hash_object(obj_type, body) != oid:
            raise CorruptObject(oid, "content does not hash to its id")
        return obj_type, bytes(body)

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

    def _path(self, oid: str) -> Path:
        return self.root / oid[:2] / oid[2:]

    def has(self, oid: str) -> bool:
        return self._path(oid).is_file()

    def _read_record(self, oid: str) -> bytes:
        try:
            return self._path(oid).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            raise ObjectNotFound(oid) from None

    def _write_record(self, oid: ObjectId, record: bytes) -> None:
        path = self._path(oid)
        path.parent.mkdir(exist_ok=True)
        atomic_write(path, record, durable=self.durable)

    def iter_ids(self) -> Iterator[ObjectId]:
        if not self.root.is_dir():
            return
        for fan in sorted(os.listdir(self.root)):
            if len(fan) != 2:
                continue
            for rest in sorted(os.listdir(self.root / fan)):
                if not rest.startswith(TMP_PREFIX) and len(rest) == 62:
                    yield ObjectId(fan + rest)

    def find_prefix(self, prefix: str) -> list[ObjectId]:
        # Only the one fan-out folder can hold matches: no full scan.
        fan_dir = self.root / prefix[:2]
        if len(prefix) < 2 or not fan_dir.is_dir():
            return super().find_prefix(prefix) if len(prefix) < 2 else []
        rest = prefix[2:]
        return [ObjectId(prefix[:2] + n) for n in sorted(os.listdir(fan_dir)) if n.startswith(rest) and len(n) == 62]

    def remove(self, oid: str) -> None:
        self._path(oid).unlink(missing_ok=True)
