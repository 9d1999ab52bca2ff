"""The Registry API: everything the `ah` CLI does, as typed Python calls.

A registry is a folder holding `.ah/` (docs/format/layout.md). The API never prints and
never exits; it returns dataclasses from `adapterhub.results` and raises
`adapterhub.errors` types.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor, wait
import heapq
import json
import os
import threading
from pathlib import Path
from typing import Iterator

from .errors import AhError, CorruptObject, NotARegistry, RegistryExists, UnknownRevision, UnsupportedFormat, UsageError
from .fsutil import atomic_write
from .objects import COMMIT, TAG, Commit, ObjectId, Snapshot, Tag
from .refs import ANY, HEADS, TAGS, RefStore, check_ref_name
from .results import CheckoutResult, CommitInfo, CommitResult, RefInfo, ShowResult
from .revisions import peel_to_commit, resolve as resolve_expr
from .snapshot import Progress, materialize, store_folder
from .packstore import PackedObjectStore
from .store import ObjectStore
from . import provenance as prov

AH_DIR = ".ah"
# Version 2 registries may hold what version-1 readers misread as damage: pack index
# version 2, packed-refs version 2, tensor encodings 4 and 5 (docs/format/layout.md). A
# version-1 registry is upgraded the first time this version opens it, so that an older
# adapterhub then refuses it as too new instead of calling healthy files corrupt.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
DEFAULT_BRANCH = "main"
# More packs than this after a commit: `ah gc` folds them into one (git: gc.autoPackLimit),
# inline when the registry holds at most AUTO_GC_MAX_OBJECTS objects (seconds); above, a
# gc takes minutes (~20 at a million adapters), so the commit only says so.
AUTO_PACK_LIMIT = 50
AUTO_GC_MAX_OBJECTS = 200_000


_side: ThreadPoolExecutor | None = None
_side_lock = threading.Lock()


def _side_pool() -> ThreadPoolExecutor:
    """Two threads for a commit's provenance and default author, made on first use and
    kept: a pool per commit started (and joined) two threads every time, ~0.4 ms of a
    commit. A forked child starts without them and makes its own."""
    global _side
    with _side_lock:
        if _side is None:
            _side = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ah-provenance")
        return _side


def _forget_side_pool_in_child() -> None:
    global _side, _side_lock
    _side, _side_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_side_pool_in_child)


def find_registry(start: Path | None = None) -> Path:
    """Nearest folder at or above `start` that holds `.ah/`."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / AH_DIR).is_dir():
            return folder
    raise NotARegistry(f"not inside an adapterhub registry (no {AH_DIR}/ in {here} or above); run `ah init` first")


