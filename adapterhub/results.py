"""Typed results returned by the Registry API; the CLI only renders these."""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field

from .objects import Commit, ObjectId, Snapshot


def iso_time(ts: int) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class CommitInfo:
    """One commit as users see it.

    Attributes:
        id: the commit id (64 hex).
        commit: the parsed commit object (snapshot, parents, author, time, message, provenance).
    """

    id: ObjectId
    commit: Commit

    @property
    def parents(self) -> tuple[ObjectId, ...]:
        return self.commit.parents

    @property
    def message(self) -> str:
        return self.commit.message

    @property
    def author(self) -> str:
        return self.commit.author

    @property
    def timestamp(self) -> int:
        return self.commit.timestamp

    def to_json(self) -> dict:
        c = self.commit
        d = {
            "id": self.id,
            "parents": list(c.parents),
            "snapshot": c.snapshot,
            "author": c.author,
            "timestamp": c.timestamp,
            "date": iso_time(c.timestamp),
            "message": c.message,
            "provenance": c.provenance,
        }
        if c.signature is not None:
            d["signature"] = c.signature
        return d


@dataclass(frozen=True)
class CommitResult:
    """What `Registry.commit` did.

    Attributes:
        id: the new commit id.
        branch: the branch that moved (None when HEAD is detached).
        parents: the new commit's parents.
        files / tensors / logical_bytes: size of the committed snapshot.
        new_objects: objects the store did not have before (unchanged tensors are reused).
        notice: something the user should do, if any (say, run `ah gc`).
        warnings: damage found on the way that the commit stored around (a parent's
            tensor, commit or snapshot that cannot be read: see Registry.commit).
    """

    id: ObjectId
    branch: str | None
    parents: tuple[ObjectId, ...]
    files: int
    tensors: int
    logical_bytes: int
    new_objects: int
    notice: str | None = None
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class ShowResult:
    """A commit with its snapshot.

    Attributes:
        info: the commit.
        snapshot: its files and tensors.
        refs: branch and tag names pointing at it.
    """

    info: CommitInfo
    snapshot: Snapshot
    refs: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        d = self.info.to_json()
        d["refs"] = self.refs
        d["files"] = [f.to_json() for f in self.snapshot.files]
        return d


@dataclass(frozen=True)
class RefInfo:
    """A branch or tag.

    Attributes:
        name: short name ("main", "users/alice/exp").
        commit: the commit it points at (peeled for annotated tags).
        current: True for the branch HEAD points at.
        target: for annotated tags, the tag object id; otherwise the commit id.
    """

    name: str
    commit: ObjectId
    current: bool = False
    target: ObjectId | None = None

    def to_json(self) -> dict:
        return {"name": self.name, "commit": self.commit, "current": self.current}


@dataclass(frozen=True)
class CheckoutResult:
    """What `Registry.checkout` wrote.

    Attributes:
        id: the commit checked out.
        path: the folder written.
        files: number of files written.
        bytes: total bytes written.
    """

    id: ObjectId
    path: str
    files: int
    bytes: int
