"""Refs: branches, tags and HEAD, moved only by compare-and-swap, with a reflog.

On disk (docs/format/refs.md): `HEAD` holds `ref: refs/heads/<name>` or a commit id;
each ref is a file `refs/heads/<name>` or `refs/tags/<name>` holding an id and a newline.
An update takes `<ref>.lock` with O_CREAT|O_EXCL (so two writers can't both win),
checks the ref still holds the expected old id, writes the new id into the lock file,
fsyncs it and renames it over the ref. A killed writer leaves at most a stale lock,
which the next writer reports by name; it never leaves a ref empty or half written.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .errors import BadRefName, CorruptObject, RefConflict, RefExists, RefLocked, UnknownRevision
from .fsutil import NotARegularFile, fsync_dir, open_regular
from .objects import ObjectId, is_oid
from .packed_refs import FILE_NAME as PACKED_REFS, PackedRefs, render as render_packed

HEADS = "refs/heads/"
TAGS = "refs/tags/"
ZERO_ID = "0" * 64
# Sentinel for "don't check the old value" in update().
ANY = object()

_BAD_CHARS = re.compile(r"[\x00-\x20\x7f ~^:?*\[\\]")


def check_ref_name(name: str, what: str = "branch") -> str:
    """Validate a short branch or tag name (git check-ref-format rules, plus a length cap)."""
    problem = None
    if not name:
        problem = "it is empty"
    elif len(name) > 200:
        problem = "it is longer than 200 characters"
    elif _BAD_CHARS.search(name):
        problem = "it contains a space, a control character or one of ~ ^ : ? * [ \\"
    elif ".." in name:
        problem = "it contains '..'"
    elif "@{" in name or name == "@":
        problem = "it contains '@{' or is '@'"
    elif name.startswith("/") or name.endswith("/") or "//" in name:
        problem = "it has an empty path component"
    elif name.endswith("."):
        problem = "it ends with '.'"
    elif any(part.startswith(".") or part.endswith(".lock") for part in name.split("/")):
        problem = "a component starts with '.' or ends with '.lock'"
    elif name in ("HEAD",) or name.startswith("refs/"):
        problem = "it is reserved"
    if problem:
        raise BadRefName(f"invalid {what} name {name!r}: {problem}")
    return name


def check_full_ref_name(refname: str) -> str:
    """Validate a full ref name (`refs/<namespace>/<name>`) by the same rules, so that no
    ref name, wherever it comes from (HEAD's file, a remote, a user), reaches outside
    `.ah/refs/` and `.ah/logs/refs/` (`..`, empty components, absolute paths)."""
    if not refname.startswith("refs/"):
        raise BadRefName(f"invalid ref name {refname!r}: it does not start with 'refs/'")
    namespace, _, name = refname[len("refs/"):].partition("/")  # "heads", "users/alice/main"
    check_ref_name(namespace, "ref")
    check_ref_name(name, "ref")
    return refname


def _read_text(path: Path) -> str:
    """A small file's text, with three system calls (open, read, close): `read_text`'s
    buffered reader made ten for each ref and HEAD a commit reads. Anything but a regular
    file (a FIFO would block forever) is a corrupt ref, named by its path under .ah/."""
    try:
        fd = open_regular(path)
    except NotARegularFile:
        raise CorruptObject(path.name, f"{path} is not a regular file") from None
    try:
        chunks = []
        while True:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode("utf-8", errors="replace")


@dataclass(frozen=True)
class ReflogEntry:
    """One move of a ref.

    Attributes:
        old: id before the move (ZERO_ID when the ref was created).
        new: id after the move (a deleted ref's reflog is deleted with it).
        timestamp: seconds since the epoch.
        who: the author of the move.
        message: why the ref moved ("commit: ...", "branch: created from ...").
    """

    old: str
    new: str
    timestamp: int
    who: str
    message: str


class RefStore:
    """Loose refs under a registry's `.ah/` folder."""

    def __init__(self, ah_dir: Path):
        self.ah_dir = Path(ah_dir)
        # Refs folded into one sorted file (packed_refs.py); a loose ref shadows its packed entry.
        self.packed = PackedRefs(self.ah_dir / PACKED_REFS)

    # --- HEAD -----------------------------------------------------------------------
    def read_head(self) -> tuple[str | None, ObjectId | None]:
        """(symbolic target ref or None if detached, commit id or None if unborn)."""
        text = _read_text(self.ah_dir / "HEAD").strip()
        if text.startswith("ref: "):
            target = text[5:]
            try:
                check_full_ref_name(target)
            except BadRefName as exc:
                raise CorruptObject("HEAD", f"HEAD points at a bad ref name: {exc}") from None
            return target, self.read(target)
        if is_oid(text):
            return None, ObjectId(text)
        raise CorruptObject("HEAD", f"HEAD holds neither a ref nor an id: {text[:80]!r}")

    def set_head_symbolic(self, refname: str) -> None:
        check_full_ref_name(refname)
        self._write_locked(self.ah_dir / "HEAD", f"ref: {refname}\n", expected=ANY, refname="HEAD")

    def set_head_detached(self, oid: ObjectId, expected=ANY) -> None:
        """Detach HEAD at `oid`; with `expected`, only if HEAD is still detached at that id
        (so a commit on a detached HEAD never drops a concurrent commit or switch)."""
        self._write_locked(self.ah_dir / "HEAD", f"{oid}\n", expected=expected, refname="HEAD")

    # --- refs -----------------------------------------------------------------------
    def _path(self, refname: str) -> Path:
        return self.ah_dir / refname

    def read(self, refname: str) -> ObjectId | None:
        try:
            check_full_ref_name(refname)
        except BadRefName:
            return None  # no ref can have that name (and it may point outside refs/)
        path = self._path(refname)
        try:
            text = _read_text(path).strip()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return self.packed.get(refname) if refname.startswith("refs/") else None
        if not is_oid(text):
            raise CorruptObject(refname, f"ref {refname} does not hold an object id")
        return ObjectId(text)

    def update(
        self, refname: str, new: ObjectId, expected=ANY, *, who: str = "", message: str = ""
    ) -> None:
        """Set `refname` to `new` if it currently holds `expected` (None: must not exist)."""
        check_full_ref_name(refname)
        old = self._write_locked(self._path(refname), f"{new}\n", expected=expected, refname=refname)
        self._append_reflog(refname, old or ZERO_ID, new, who, message)

    def delete(self, refname: str, expected=ANY, *, who: str = "", message: str = "") -> None:
        check_full_ref_name(refname)
        path = self._path(refname)
        lock = self._take_lock(path, refname)
        try:
            current = self.read(refname)
            if current is None:
                raise UnknownRevision(f"{refname} does not exist")
            if expected is not ANY and current != expected:
                raise RefConflict(f"{refname} moved to {current[:12]} while it was being deleted")
            if self.packed.get(refname) is not None:
                # Packed entry first: were we killed before the loose file goes, the ref
                # still reads as it was (never resurrected from a stale packed entry).
                self._rewrite_packed(remove={refname})
            path.unlink(missing_ok=True)
        finally:
            lock.unlink(missing_ok=True)
        self._prune_empty_dirs(path.parent)
        # As git does, a deleted ref's reflog goes with it: left behind, `logs/.../x` (a
        # file) or `logs/.../x/` (a folder) would break the reflog of a later `x/y` or `x`
        # after the ref itself had been created.
        log = self.ah_dir / "logs" / refname
        log.unlink(missing_ok=True)
        self._prune_empty_dirs(log.parent)

    def list(self, prefix: str) -> Iterator[tuple[str, ObjectId]]:
        """(refname, id) for every ref under `prefix` (e.g. "refs/heads/"), sorted.

        Loose refs and packed refs merged; a loose ref shadows the packed entry of its name.
        """
        loose = dict(self._list_loose(prefix))
        packed = dict(self.packed.iter_prefix(prefix))
        packed.update(loose)
        yield from sorted(packed.items())

    def _list_loose(self, prefix: str) -> list[tuple[str, ObjectId]]:
        root = self._path(prefix)
        if not root.is_dir():
            return []
        found = []
        for dirpath, _dirnames, filenames in os.walk(root):
            for fn in filenames:
                if fn.endswith(".lock") or fn.startswith("."):
                    continue
                full = Path(dirpath) / fn
                refname = full.relative_to(self.ah_dir).as_posix()
                oid = self.read(refname)
                if oid is not None:
                    found.append((refname, oid))
        return sorted(found)

    # --- packed refs ------------------------------------------------------------------
    def packed_all(self) -> Iterator[tuple[str, ObjectId]]:
        """Every packed ref, read from the file's first record: what gc, fsck and every
        rewrite of the file take as the whole set. A listing under `refs/` starts with a
        binary search, so a flipped bit that turned `refs/heads/main` into
        `rdfs/heads/main` hid that ref and the 15 after it; gc then pruned their history
        and a rewrite dropped them for good. A name outside `refs/` is damage and raises
        CorruptObject (checked by prefix only: gc and import read a million of them)."""
        for name, oid in self.packed.iter_prefix(""):
            if not name.startswith("refs/"):
                raise CorruptObject(PACKED_REFS, f"{self.packed.path} holds {name!r}, which is not under refs/ "
                                                 f"(a damaged file?)")
            yield name, oid

    def pack_refs(self) -> int:
        """Fold every loose ref into packed-refs and remove the loose files; the count packed.

        Each loose file is removed under its own ref lock and only if it still holds the
        id that was packed, so a ref moved meanwhile keeps its newer loose value.
        """
        lock = self._take_lock(self.ah_dir / PACKED_REFS, PACKED_REFS)
        try:
            loose = self._list_loose("refs/")
            merged = dict(self.packed_all())
            merged.update(loose)
            self._commit_packed(lock, merged)
        finally:
            lock.unlink(missing_ok=True)
        for refname, oid in loose:
            path = self._path(refname)
            try:
                ref_lock = self._take_lock(path, refname)
            except RefLocked:
                continue  # being updated right now: it stays loose, and shadows the packed entry
            try:
                if self.read(refname) == oid:
                    path.unlink(missing_ok=True)
            finally:
                ref_lock.unlink(missing_ok=True)
            self._prune_empty_dirs(path.parent)
        return len(loose)

    def create_packed(self, refs: dict[str, ObjectId], *, who: str = "", message: str = "") -> None:
        """Create many new refs at once, straight into packed-refs (bulk import).

        All or nothing: if any of them exists already (loose or packed) or clashes with an
        existing name as a folder, nothing is written. Each ref gets no reflog file of
        its own (that would be a file per ref again); one line per ref goes to the
        shared log `logs/packed-refs` instead.
        """
        lock = self._take_lock(self.ah_dir / PACKED_REFS, PACKED_REFS)
        try:
            merged = dict(self.packed_all())
            for refname, oid in refs.items():
                check_full_ref_name(refname)
                if not is_oid(oid):
                    raise ValueError(f"not an object id: {oid!r}")
                if refname in merged or self._path(refname).exists():
                    raise RefExists(f"{refname} already exists")
                self._check_packed_conflicts(refname)
            merged.update(refs)
            self._commit_packed(lock, merged)
        finally:
            lock.unlink(missing_ok=True)
        clean = " ".join(message.split())
        who = " ".join(who.split()) or "unknown"
        now = int(time.time())
        lines = "".join(f"{ZERO_ID} {oid} {now} {who}\t{clean} {name}\n" for name, oid in sorted(refs.items()))
        log = self.ah_dir / "logs" / PACKED_REFS
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(lines)

    def _rewrite_packed(self, *, remove: set[str]) -> None:
        lock = self._take_lock(self.ah_dir / PACKED_REFS, PACKED_REFS)
        try:
            entries = {n: o for n, o in self.packed_all() if n not in remove}
            self._commit_packed(lock, entries)
        finally:
            lock.unlink(missing_ok=True)

    def _commit_packed(self, lock: Path, entries: dict[str, ObjectId]) -> None:
        """Write the new packed-refs into its (held) lock file and rename it into place."""
        with open(lock, "wb") as fh:
            fh.write(render_packed(entries.items()))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(lock, self.ah_dir / PACKED_REFS)
        fsync_dir(self.ah_dir)

    def _check_packed_conflicts(self, refname: str) -> None:
        """A packed `a/b` forbids creating `a`, and a packed `a` forbids `a/b` (as on disk)."""
        below = self.packed.has_under(refname)
        if below:
            raise RefExists(f"cannot create {refname}: refs exist below it (e.g. {below})")
        parts = refname.split("/")
        for i in range(2, len(parts)):
            parent = "/".join(parts[:i])
            if self.packed.get(parent) is not None:
                raise RefExists(f"cannot create {refname}: a ref named like one of its parent folders exists")

    def reflog(self, refname: str) -> list[ReflogEntry]:
        try:
            check_full_ref_name(refname)
        except BadRefName:
            return []
        path = self.ah_dir / "logs" / refname
        if not path.is_file():
            return []
        entries = []
        for line in path.read_text(encoding="utf-8").splitlines():
            meta, _, message = line.partition("\t")
            parts = meta.split(" ", 3)
            if len(parts) == 4:
                entries.append(ReflogEntry(parts[0], parts[1], int(parts[2]), parts[3], message))
        return entries

    # --- internals ------------------------------------------------------------------
    def _take_lock(self, path: Path, refname: str) -> Path:
        lock, fd = self._open_lock(path, refname)
        os.close(fd)
        return lock

    def _open_lock(self, path: Path, refname: str) -> tuple[Path, int]:
        """Create `<path>.lock` (O_EXCL: one writer wins); the lock and a descriptor to
        write the new value through."""
        lock = path.with_name(path.name + ".lock")
        flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0)
        clash = f"cannot create {refname}: a ref named like one of its parent folders exists"
        try:
            try:
                return lock, os.open(lock, flags, 0o644)
            except FileNotFoundError:  # a new ref in a new folder: make the folders, once
                try:
                    lock.parent.mkdir(parents=True, exist_ok=True)
                except (FileExistsError, NotADirectoryError):
                    raise RefExists(clash) from None
                return lock, os.open(lock, flags, 0o644)
            except NotADirectoryError:
                raise RefExists(clash) from None
        except FileExistsError:
            raise RefLocked(
                f"{refname} is locked by another process ({lock} exists); "
                "if no other ah process is running, remove that file"
            ) from None

    def _write_locked(self, path: Path, content: str, *, expected, refname: str) -> ObjectId | None:
        if path.is_dir():
            raise RefExists(f"cannot create {refname}: refs exist below it (e.g. {refname}/...)")
        lock, fd = self._open_lock(path, refname)
        placed = False
        try:
            if refname != "HEAD":
                old = self.read(refname)
            else:  # HEAD compares as its id when detached, as None when symbolic
                target, head_id = self.read_head() if expected is not ANY else ("", None)
                old = head_id if target is None else None
            if old is None and refname != "HEAD":
                self._check_packed_conflicts(refname)
            if expected is not ANY and old != expected:
                if expected is None:
                    raise RefExists(f"{refname} already exists (at {old[:12]})")
                raise RefConflict(
                    f"{refname} moved from {str(expected)[:12]} to {str(old)[:12] if old else 'nothing'} "
                    "under this update; retry"
                )
            # Written through the descriptor that took the lock: reopening the lock file
            # to truncate and write it cost ~0.5 ms of every ref update on ext4.
            data = content.encode()
            if os.write(fd, data) != len(data):
                raise OSError(f"short write to {lock}")
            os.fsync(fd)
            fd, written = -1, fd
            os.close(written)
            os.replace(lock, path)  # atomic: readers see the old id or the new one
            placed = True
            fsync_dir(path.parent)
            return old
        finally:
            if fd >= 0:
                os.close(fd)
            if not placed:
                lock.unlink(missing_ok=True)

    def _append_reflog(self, refname: str, old: str, new: str, who: str, message: str) -> None:
        path = self.ah_dir / "logs" / refname
        clean = " ".join(message.split())
        who = " ".join(who.split()) or "unknown"
        # One write() of a line under O_APPEND: concurrent appenders never interleave.
        line = f"{old} {new} {int(time.time())} {who}\t{clean}\n".encode("utf-8")
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(path, flags, 0o644)
        except FileNotFoundError:  # the ref's first move: its log folder may not exist yet
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, flags, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def _prune_empty_dirs(self, folder: Path) -> None:
        stop = {self.ah_dir / top / sub for top in ("refs", "logs/refs") for sub in ("heads", "tags", "")}
        while folder not in stop and folder != self.ah_dir:
            try:
                folder.rmdir()
            except OSError:
                return
            folder = folder.parent
