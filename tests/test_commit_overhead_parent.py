"""A Registry reuses the snapshot of its own last commit as the next commit's delta bases
(instead of reading and parsing it back): the commits must be exactly those a fresh
Registry per commit makes, and a commit made meanwhile by someone else must be the base."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import save_file

from adapterhub.registry import Registry
from conftest import run_ah


def _checkpoint(folder, step: int):
    rng = np.random.default_rng(0)
    w = rng.standard_normal(8192).astype(np.float32) * 0.02
    w += np.float32(1e-4) * step  # small steps: each revision is stored as a delta
    folder.mkdir(parents=True)
    save_file({"layer.lora_A.weight": w.reshape(64, -1), "layer.lora_B.weight": (w[::-1] * 2).reshape(-1, 64)},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    return folder


def _tensor_bases(reg, commit_id):
    snap = reg.store.get_snapshot(reg.store.get_commit(commit_id).snapshot)
    return {t.name: (t.blob, reg.store.delta_base_of(t.blob)) for f in snap.files for t in f.tensors}


@pytest.fixture(autouse=True)
def _pinned(monkeypatch):
    monkeypatch.setenv("AH_AUTHOR", "T <t@e>")
    monkeypatch.setenv("AH_COMMIT_TIME", "1700000000")


def test_a_kept_registry_commits_what_a_fresh_one_per_commit_does(tmp_path):
    folders = [_checkpoint(tmp_path / f"ck{i}", i) for i in range(4)]
    kept = Registry.init(tmp_path / "kept")
    Registry.init(tmp_path / "fresh")
    kept_ids = [kept.commit(f, f"step {i}").id for i, f in enumerate(folders)]
    fresh_ids = [Registry.open(tmp_path / "fresh").commit(f, f"step {i}").id for i, f in enumerate(folders)]
    assert kept_ids == fresh_ids
    fresh = Registry.open(tmp_path / "fresh")
    for i, c in enumerate(kept_ids):
        bases = _tensor_bases(kept, c)
        assert bases == _tensor_bases(fresh, c)
        if i:  # every later revision is a delta against its parent's same-named tensor
            parent = _tensor_bases(kept, kept_ids[i - 1])
            assert all(base == parent[name][0] for name, (_, base) in bases.items())


def test_a_commit_made_meanwhile_by_another_registry_is_the_base(tmp_path):
    ours = Registry.init(tmp_path / "reg")
    first = ours.commit(_checkpoint(tmp_path / "ck0", 0), "ours").id
    theirs = Registry.open(tmp_path / "reg").commit(_checkpoint(tmp_path / "ck1", 1), "theirs").id
    third = ours.commit(_checkpoint(tmp_path / "ck2", 2), "ours again")
    assert third.parents == (theirs,)
    bases = _tensor_bases(ours, third.id)
    parent = _tensor_bases(ours, theirs)
    assert all(base == parent[name][0] for name, (_, base) in bases.items())
    assert all(base != blob for name, (_, base) in bases.items() for blob, _ in [_tensor_bases(ours, first)[name]])


def test_the_parent_is_not_read_back(tmp_path, monkeypatch):
    reg = Registry.init(tmp_path / "reg")
    reg.commit(_checkpoint(tmp_path / "ck0", 0), "one")

    def no_reads(*_a, **_k):
        raise AssertionError("the parent commit was read back from the store")

    monkeypatch.setattr(reg.store, "get_commit", no_reads)
    monkeypatch.setattr(reg.store, "get_snapshot", no_reads)
    assert len(reg.commit(_checkpoint(tmp_path / "ck1", 1), "two").parents) == 1


def test_a_fresh_registry_reads_its_delta_bases_in_one_batch_and_stores_the_same_records(tmp_path, monkeypatch):
    """`ah commit` runs in a new process each time: its base cache starts empty, and the
    parent's tensors are fetched by one batched read (every chain level at once), not
    decoded record by record; the records stored are those a warm registry stores."""
    from adapterhub.encoding import kernels
    from adapterhub.store import ObjectStore

    folders = [_checkpoint(tmp_path / f"ck{i}", i) for i in range(7)]
    kept = Registry.init(tmp_path / "kept")
    Registry.init(tmp_path / "fresh")
    kept_ids = [kept.commit(f, f"step {i}").id for i, f in enumerate(folders)]
    one_by_one = []
    real = ObjectStore._read_verified

    def counted(self, oid, *args, **kwargs):
        one_by_one.append(oid)
        return real(self, oid, *args, **kwargs)

    monkeypatch.setattr(ObjectStore, "_read_verified", counted)
    fresh_ids = []
    for i, f in enumerate(folders):
        one_by_one.clear()
        fresh_ids.append(Registry.open(tmp_path / "fresh").commit(f, f"step {i}").id)
        # the parent's commit and snapshot are read one by one; no tensor is (without the
        # native codec there is no batched read: every read is one by one)
        assert len(one_by_one) <= 2 or kernels.read_tensors is None, one_by_one
    assert fresh_ids == kept_ids
    fresh = Registry.open(tmp_path / "fresh")
    for c in kept_ids:
        for name, (blob, _) in _tensor_bases(kept, c).items():
            assert bytes(fresh.store._read_record(blob)) == bytes(kept.store._read_record(blob)), name


def _flip_a_byte_of(store, oid: str) -> None:
    """Damage an object's stored record in place, loose or in a pack."""
    pack = store._find_in_packs(oid)
    if pack is None:
        path, at = store.loose._path(oid), None
        at = path.stat().st_size // 2
    else:
        offset, length = pack.location(pack.find(oid))
        path, at = pack.path, offset + length // 2
    os.chmod(path, 0o644)
    with open(path, "r+b") as fh:
        fh.seek(at)
        byte = fh.read(1)
        fh.seek(at)
        fh.write(bytes([byte[0] ^ 0x5A]))


