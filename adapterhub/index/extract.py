"""Objects and refs -> index rows. The one place that decides what a row holds.

Both the full build and the incremental update call these, so a rebuilt index and a
caught-up one hold exactly the same rows.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import blake3

from ..evals import EvalLists, load_evals
from ..objects import ObjectId, canonical_json
from ..refs import HEADS, TAGS
from ..revisions import peel_to_commit
from ..safetensors_file import DTYPE_SIZES
from .schema import empty_rows


@dataclass(frozen=True)
class RefsState:
    """All refs and HEAD at one moment, and a digest that changes whenever any of them moves.

    Attributes:
        rows: (name, kind, target, commit) per ref, sorted; HEAD included.
        digest: BLAKE3 of the sorted rows: the index's refs watermark.
        tips: commit ids every ref and HEAD point at (the roots of reachability).
    """

    rows: tuple[tuple[str, str, str | None, str | None], ...]
    digest: str
    tips: frozenset


def refs_state(reg) -> RefsState:
    rows = []
    for name, oid in reg.refs.list(HEADS):
        rows.append((name, "branch", oid, oid))
    for name, oid in reg.refs.list(TAGS):
        rows.append((name, "tag", oid, peel_to_commit(reg.store, oid, name)))
    target, head = reg.refs.read_head()
    rows.append(("HEAD", "head", target or head, head))
    rows.sort(key=lambda r: r[0])
    h = blake3.blake3()
    for r in rows:
        h.update(("\0".join(x or "" for x in r) + "\n").encode())
    tips = frozenset(r[3] for r in rows if r[3])
    return RefsState(tuple(rows), h.hexdigest(), tips)


def refs_rows(state: RefsState) -> dict[str, list]:
    out = empty_rows("refs")
    for name, kind, target, commit in state.rows:
        out["name"].append(name)
        out["kind"].append(kind)
        out["target"].append(target)
        out["commit"].append(commit)
    return out


def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _text(v):
    return None if v is None else (v if isinstance(v, str) else canonical_json(v).decode())


def add_provenance_row(out: dict[str, list], oid: ObjectId, prov: dict) -> None:
    code_dirty = _get(prov, "code", "dirty")
    values = {
        "commit": oid,
        "base_model": _text(_get(prov, "base_model", "name")),
        "base_model_revision": _text(_get(prov, "base_model", "revision")),
        "base_model_path": _text(_get(prov, "base_model", "path")),
        "base_model_fingerprint": _text(_get(prov, "base_model", "fingerprint", "digest")),
        "fingerprint_mode": _text(_get(prov, "base_model", "fingerprint", "mode")),
        "dataset_uri": _text(_get(prov, "dataset", "uri")),
        "dataset_digest": _text(_get(prov, "dataset", "content", "digest")),
        "peft_type": _text(_get(prov, "adapter", "peft_type")),
        "code_commit": _text(_get(prov, "code", "git_commit")),
        "code_dirty": code_dirty if isinstance(code_dirty, bool) else None,
        "python": _text(_get(prov, "environment", "python")),
        "torch": _text(_get(prov, "environment", "torch")),
        "peft": _text(_get(prov, "environment", "peft")),
        "transformers": _text(_get(prov, "environment", "transformers")),
        "json": canonical_json(prov).decode(),
    }
    for k, v in values.items():
        out[k].append(v)


def add_snapshot_rows(snaps: dict[str, list], tensors: dict[str, list], sid: ObjectId, snapshot) -> None:
    n_tensors = 0
    total = 0
    for f in snapshot.files:
        total += f.size
        for t in f.tensors:
            n_tensors += 1
            tensors["snapshot"].append(sid)
            tensors["path"].append(f.path)
            tensors["name"].append(t.name)
            tensors["dtype"].append(t.dtype)
            tensors["shape"].append(list(t.shape))
            tensors["nbytes"].append(math.prod(t.shape) * DTYPE_SIZES.get(t.dtype, 0))
            tensors["blob"].append(t.blob)
    snaps["id"].append(sid)
    snaps["files"].append(len(snapshot.files))
    snaps["tensors"].append(n_tensors)
    snaps["bytes"].append(total)


def add_eval_rows(out: dict[str, list], reg, commit: ObjectId, chain: str, pos: int) -> None:
    for seq, info in enumerate(load_evals(reg.store, EvalLists(reg.ah_dir), commit)):
        r = info.record
        out["id"].append(info.id)
        out["commit"].append(commit)
        out["seq"].append(seq)
        out["metric"].append(r.metric)
        out["value"].append(r.value)
        out["suite"].append(r.suite)
        out["dataset"].append(r.dataset)
        out["evaluator"].append(r.evaluator)
        out["timestamp"].append(r.timestamp)
        out["details"].append(canonical_json(r.details).decode())
        out["chain"].append(chain)
        out["pos"].append(pos)


def add_parent_rows(out: dict[str, list], oid: ObjectId, parents) -> None:
    for i, p in enumerate(parents):
        out["commit"].append(oid)
        out["parent"].append(p)
        out["position"].append(i)


# Coarse file-system clocks tick every few ms; a change within this window of taking a
# signature could leave every stat unchanged, so such a signature is not trusted.
RACY_NS = 100_000_000


def refs_signature(reg) -> str | None:
    """A cheap stand-in for `refs_state(reg).digest`: stats, not contents.

    Every ref update renames a file into a refs folder (changing that folder's mtime),
    or replaces HEAD or packed-refs by rename (a new inode). So if HEAD, packed-refs and
    every folder under refs/ have the same (inode, size, mtime_ns) as when the digest was
    recorded, no ref moved. Like git's racy-clean rule, a signature taken when some stat
    was younger than RACY_NS is useless (None): the caller falls back to the digest.
    """
    now = time.time_ns()
    parts = []
    newest = 0
    paths = [reg.ah_dir / "HEAD", reg.ah_dir / "packed-refs"]
    stack = [reg.ah_dir / "refs"]
    while stack:
        d = stack.pop()
        paths.append(d)
        try:
            with os.scandir(d) as it:
                stack.extend(Path(e.path) for e in it if e.is_dir(follow_symlinks=False))
        except (FileNotFoundError, NotADirectoryError):
            pass
    for p in sorted(paths):
        try:
            st = os.stat(p)
        except FileNotFoundError:
            parts.append(f"{p.name}:-")
            continue
        newest = max(newest, st.st_mtime_ns, st.st_ctime_ns)
        parts.append(f"{p.relative_to(reg.ah_dir)}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}")
    if now - newest < RACY_NS:
        return None
    return blake3.blake3("\n".join(parts).encode()).hexdigest()
