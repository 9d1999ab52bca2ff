"""Reachability: every object that refs (and the evals of reachable commits) keep alive.

gc keeps what this walk finds and `ah stats` sums over it. Only structured objects are
read (commits, snapshots, tags, which are small); tensors and blobs are leaves whose ids
the snapshot already lists, so marking a million adapters never decodes a tensor. A
stored delta needs its base, so the walk also adds the delta base of every object it
keeps (read from the record header, not decoded), whichever way that base is reached.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from .errors import AhError, CorruptObject, ObjectNotFound
from .evals import EvalLists
from .objects import COMMIT, SNAPSHOT, TAG, ObjectId, parse_object
from .refs import RefStore
from .store import ObjectStore


@dataclass
class Reachable:
    """The result of a walk.

    Attributes:
        ids: every reachable object, delta bases included.
        commits: the reachable commits.
        leaves: reachable file blobs and tensors (what snapshots list), without delta bases.
        snapshot_bytes: sum over reachable commits of their snapshot's file sizes: what
            storing every revision as a plain copy of its folder would take.
        missing: reachable ids the store does not have or cannot parse (damage: gc then
            removes nothing that could be one of them, and reports them).
    """

    ids: set[str] = field(default_factory=set)
    commits: set[str] = field(default_factory=set)
    leaves: set[str] = field(default_factory=set)
    snapshot_bytes: int = 0
    missing: set[str] = field(default_factory=set)


def ref_roots(refs: RefStore) -> set[ObjectId]:
    """Ids that every ref (any namespace under refs/) and a detached HEAD point at."""
    roots = {oid for _name, oid in refs.list("refs/")}
    try:
        target, head = refs.read_head()
    except (OSError, AhError):
        target, head = None, None
    if head is not None and target is None:
        roots.add(head)
    return roots


def walk(store: ObjectStore, roots: Iterable[str], ah_dir: Path | None = None, into: Reachable | None = None) -> Reachable:
    """Mark everything reachable from `roots` (extending `into`, when given)."""
    out = into or Reachable()
    evals = EvalLists(ah_dir) if ah_dir is not None else None
    stack = [r for r in roots if r not in out.ids]
    out.ids.update(stack)
    leaves: list[str] = []

    def push(oid: str) -> None:
        if oid not in out.ids:
            out.ids.add(oid)
            stack.append(oid)

    while stack:
        oid = stack.pop()
        try:
            obj_type, body = store.read(oid)
            if obj_type in (COMMIT, SNAPSHOT):
                dep = store.dependency_of(oid)  # a compression dictionary (bulk import)
                if dep is not None and dep not in out.ids:
                    out.ids.add(dep)
                    leaves.append(dep)
            if obj_type == COMMIT:
                commit = parse_object(oid, obj_type, body)
                out.commits.add(oid)
                push(commit.snapshot)
                for p in commit.parents:
                    push(p)
                if evals is not None:
                    for e in evals.read(oid):
                        push(e)
            elif obj_type == SNAPSHOT:
                snap = parse_object(oid, obj_type, body)
                out.snapshot_bytes += sum(f.size for f in snap.files)
                for b in snap.blob_ids():
                    out.leaves.add(b)
                    if b not in out.ids:
                        out.ids.add(b)
                        leaves.append(b)
            elif obj_type == TAG:
                push(parse_object(oid, obj_type, body).object)
            else:
                leaves.append(oid)
        except (ObjectNotFound, CorruptObject):
            out.missing.add(oid)
    add_delta_bases(store, leaves, out)
    return out


def add_delta_bases(store: ObjectStore, ids: Iterable[str], out: Reachable) -> None:
    """Add the dependency chain (delta bases, dictionaries) of each of `ids` to `out.ids`."""
    for oid in ids:
        for _ in range(64):  # chains are at most 8 deep; a forged loop must still end
            try:
                base = store.dependency_of(oid)
            except ObjectNotFound:
                out.missing.add(oid)
                break
            except CorruptObject:
                out.missing.add(oid)
                break
            if base is None or base in out.ids:
                if base is not None:
                    out.ids.add(base)
                break
            out.ids.add(base)
            oid = base