def test_a_damaged_parent_tensor_is_stored_around_not_a_failed_commit(tmp_path):
    """One bad object in the parent revision must not stop a training run's commits: the
    tensor is stored whole (no delta against the damage), the commit says to run fsck,
    and the next commits go on as deltas against the new, sound revision."""
    folders = [_checkpoint(tmp_path / f"ck{i}", i) for i in range(5)]
    reg = Registry.init(tmp_path / "reg")
    ids = [reg.commit(f, f"step {i}").id for i, f in enumerate(folders[:3])]
    name, (bad, _) = sorted(_tensor_bases(reg, ids[-1]).items())[0]
    _flip_a_byte_of(reg.store, bad)
    reg = Registry.open(tmp_path / "reg")  # a new process: the parent's tensors come from the store
    third = reg.commit(folders[3], "step 3")
    (warning,) = third.warnings
    assert "damaged" in warning and bad in warning and "ah fsck" in warning
    bases = _tensor_bases(reg, third.id)
    assert bases[name][1] is None  # stored whole
    assert all(base is not None for other, (_, base) in bases.items() if other != name)
    out = tmp_path / "out"
    reg.checkout(third.id, out)
    assert (out / "adapter_model.safetensors").read_bytes() == (folders[3] / "adapter_model.safetensors").read_bytes()
    fourth = reg.commit(folders[4], "step 4")
    assert fourth.warnings == ()
    assert _tensor_bases(reg, fourth.id)[name][1] == bases[name][0]  # a delta against the sound one


def test_a_parent_tensor_of_another_size_is_not_read_for_a_delta(tmp_path, monkeypatch):
    """A retrain at a lower rank keeps the names and dtype but not the sizes: the parent's
    tensors are no delta bases, so a commit must not read (decode) them at all."""
    from adapterhub.store import ObjectStore

    reg = Registry.init(tmp_path / "reg")
    big = tmp_path / "rank16"
    big.mkdir()
    rng = np.random.default_rng(1)
    save_file({"layer.lora_A.weight": rng.standard_normal((16, 256)).astype(np.float32)}, str(big / "adapter_model.safetensors"))
    reg.commit(big, "rank 16")
    small = tmp_path / "rank4"
    small.mkdir()
    save_file({"layer.lora_A.weight": rng.standard_normal((4, 256)).astype(np.float32)}, str(small / "adapter_model.safetensors"))
    read = []
    real = ObjectStore._read_verified
    monkeypatch.setattr(ObjectStore, "_read_verified", lambda self, oid, *a, **k: (read.append(oid), real(self, oid, *a, **k))[1])
    fresh = Registry.open(tmp_path / "reg")
    second = fresh.commit(small, "rank 4")
    assert len(read) == 2  # the parent's commit and snapshot only, no tensor
    (blob, base), = _tensor_bases(fresh, second.id).values()
    assert base is None