class Registry:
    """A registry on disk: object store, refs and config.

    Attributes:
        root: the folder holding `.ah/`.
        ah_dir: the `.ah/` folder itself.
        store: the object store.
        refs: the ref store.
        config: the parsed `.ah/config.json`.
    """

    def __init__(self, root: Path, store: ObjectStore | None = None, *, read_only: bool = False):
        self.root = Path(root)
        self.ah_dir = self.root / AH_DIR
        if not self.ah_dir.is_dir():
            raise NotARegistry(f"{self.root} is not an adapterhub registry (no {AH_DIR}/ folder)")
        self.config = self._read_config(upgrade=not read_only)
        self.store = store or PackedObjectStore(self.ah_dir / "objects")  # loose + packs (issue 4)
        self.refs = RefStore(self.ah_dir)
        # (commit id, its snapshot) of the last commit made through this object: the next
        # commit's parent, nearly always, whose snapshot names the delta bases; reading and
        # parsing it back cost ~1.2 ms of every commit in a training loop (ids name
        # content, so the one in hand is the one on disk).
        self._last_commit: tuple[ObjectId, Snapshot] | None = None

    # --- set-up ---------------------------------------------------------------------
    @classmethod
    def init(cls, path: Path | str = ".", default_branch: str = DEFAULT_BRANCH) -> "Registry":
        root = Path(path)
        check_ref_name(default_branch)
        ah = root / AH_DIR
        if ah.exists():
            raise RegistryExists(f"{root} already holds a registry")
        root.mkdir(parents=True, exist_ok=True)
        # Build in a temp folder and rename, so a killed init never leaves half a registry.
        tmp = root / f".ah-init-{os.getpid()}"
        tmp.mkdir()
        # objects/pack from the start (as git init): a commit's pack writer opens its temp
        # file there while still encoding, and a refused commit then leaves no new folder.
        for sub in ("objects/pack", "refs/heads", "refs/tags", "logs"):
            (tmp / sub).mkdir(parents=True)
        atomic_write(tmp / "config.json", (json.dumps({"format_version": FORMAT_VERSION}, indent=2) + "\n").encode())
        atomic_write(tmp / "HEAD", f"ref: {HEADS}{default_branch}\n".encode())
        try:
            os.rename(tmp, ah)
        except OSError:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            raise RegistryExists(f"{root} already holds a registry") from None
        return cls(root)

    @classmethod
    def open(cls, path: Path | str | None = None, *, read_only: bool = False) -> "Registry":
        """Open the registry at `path`, or discover it: `$AH_REGISTRY`, else nearest `.ah/` upward.

        `read_only` (ah fsck) opens without marking an older registry with the current
        format version: a checker must change nothing."""
        if path is None:
            env = os.environ.get("AH_REGISTRY")
            path = Path(env) if env else find_registry()
        return cls(Path(path), read_only=read_only)

    def _read_config(self, *, upgrade: bool) -> dict:
        path = self.ah_dir / "config.json"
        try:
            config = json.loads(path.read_text())
        except FileNotFoundError:
            raise NotARegistry(f"{self.ah_dir} has no config.json") from None
        except ValueError as exc:
            raise UnsupportedFormat(f"{path} is not valid JSON: {exc}") from None
        version = config.get("format_version") if isinstance(config, dict) else None
        if type(version) is not int or version not in READABLE_VERSIONS:
            raise UnsupportedFormat(
                f"registry format version {version!r} is not supported by this adapterhub "
                f"(it reads versions {', '.join(map(str, READABLE_VERSIONS))}); upgrade adapterhub"
            )
        if version < FORMAT_VERSION and upgrade:
            config = dict(config, format_version=FORMAT_VERSION)
            try:
                atomic_write(path, (json.dumps(config, indent=2) + "\n").encode())
            except OSError:
                pass  # read-only: nothing here will write the newer formats either
        return config

    # --- revisions --------------------------------------------------------------------
    def resolve(self, rev: str = "HEAD") -> ObjectId:
        """Commit id for a revision expression (id, short id, branch, tag, HEAD, ~N, ^N)."""
        return resolve_expr(self.store, self.refs, rev)

    def current_branch(self) -> str | None:
        """Short name of the branch HEAD points at, or None when detached."""
        target, _ = self.refs.read_head()
        return target[len(HEADS):] if target and target.startswith(HEADS) else None

    def commit_info(self, oid: ObjectId) -> CommitInfo:
        return CommitInfo(oid, self.store.get_commit(oid))

    # --- commit ---------------------------------------------------------------------
    def commit(
        self,
        folder: Path | str,
        message: str,
        *,
        branch: str | None = None,
        base_model: str | None = None,
        base_model_revision: str | None = None,
        dataset: str | None = None,
        train_config: Path | str | None = None,
        params: dict | None = None,
        author: str | None = None,
        extra_parents: tuple[str, ...] = (),
        progress: Progress | None = None,
    ) -> CommitResult:
        """Snapshot an adapter folder and record it as a new commit on a branch.

        The branch (default: HEAD's) moves by compare-and-swap from the tip the parent
        was read from, so a concurrent commit on the same branch fails cleanly rather
        than being silently dropped from history.
        """
        if not message or not message.strip():
            raise UsageError("a commit message is required (-m MSG)")
        folder = Path(folder)
        if branch is not None:
            check_ref_name(branch)
            refname = HEADS + branch
            parent = self.refs.read(refname)
        else:
            refname, parent = self.refs.read_head()
        # The parent's snapshot offers delta bases (issue 4).
        damaged_parent = None
        if parent and self._last_commit and self._last_commit[0] == parent:
            parent_snap: ObjectId | Snapshot | None = self._last_commit[1]
        elif parent:
            # Only delta bases come from the parent's commit and snapshot: when either is
            # damaged the new revision is stored whole, and the run's commits go on.
            try:
                parent_snap = self.store.get_snapshot(self.store.get_commit(parent).snapshot)
            except (CorruptObject, UnsupportedFormat) as exc:
                parent_snap, damaged_parent = None, str(exc)
        else:
            parent_snap = None
        # Provenance (git subprocesses, a base-model fingerprint) waits on other programs
        # and on the disk; it runs on a thread while the tensors are hashed and encoded,
        # and the default author (another git process) on a second one beside it: on a
        # small commit, waiting for the two one after the other was most of its time.
        side = _side_pool()
        record_f = side.submit(
            prov.collect,
            folder,
            base_model=base_model,
            base_model_revision=base_model_revision,
            dataset=dataset,
            train_config=Path(train_config) if train_config else None,
            params=params,
        )
        author_f = side.submit(prov.default_author) if not author else None
        try:
            # One batch: the new objects land together (one pack for a big checkpoint) and
            # are all on disk when the block ends, before the ref below moves.
            damaged_before = set(self.store.damaged_bases)
            with self.store.batch():
                snap_id, stats = store_folder(self.store, folder, progress, delta_from=parent_snap)
                record = record_f.result()
                parents = ([parent] if parent else []) + [self.resolve(p) for p in extra_parents]
                commit = Commit(
                    snapshot=snap_id,
                    parents=tuple(parents),
                    author=author or author_f.result(),
                    timestamp=prov.now(),
                    message=message,
                    provenance=record,
                )
                oid = self.store.put(COMMIT, commit.serialize())
        finally:
            # A refused commit returns only once its side tasks are done, as it did when
            # they had a pool of their own: no git process outlives the call.
            wait([f for f in (record_f, author_f) if f is not None])
        summary = f"commit{' (initial)' if not parent else ''}: {message.splitlines()[0]}"
        if refname is None:
            self.refs.set_head_detached(oid, expected=parent)  # CAS too: a detached HEAD loses nothing
        else:
            self.refs.update(refname, oid, expected=parent, who=commit.author, message=summary)
        self._last_commit = (oid, stats.snapshot) if stats.snapshot is not None else None
        self._index_sync()
        notice = self._auto_repack()
        # The commit is whole and sound; the damage is in what it would have diffed against.
        warnings = []
        if damaged_parent:
            warnings.append(f"the parent revision cannot be read ({damaged_parent}): this commit stores its tensors "
                            "whole; run `ah fsck`")
        damaged = sorted(self.store.damaged_bases - damaged_before)
        if damaged:
            warnings.append(f"{len(damaged)} tensor(s) of the parent revision are damaged (e.g. {damaged[0]}): this "
                            "commit stores those tensors whole instead of as deltas; run `ah fsck`")
        short = refname[len(HEADS):] if refname and refname.startswith(HEADS) else refname
        return CommitResult(
            oid, short, commit.parents, stats.files, stats.tensors, stats.logical_bytes, stats.new_objects, notice,
            tuple(warnings),
        )

    # --- history ----------------------------------------------------------------------
    def iter_log(self, rev: str = "HEAD") -> Iterator[CommitInfo]:
        """Ancestors of `rev`, newest first (by timestamp, then id), each once."""
        start = self.resolve(rev)
        seen = {start}
        first = self.commit_info(start)
        heap = [(-first.timestamp, start, first)]
        while heap:
            _, oid, info = heapq.heappop(heap)
            yield info
            for p in info.parents:
                if p not in seen:
                    seen.add(p)
                    pinfo = self.commit_info(p)
                    heapq.heappush(heap, (-pinfo.timestamp, p, pinfo))

    def log(self, rev: str = "HEAD", n: int | None = None) -> list[CommitInfo]:
        if n is not None and n < 0:
            raise UsageError("-n must be zero or more")
        out = []
        for info in self.iter_log(rev):
            if n is not None and len(out) >= n:
                break
            out.append(info)
        return out

    def show(self, rev: str = "HEAD") -> ShowResult:
        oid = self.resolve(rev)
        info = self.commit_info(oid)
        snapshot = self.store.get_snapshot(info.commit.snapshot)
        names = [r.name for r in self.branches() if r.commit == oid]
        names += [f"tag: {r.name}" for r in self.tags() if r.commit == oid]
        return ShowResult(info, snapshot, names)

    # --- checkout ---------------------------------------------------------------------
    def checkout(
        self, rev: str, out: Path | str, *, force: bool = False, progress: Progress | None = None
    ) -> CheckoutResult:
        """Write the adapter folder of `rev` into `out`, every file byte-identical."""
        oid = self.resolve(rev)
        commit = self.store.get_commit(oid)
        snap = materialize(self.store, commit.snapshot, Path(out), force=force, progress=progress)
        return CheckoutResult(oid, str(out), len(snap.files), sum(f.size for f in snap.files))

    # --- branches and tags ------------------------------------------------------------
    def branches(self) -> list[RefInfo]:
        current = self.current_branch()
        return [
            RefInfo(name[len(HEADS):], oid, name[len(HEADS):] == current)
            for name, oid in self.refs.list(HEADS)
        ]

    def create_branch(self, name: str, start: str = "HEAD", *, force: bool = False) -> RefInfo:
        check_ref_name(name)
        oid = self.resolve(start)
        self.refs.update(
            HEADS + name, oid, expected=ANY if force else None,
            who=prov.default_author(), message=f"branch: created from {start}",
        )
        self._index_sync()
        return RefInfo(name, oid, name == self.current_branch())

    def delete_branch(self, name: str) -> RefInfo:
        check_ref_name(name)
        if name == self.current_branch():
            raise UsageError(f"cannot delete branch {name!r}: HEAD points at it (switch to another branch first)")
        oid = self.refs.read(HEADS + name)
        if oid is None:
            raise UnknownRevision(f"branch {name!r} not found")
        self.refs.delete(HEADS + name, expected=oid, who=prov.default_author(), message="branch: deleted")
        self._index_sync()
        return RefInfo(name, oid)

    def switch(self, name: str, *, create: bool = False, start: str = "HEAD") -> RefInfo:
        """Point HEAD at a branch (creating it from `start` with create=True)."""
        check_ref_name(name)
        if create:
            info = self.create_branch(name, start)
        else:
            oid = self.refs.read(HEADS + name)
            if oid is None:
                raise UnknownRevision(f"branch {name!r} not found (use -c to create it)")
            info = RefInfo(name, oid)
        self.refs.set_head_symbolic(HEADS + name)
        self._index_sync()
        return RefInfo(info.name, info.commit, True)

    def tags(self) -> list[RefInfo]:
        out = []
        for name, oid in self.refs.list(TAGS):
            commit = peel_to_commit(self.store, oid, name)
            out.append(RefInfo(name[len(TAGS):], commit, False, oid))
        return out

    def create_tag(self, name: str, rev: str = "HEAD", *, message: str | None = None, force: bool = False) -> RefInfo:
        """Lightweight tag, or an annotated tag object when a message is given."""
        check_ref_name(name, "tag")
        commit = self.resolve(rev)
        target = commit
        author = prov.default_author()
        if message is not None:
            tag = Tag(commit, COMMIT, name, author, prov.now(), message)
            target = self.store.put(TAG, tag.serialize())
        self.refs.update(TAGS + name, target, expected=ANY if force else None, who=author, message=f"tag: {rev}")
        self._index_sync()
        return RefInfo(name, commit, False, target)

    def delete_tag(self, name: str) -> RefInfo:
        check_ref_name(name, "tag")
        oid = self.refs.read(TAGS + name)
        if oid is None:
            raise UnknownRevision(f"tag {name!r} not found")
        self.refs.delete(TAGS + name, expected=oid, who=prov.default_author(), message="tag: deleted")
        self._index_sync()
        return RefInfo(name, oid)

    # --- evals (adapterhub.evals) -------------------------------------------------------
    def add_eval(
        self, rev: str, metrics: dict, *, suite: str = "", dataset: str | None = None,
        evaluator: str | None = None, details: dict | None = None,
    ) -> list:
        """Record one eval object per metric for the commit `rev` names; returns EvalInfo list."""
        from . import evals

        commit = self.resolve(rev)
        if not metrics:
            raise evals.BadEval("give at least one metric")
        who, when = evaluator or prov.default_author(), prov.now()
        records = [
            evals.new_record(commit, name, value, suite=suite, dataset=dataset, evaluator=who,
                             timestamp=when, details=details)
            for name, value in metrics.items()
        ]
        out = evals.store_evals(self.store, evals.EvalLists(self.ah_dir), records)
        self._index_sync()
        return out

    def evals(self, rev: str | None = None) -> list:
        """Eval records (EvalInfo) of `rev` (default HEAD), oldest first; reads no index."""
        from . import evals

        return evals.load_evals(self.store, evals.EvalLists(self.ah_dir), self.resolve(rev or "HEAD"))

    def _auto_repack(self) -> str | None:
        """After a write: fold the packs into one when there are more than AUTO_PACK_LIMIT;
        returns a notice for the user when that was left to them.

        Every commit of a real checkpoint writes a pack; each open pack holds two file
        descriptors and one more index to search, so a few hundred commits would hit the
        usual 1024-descriptor limit. Like `git gc --auto` this runs `ah gc` with the default
        grace period (nothing young is pruned), but only on registries small enough for it
        to take seconds; `AH_GC_AUTO=0` turns it off. It never fails the write that
        triggered it (another gc running, a full disk: the next one retries).
        """
        packs = self.store.packs()
        if os.environ.get("AH_GC_AUTO", "1") == "0" or len(packs) <= AUTO_PACK_LIMIT:
            return None
        objects = sum(p.count for p in packs)
        if objects > AUTO_GC_MAX_OBJECTS:
            return (f"{len(packs)} packs: run `ah gc` to fold them into one (not run automatically "
                    f"on a registry of {objects:,} objects, where it takes minutes)")
        from .gc import collect_garbage

        try:
            collect_garbage(self.ah_dir, self.store, self.refs)
        except (AhError, OSError):
            pass
        return None

    def _index_sync(self) -> None:
        """Bring .ah/index.duckdb up to date after a write; never fails the write itself."""
        from .index import sync_after_write

        sync_after_write(self)
