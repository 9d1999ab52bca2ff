"""One object stored twice with different bases, and a commit that failed midway.

Two writers (or a writer whose freshening lost its race with gc) can store the same
tensor twice, each copy a delta against a different base. Reads may get either copy and
gc may keep either, so nothing either copy needs may be pruned, and records that build
on the object must read back whichever copy a reader meets. A batch that fails must not
leave the base cache believing in records that were never written.
"""

from __future__ import annotations

import os
import time

import numpy as np
from safetensors.numpy import save_file

from adapterhub import codec
from adapterhub.gc import collect_garbage
from adapterhub.objects import TENSOR
from adapterhub.packstore import PackedObjectStore
from adapterhub.registry import Registry

MONTH = 30 * 24 * 3600


def _momentum(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    w, v = rng.standard_normal(8192) * 0.02, rng.standard_normal(8192) * 1e-4
    out = []
    for _ in range(n):
        w = w + v + rng.standard_normal(8192) * 1e-6
        out.append(w.astype(np.float32))
    return out


def _commit(reg: Registry, folder, arr: np.ndarray) -> str:
    folder.mkdir()
    save_file({"w": arr}, str(folder / "adapter_model.safetensors"))
    return reg.commit(folder, folder.name).id


def _tensor_of(reg: Registry, commit: str) -> str:
    return reg.store.get_snapshot(reg.store.get_commit(commit).snapshot).files[0].tensors[0].blob


def _age(store: PackedObjectStore, *oids: str) -> None:
    old = time.time() - MONTH
    for oid in oids:
        os.utime(store.loose._path(oid), (old, old))


def test_gc_keeps_what_every_stored_copy_needs(tmp_path, monkeypatch):
    monkeypatch.setenv("AH_AUTHOR", "T <t@e>")
    reg = Registry.init(tmp_path / "reg")
    rng = np.random.default_rng(1)
    a0 = rng.standard_normal(8192).astype(np.float32)
    a1 = (a0 + rng.standard_normal(8192).astype(np.float32) * 1e-3).astype(np.float32)
    for i, a in enumerate((a0, a1)):
        _commit(reg, tmp_path / f"ck{i}", a)
    collect_garbage(reg.ah_dir, reg.store, reg.refs)
    st = reg.store
    t = _tensor_of(reg, reg.resolve("main"))
    # A second, loose copy of T: a delta against Q, an old object nothing else reaches.
    q = st.put(TENSOR, (a1 + np.float32(1e-6)).astype(np.float32).tobytes(), dtype="F32")
    st.loose._write_record(t, st.encode_record(t, TENSOR, a1.tobytes(), dtype="F32", delta_base=q))
    packed_base = codec.delta_ref(t, st.packs()[0].read_record(t)).base
    assert codec.delta_ref(t, st.loose._read_record(t)).base == q != packed_base
    assert set(st.dependencies_of(t)) == {packed_base, q}
    _age(st, q, t)
    result = collect_garbage(reg.ah_dir, Registry(reg.root).store, reg.refs)
    assert not result.missing
    fresh = Registry(reg.root).store
    assert fresh.read(t) == (TENSOR, a1.tobytes())
    assert fresh.has(q)  # still needed by a copy gc may have kept


def test_extrapolated_child_reads_whichever_copy_of_its_base_is_met(tmp_path, monkeypatch):
    monkeypatch.setenv("AH_AUTHOR", "T <t@e>")
    reg = Registry.init(tmp_path / "reg")
    arrs = _momentum(5)
    commits = [_commit(reg, tmp_path / f"ck{i}", arrs[i]) for i in range(3)]
    collect_garbage(reg.ah_dir, reg.store, reg.refs)
    st = Registry(reg.root).store
    t = _tensor_of(reg, commits[2])
    # A loose second copy of the tip tensor, stored whole (say, by a concurrent writer).
    st.loose._write_record(t, st.encode_record(t, TENSOR, arrs[2].tobytes(), dtype="F32"))
    x_commit = _commit(Registry(reg.root), tmp_path / "ck3", arrs[3])
    x = _tensor_of(reg, x_commit)
    assert Registry(reg.root).store._read_record(x)[4] == codec.ENC_EXTRAPOLATED
    for order in ("loose first", "packs first"):
        store = Registry(reg.root).store
        if order == "packs first":
            store.rescan()
        assert store.read(x) == (TENSOR, arrs[3].tobytes()), order
    _age(st, t)
    collect_garbage(reg.ah_dir, Registry(reg.root).store, reg.refs, grace_s=0)
    assert Registry(reg.root).store.read(x) == (TENSOR, arrs[3].tobytes())
    out = tmp_path / "co"
    Registry(reg.root).checkout(x_commit, out)
    assert (out / "adapter_model.safetensors").read_bytes() == (tmp_path / "ck3" / "adapter_model.safetensors").read_bytes()


def test_a_failed_batch_leaves_no_belief_behind(tmp_path):
    root = tmp_path / "objects"
    root.mkdir()
    st = PackedObjectStore(root, durable=False)
    ws = [a.tobytes() for a in _momentum(4)]
    a = st.put(TENSOR, ws[0], dtype="F32")
    b = st.put(TENSOR, ws[1], dtype="F32", delta_base=a)
    try:
        with st.batch():
            t = st.put(TENSOR, ws[2], dtype="F32", delta_base=b)
            raise RuntimeError("the commit failed midway")
    except RuntimeError:
        pass
    assert not st.has(t) and st.base_cache.get(t) is None
    assert st.put(TENSOR, ws[2], dtype="F32") == t  # stored again, whole this time
    x = st.put(TENSOR, ws[3], dtype="F32", delta_base=t)
    assert st.read(x) == (TENSOR, ws[3])
    assert PackedObjectStore(root, durable=False).read(x) == (TENSOR, ws[3])  # a fresh process


def _pack_sized_checkpoint(folder, rng):
    """A checkpoint of 20 small tensors: enough new objects for its commit to write a pack."""
    folder.mkdir()
    save_file({f"t{j}": rng.standard_normal(64).astype(np.float32) for j in range(20)},
              str(folder / "adapter_model.safetensors"))
    return folder


def test_commits_fold_their_packs_when_there_are_too_many(tmp_path, monkeypatch):
    """Each commit of 16+ objects writes a pack; past the limit a commit runs gc, which
    folds them into one (nothing is pruned: everything is young and reachable)."""
    import adapterhub.registry as registry_module

    monkeypatch.setenv("AH_AUTHOR", "T <t@e>")
    monkeypatch.setattr(registry_module, "AUTO_PACK_LIMIT", 3)
    reg = Registry.init(tmp_path / "reg")
    rng = np.random.default_rng(3)
    commits = []
    for i in range(5):
        commits.append(reg.commit(_pack_sized_checkpoint(tmp_path / f"ck{i}", rng), f"ck{i}").id)
        assert len(Registry(reg.root).store.packs()) <= 3
    for i, c in enumerate(commits):
        out = tmp_path / f"co{i}"
        Registry(reg.root).checkout(c, out)
        assert (out / "adapter_model.safetensors").read_bytes() == (tmp_path / f"ck{i}" / "adapter_model.safetensors").read_bytes()
    monkeypatch.setenv("AH_GC_AUTO", "0")
    for i in range(5, 9):
        reg.commit(_pack_sized_checkpoint(tmp_path / f"ck{i}", rng), f"ck{i}")
    assert len(Registry(reg.root).store.packs()) > 3


def test_a_big_registry_is_told_to_gc_rather_than_made_to_wait(tmp_path, monkeypatch):
    import adapterhub.registry as registry_module

    monkeypatch.setenv("AH_AUTHOR", "T <t@e>")
    monkeypatch.setattr(registry_module, "AUTO_PACK_LIMIT", 2)
    monkeypatch.setattr(registry_module, "AUTO_GC_MAX_OBJECTS", 10)
    reg = Registry.init(tmp_path / "reg")
    rng = np.random.default_rng(4)
    notices = []
    for i in range(4):
        notices.append(reg.commit(_pack_sized_checkpoint(tmp_path / f"ck{i}", rng), f"ck{i}").notice)
    assert notices[:2] == [None, None]
    assert all("run `ah gc`" in n for n in notices[2:])
    assert len(Registry(reg.root).store.packs()) == 4  # nothing was folded behind the user's back
