"""Content-addressed objects: canonical bytes, ids, and typed parse/check.

An object's canonical form is ``b"<type> <len>\\0" + body``; its id is the BLAKE3 hash
(64 hex chars) of that whole canonical form, so the type is part of what is hashed
(domain separation: a file blob and a tensor with the same bytes have different ids).
Structured objects (snapshot, commit, tag, eval) have a canonical JSON body: UTF-8,
sorted keys, no insignificant whitespace. Parsing re-encodes and compares, so a body
that is valid JSON but not canonical is rejected: one logical object, one id.
See docs/format/objects.md.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, NewType

import blake3

from .errors import CorruptObject
from .paths import check_relpath

ObjectId = NewType("ObjectId", str)

OID_RE = re.compile(r"[0-9a-f]{64}")  # used with fullmatch: `$` would let a trailing newline in

# Object type names as they appear in the hashed header.
TENSOR = "tensor"
BLOB = "blob"
SNAPSHOT = "snapshot"
COMMIT = "commit"
TAG = "tag"
EVAL = "eval"
TYPES = (TENSOR, BLOB, SNAPSHOT, COMMIT, TAG, EVAL)
_TYPE_BYTES = {t: t.encode() for t in TYPES}

# Largest header we accept when parsing canonical bytes: "snapshot " + 20 digits + NUL.
_MAX_HEADER = 32


def is_oid(text: str) -> bool:
    return OID_RE.fullmatch(text) is not None


def header(obj_type: str, length: int) -> bytes:
    return b"%s %d\0" % (_TYPE_BYTES[obj_type], length)


def hash_object(obj_type: str, body: bytes | memoryview) -> ObjectId:
    """Id of an object without building its canonical bytes in one piece."""
    h = blake3.blake3(header(obj_type, len(body)), max_threads=blake3.blake3.AUTO if len(body) > 1 << 22 else 1)
    h.update(body)
    return ObjectId(h.hexdigest())


def split_canonical(oid: str, data: bytes) -> tuple[str, memoryview]:
    """Split canonical bytes into (type, body), checking the header."""
    nul = data.find(b"\0", 0, _MAX_HEADER)
    if nul < 0:
        raise CorruptObject(oid, "missing object header")
    try:
        type_b, len_b = data[:nul].split(b" ")
        obj_type = type_b.decode("ascii")
        length = int(len_b)
    except (ValueError, UnicodeDecodeError):
        raise CorruptObject(oid, "malformed object header") from None
    if obj_type not in TYPES:
        raise CorruptObject(oid, f"unknown object type {obj_type!r}")
    if len_b != str(length).encode() or length != len(data) - nul - 1:
        raise CorruptObject(oid, "object length does not match its header")
    return obj_type, memoryview(data)[nul + 1 :]


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
        "utf-8"
    )


def _parse_json(oid: str, body: bytes | memoryview) -> dict:
    raw = bytes(body)
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptObject(oid, f"body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise CorruptObject(oid, "body is not a JSON object")
    try:
        again = canonical_json(value)
    except UnicodeEncodeError:  # a \udXXX escape: a lone surrogate, not encodable as UTF-8
        raise CorruptObject(oid, "body holds a string that is not valid Unicode") from None
    except ValueError:  # NaN/Infinity parse but are not JSON: never canonical
        raise CorruptObject(oid, "body holds a non-finite number") from None
    if again != raw:
        raise CorruptObject(oid, "body is not in canonical JSON form")
    return value


def _need(oid: str, d: dict, key: str, kind: type | tuple[type, ...]):
    if key not in d or not isinstance(d[key], kind) or (kind is int and isinstance(d[key], bool)):
        raise CorruptObject(oid, f"field {key!r} missing or of the wrong type")
    return d[key]


def _need_oid(oid: str, value: Any, what: str) -> ObjectId:
    if not isinstance(value, str) or not is_oid(value):
        raise CorruptObject(oid, f"{what} is not an object id")
    return ObjectId(value)


# --- structured objects ---------------------------------------------------------------


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file, in file order.

    Attributes:
        name: tensor name as in the safetensors header.
        dtype: safetensors dtype string (F32, BF16, F16, ...).
        shape: tensor shape.
        blob: id of the `tensor` object holding the raw little-endian bytes.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    blob: ObjectId

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "blob": self.blob}


@dataclass(frozen=True)
class FileEntry:
    """One file of an adapter folder.

    Attributes:
        path: POSIX path relative to the adapter folder.
        kind: "safetensors" (stored tensor by tensor) or "file" (stored whole).
        size: size in bytes of the original file.
        blob: for "file", the `blob` object with its bytes; for "safetensors", the `blob`
            object with its header bytes (the 8-byte length prefix excluded).
        tensors: for "safetensors", its tensors in data-offset order.
    """

    path: str
    kind: str
    size: int
    blob: ObjectId
    tensors: tuple[TensorEntry, ...] = ()

    def to_json(self) -> dict:
        d: dict[str, Any] = {"path": self.path, "kind": self.kind, "size": self.size, "blob": self.blob}
        if self.kind == "safetensors":
            d["tensors"] = [t.to_json() for t in self.tensors]
        return d


def _tensor_entry(oid: str, td) -> TensorEntry:
    """One tensor entry of a snapshot, checked. JSON gives exact types (`type(x) is int`
    is isinstance without bool): checking them inline, in the order and with the messages
    of `_need`, halved parsing a 117-tensor snapshot, which every commit (its parent's)
    and every checkout does."""
    if type(td) is not dict:
        raise CorruptObject(oid, "tensor entry is not an object")
    shape, name, dtype, blob = td.get("shape"), td.get("name"), td.get("dtype"), td.get("blob")
    if type(shape) is not list:
        _need(oid, td, "shape", list)
    for s in shape:
        if type(s) is not int or s < 0:
            raise CorruptObject(oid, "tensor shape is not a list of sizes")
    if type(name) is not str:
        _need(oid, td, "name", str)
    if type(dtype) is not str:
        _need(oid, td, "dtype", str)
    if type(blob) is not str or OID_RE.fullmatch(blob) is None:
        raise CorruptObject(oid, "tensor blob is not an object id")
    return TensorEntry(name, dtype, tuple(shape), ObjectId(blob))


@dataclass(frozen=True)
class Snapshot:
    """One adapter folder: its files, sorted by path."""

    files: tuple[FileEntry, ...]

    def serialize(self) -> bytes:
        return canonical_json({"files": [f.to_json() for f in self.files]})

    @classmethod
    def parse(cls, oid: str, body: bytes | memoryview) -> "Snapshot":
        d = _parse_json(oid, body)
        files = []
        for fd in _need(oid, d, "files", list):
            if not isinstance(fd, dict):
                raise CorruptObject(oid, "file entry is not an object")
            path = _need(oid, fd, "path", str)
            kind = _need(oid, fd, "kind", str)
            if kind not in ("file", "safetensors"):
                raise CorruptObject(oid, f"unknown file kind {kind!r}")
            size = _need(oid, fd, "size", int)
            blob = _need_oid(oid, fd.get("blob"), f"blob of {path!r}")
            tensors = ()
            if kind == "safetensors":
                tensors = tuple(_tensor_entry(oid, td) for td in _need(oid, fd, "tensors", list))
            files.append(FileEntry(path, kind, size, blob, tensors))
        snap = cls(tuple(files))
        snap.check(oid)
        return snap

    def check(self, oid: str = "<new>") -> None:
        """Structural rules: safe unique paths in sorted order, none both a file and a folder."""
        paths = [f.path for f in self.files]
        if paths != sorted(paths) or len(set(paths)) != len(paths):
            raise CorruptObject(oid, "snapshot paths are not unique and sorted")
        for p in paths:
            try:
                check_relpath(p)
            except Exception as exc:  # UnsafePath: a stored snapshot must never carry one
                raise CorruptObject(oid, str(exc)) from None
        # No folder can hold both `a` and `a/b`: refuse it here, before checkout writes `a`.
        folders = {p[:i] for p in paths for i, ch in enumerate(p) if ch == "/"}
        clash = folders.intersection(paths)
        if clash:
            raise CorruptObject(oid, f"snapshot path {min(clash)!r} is both a file and a folder")

    def blob_ids(self) -> list[ObjectId]:
        out: list[ObjectId] = []
        for f in self.files:
            out.append(f.blob)
            out.extend(t.blob for t in f.tensors)
        return out


@dataclass(frozen=True)
class Commit:
    """A revision: a snapshot plus history and provenance.

    Attributes:
        snapshot: id of the snapshot object.
        parents: ids of parent commits (empty for a root commit).
        author: "Name <email>".
        timestamp: seconds since the epoch, UTC.
        message: commit message.
        provenance: free-form but documented provenance record (docs/provenance.md).
        signature: optional detached signature record (not covered by itself).
    """

    snapshot: ObjectId
    parents: tuple[ObjectId, ...]
    author: str
    timestamp: int
    message: str
    provenance: dict = field(default_factory=dict)
    signature: dict | None = None

    def to_json(self, with_signature: bool = True) -> dict:
        d: dict[str, Any] = {
            "snapshot": self.snapshot,
            "parents": list(self.parents),
            "author": self.author,
            "timestamp": self.timestamp,
            "message": self.message,
            "provenance": self.provenance,
        }
        if with_signature and self.signature is not None:
            d["signature"] = self.signature
        return d

    def serialize(self) -> bytes:
        return canonical_json(self.to_json())

    def signing_bytes(self) -> bytes:
        """What a signature covers: the canonical commit without its signature."""
        body = canonical_json(self.to_json(with_signature=False))
        return header(COMMIT, len(body)) + body

    @classmethod
    def parse(cls, oid: str, body: bytes | memoryview) -> "Commit":
        d = _parse_json(oid, body)
        parents = tuple(_need_oid(oid, p, "parent") for p in _need(oid, d, "parents", list))
        sig = d.get("signature")
        if sig is not None and not isinstance(sig, dict):
            raise CorruptObject(oid, "signature is not an object")
        return cls(
            snapshot=_need_oid(oid, d.get("snapshot"), "snapshot"),
            parents=parents,
            author=_need(oid, d, "author", str),
            timestamp=_need(oid, d, "timestamp", int),
            message=_need(oid, d, "message", str),
            provenance=_need(oid, d, "provenance", dict),
            signature=sig,
        )


@dataclass(frozen=True)
class Tag:
    """An annotated tag: a named, messaged pointer to an object (usually a commit)."""

    object: ObjectId
    object_type: str
    name: str
    tagger: str
    timestamp: int
    message: str

    def serialize(self) -> bytes:
        return canonical_json(
            {
                "object": self.object,
                "type": self.object_type,
                "tag": self.name,
                "tagger": self.tagger,
                "timestamp": self.timestamp,
                "message": self.message,
            }
        )

    @classmethod
    def parse(cls, oid: str, body: bytes | memoryview) -> "Tag":
        d = _parse_json(oid, body)
        obj_type = _need(oid, d, "type", str)
        if obj_type not in TYPES:
            raise CorruptObject(oid, f"tag points to unknown type {obj_type!r}")
        return cls(
            object=_need_oid(oid, d.get("object"), "tagged object"),
            object_type=obj_type,
            name=_need(oid, d, "tag", str),
            tagger=_need(oid, d, "tagger", str),
            timestamp=_need(oid, d, "timestamp", int),
            message=_need(oid, d, "message", str),
        )


PARSERS = {SNAPSHOT: Snapshot.parse, COMMIT: Commit.parse, TAG: Tag.parse}


def parse_object(oid: str, obj_type: str, body: bytes | memoryview):
    """Parse and check a structured object; blobs and tensors come back as bytes."""
    parser = PARSERS.get(obj_type)
    if parser is None:
        return bytes(body)
    return parser(oid, body)