@pytest.mark.parametrize("what", ["commit", "snapshot"])
def test_a_parent_commit_or_snapshot_that_cannot_be_read_leaves_the_commit_whole(tmp_path, what):
    folders = [_checkpoint(tmp_path / f"ck{i}", i) for i in range(3)]
    reg = Registry.init(tmp_path / "reg")
    parent = [reg.commit(f, f"step {i}").id for i, f in enumerate(folders[:2])][-1]
    _flip_a_byte_of(reg.store, parent if what == "commit" else reg.store.get_commit(parent).snapshot)
    shutil.copytree(tmp_path / "reg", tmp_path / "copy")
    rc, out, err = run_ah("--registry", tmp_path / "copy", "commit", folders[2], "-m", "from the command line")
    assert rc == 0 and "warning: the parent revision cannot be read" in err and "ah fsck" in err
    fresh = Registry.open(tmp_path / "reg")
    third = fresh.commit(folders[2], "step 2")
    assert third.parents == (parent,) and len(third.warnings) == 1
    assert "cannot be read" in third.warnings[0] and "ah fsck" in third.warnings[0]
    assert all(base is None for _, base in _tensor_bases(fresh, third.id).values())
    fresh.checkout(third.id, tmp_path / "out")
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == \
        (folders[2] / "adapter_model.safetensors").read_bytes()


def test_a_base_cache_smaller_than_three_revisions_grows_and_no_base_is_read_back(tmp_path, monkeypatch):
    """A commit's working set is three revisions (its own tensors, its parent's bases and
    its grandparent's extrapolation sources). A budget below that, as the fixed 64 MB was
    for adapters over ~20 MB, evicted them and every commit decoded its bases back from
    the store; store_folder now reserves room for three revisions of the folder."""
    from adapterhub.store import ObjectStore

    folders = [_checkpoint(tmp_path / f"ck{i}", i) for i in range(5)]
    reg = Registry.init(tmp_path / "reg")
    reg.store.base_cache.max_bytes = 40_000  # below one revision's 64 kB of tensors
    reg.commit(folders[0], "step 0")
    reg.commit(folders[1], "step 1")
    read_back = []
    real = ObjectStore._read_verified
    monkeypatch.setattr(ObjectStore, "_read_verified",
                        lambda self, oid, *a, **k: (read_back.append(oid), real(self, oid, *a, **k))[1])
    for i in (2, 3, 4):
        reg.commit(folders[i], f"step {i}")
    assert read_back == []
    assert reg.store.base_cache.max_bytes >= 3 * (folders[0] / "adapter_model.safetensors").stat().st_size


def test_the_base_cache_budget_never_shrinks_and_stays_under_its_share_of_memory():
    from adapterhub.store import BaseCache, _memory_ceiling

    cache = BaseCache(max_bytes=1 << 20)
    cache.reserve(1 << 10)
    assert cache.max_bytes == 1 << 20
    cache.reserve(5 << 20)
    assert cache.max_bytes == 5 << 20
    cache.reserve(1 << 62)
    assert cache.max_bytes == _memory_ceiling() < 1 << 62


def test_the_base_cache_ceiling_follows_a_container_memory_limit(tmp_path, monkeypatch):
    from adapterhub import store

    limit = tmp_path / "memory.max"
    limit.write_text("1073741824\n")  # a 1 GiB container on a bigger machine
    monkeypatch.setattr(store, "_CGROUP_LIMITS", (str(tmp_path / "absent"), str(limit)))
    store._memory_ceiling.cache_clear()
    try:
        assert store._memory_ceiling() == int((1 << 30) * store.MAX_MEMORY_SHARE)
        limit.write_text("max\n")  # no limit: the machine's memory
        store._memory_ceiling.cache_clear()
        assert store._memory_ceiling() > int((1 << 30) * store.MAX_MEMORY_SHARE)
    finally:
        store._memory_ceiling.cache_clear()
