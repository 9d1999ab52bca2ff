"""Revision expressions: `HEAD`, ids (full or >= 6 hex), branches, tags, `~N`, `^`, `^N`.

Lookup order for the base name (git's, minus its warnings): `HEAD`; a full id present in
the store; a full ref name (`refs/...`); a branch; a tag; an abbreviated id. A name that
is both a branch and a short id resolves to the branch.
"""

from __future__ import annotations

import re

from .errors import UnknownRevision
from .objects import COMMIT, TAG, ObjectId, is_oid
from .refs import HEADS, TAGS, RefStore
from .store import ObjectStore

_SUFFIX = re.compile(r"(~|\^)(\d*)")
_HEX = re.compile(r"^[0-9a-fA-F]{6,64}$")
MIN_ABBREV = 6


def split_expression(expr: str) -> tuple[str, list[tuple[str, int]]]:
    """Split `main~2^2` into ("main", [("~", 2), ("^", 2)])."""
    cut = len(expr)
    for i, ch in enumerate(expr):
        if ch in "~^":
            cut = i
            break
    base, rest = expr[:cut], expr[cut:]
    steps = []
    pos = 0
    while pos < len(rest):
        m = _SUFFIX.match(rest, pos)
        if not m:
            raise UnknownRevision(f"bad revision expression {expr!r}")
        op, num = m.group(1), m.group(2)
        steps.append((op, int(num) if num else 1))
        pos = m.end()
    if not base:
        raise UnknownRevision(f"bad revision expression {expr!r}: no name before {rest!r}")
    return base, steps


def peel_to_commit(store: ObjectStore, oid: ObjectId, expr: str) -> ObjectId:
    """Follow annotated tags until a commit; anything else is not a revision."""
    for _ in range(16):
        obj_type = store.object_type(oid)
        if obj_type == COMMIT:
            return oid
        if obj_type == TAG:
            oid = store.get_tag(oid).object
            continue
        raise UnknownRevision(f"{expr!r} names a {obj_type} object, not a commit")
    raise UnknownRevision(f"{expr!r}: tag chain too deep")


def resolve_base(store: ObjectStore, refs: RefStore, name: str) -> ObjectId:
    if name == "HEAD":
        target, oid = refs.read_head()
        if oid is None:
            branch = target[len(HEADS):] if target and target.startswith(HEADS) else target
            raise UnknownRevision(f"HEAD: branch {branch!r} has no commits yet")
        return oid
    if is_oid(name) and store.has(name):
        return ObjectId(name)
    if name.startswith("refs/"):
        oid = refs.read(name)
        if oid is not None:
            return oid
    for prefix in (HEADS, TAGS):
        oid = refs.read(prefix + name)
        if oid is not None:
            return oid
    if _HEX.match(name):
        found = store.resolve_prefix(name.lower())
        if found is not None:
            return found
    raise UnknownRevision(f"unknown revision {name!r}")


def resolve(store: ObjectStore, refs: RefStore, expr: str) -> ObjectId:
    """Resolve a revision expression to a commit id."""
    if not expr or any(ord(c) < 0x20 for c in expr):
        raise UnknownRevision(f"bad revision expression {expr!r}")
    base, steps = split_expression(expr)
    oid = peel_to_commit(store, resolve_base(store, refs, base), expr)
    for op, num in steps:
        if op == "~":
            for _ in range(num):
                parents = store.get_commit(oid).parents
                if not parents:
                    raise UnknownRevision(f"{expr!r}: {oid[:12]} has no parent")
                oid = parents[0]
        else:  # ^N: the N-th parent; ^0 is the commit itself
            if num == 0:
                continue
            parents = store.get_commit(oid).parents
            if len(parents) < num:
                raise UnknownRevision(f"{expr!r}: {oid[:12]} has no parent number {num}")
            oid = parents[num - 1]
    return oid
