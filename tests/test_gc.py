"""`ah gc` and `ah stats`: repack, prune with a grace period, and never lose reachable data
(concurrent commits, a gc killed with SIGKILL, missing objects, a second gc)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adapterhub.gc import GcRunning, collect_garbage, gc_lock
from adapterhub.objects import COMMIT, Commit
from adapterhub.packstore import PackedObjectStore
from adapterhub.reach import ref_roots, walk
from adapterhub.registry import Registry
from adapterhub.refs import HEADS
from adapterhub.stats import store_stats
from conftest import run_ah
from test_encoding import write_checkpoint

OLD = time.time() - 30 * 86400


def _age_everything(reg: Registry, when: float = OLD) -> None:
    for dirpath, _dirs, files in os.walk(reg.ah_dir / "objects"):
        for f in files:
            os.utime(Path(dirpath) / f, (when, when))


def _loose_count(reg: Registry) -> int:
    return sum(1 for _ in reg.store.loose.iter_ids())


def _assert_all_reachable_readable(reg: Registry, tmp_path: Path) -> None:
    """Every ref's history decodes and checks out byte for byte (re-hashing everything)."""
    store = PackedObjectStore(reg.ah_dir / "objects")
    reach = walk(store, ref_roots(reg.refs), reg.ah_dir)
    assert not reach.missing, f"reachable objects lost: {sorted(reach.missing)[:3]}"
    for oid in reach.ids:
        store.read(oid)
    fresh = Registry.open(reg.root)
    for i, b in enumerate(fresh.branches()):
        out = tmp_path / f"verify-{time.monotonic_ns()}-{i}"
        fresh.checkout(b.commit, out)


def _history(tmp_path: Path, steps: int = 5, branch: str | None = None, reg: Registry | None = None):
    reg = reg or Registry.init(tmp_path / "reg")
    ids = []
    for step in range(steps):
        folder = write_checkpoint(tmp_path / f"ck-{branch}-{step}", step)
        ids.append(reg.commit(folder, f"step {step}", branch=branch).id)
    return reg, ids


def _gc(reg: Registry, grace_s: float = 0):
    return collect_garbage(reg.ah_dir, reg.store, reg.refs, grace_s=grace_s)


def test_gc_packs_reachable_objects_and_keeps_history(tmp_path):
    reg, ids = _history(tmp_path)
    loose_before = _loose_count(reg)
    result = _gc(reg)
    assert result.packed == result.reachable == loose_before
    assert result.pruned == 0 and _loose_count(reg) == 0
    assert len(reg.store.packs()) == 1 and result.pack.endswith(".idx")
    # Same records, plus the index (fan-out table and 40 bytes per object) and framing:
    # index header 24 + checksums 64, pack header 8 + trailer 40.
    assert result.stored_after <= result.stored_before + 1024 + 40 * result.packed + 136
    _assert_all_reachable_readable(reg, tmp_path)
    # A second gc over a fully packed store changes nothing (the pack is not even
    # rewritten) and loses nothing.
    (pack_before,) = reg.store.packs()
    mtime = os.stat(pack_before.path).st_mtime_ns
    again = _gc(reg)
    assert again.packed == result.packed and again.pruned == 0 and len(reg.store.packs()) == 1
    assert again.pack == result.pack and os.stat(pack_before.path).st_mtime_ns == mtime
    _assert_all_reachable_readable(reg, tmp_path)


def test_unreachable_objects_are_pruned_only_after_the_grace_period(tmp_path):
    reg, _ = _history(tmp_path, 3)
    _, side = _history(tmp_path, 2, branch="side", reg=reg)
    side_only = walk(reg.store, [side[-1]]).ids - walk(reg.store, [reg.resolve("main")]).ids
    reg.delete_branch("side")
    # Young unreachable objects survive a gc with the default 14-day grace period...
    result = _gc(reg, grace_s=14 * 86400)
    assert result.pruned == 0 and result.kept_recent == len(side_only)
    assert all(reg.store.has(o) for o in side_only)
    # ...including after they were packed into an old pack: they come out loose, still aging.
    _age_everything(reg)
    result = _gc(reg, grace_s=14 * 86400)
    assert result.pruned == len(side_only) and result.kept_recent == 0
    assert not any(PackedObjectStore(reg.ah_dir / "objects").has(o) for o in side_only)
    _assert_all_reachable_readable(reg, tmp_path)


def test_recent_unreachable_objects_in_an_old_pack_are_kept_loose(tmp_path):
    reg, _ = _history(tmp_path, 2)
    _, side = _history(tmp_path, 2, branch="side", reg=reg)
    _gc(reg)  # everything (side included) into one pack
    side_only = walk(reg.store, [side[-1]]).ids - walk(reg.store, [reg.resolve("main")]).ids
    reg.delete_branch("side")
    result = _gc(reg, grace_s=3600)  # the pack is seconds old: its unreachable objects are young
    assert result.kept_recent == len(side_only) and result.pruned == 0
    assert all(reg.store.loose.has(o) for o in side_only)


def test_delta_bases_of_reachable_tensors_survive_when_their_commit_does_not(tmp_path):
    reg, ids = _history(tmp_path, 3)
    tip = reg.store.get_commit(ids[-1])
    # A root commit with the tip's snapshot: the tip's tensors (deltas against the older
    # commits' tensors) stay reachable while the older commits do not.
    orphan = Commit(tip.snapshot, (), tip.author, tip.timestamp + 1, "re-rooted", tip.provenance)
    oid = reg.store.put(COMMIT, orphan.serialize())
    reg.refs.update(HEADS + "rerooted", oid, expected=None)
    reg.switch("rerooted")
    reg.delete_branch("main")
    bases = {reg.store.delta_base_of(t) for t in walk(reg.store, [oid], want_leaves=True).leaves} - {None}
    assert bases, "the test needs delta-stored tensors"
    _age_everything(reg)
    result = _gc(reg)
    assert result.pruned > 0  # the old commits and snapshots went
    assert not reg.store.has(ids[0])
    _assert_all_reachable_readable(reg, tmp_path)


class _RacingStore(PackedObjectStore):
    """Runs `during` once, right after gc has marked and listed (as a concurrent writer would)."""

    during = None

    def writer(self, **kw):
        if self.during is not None:
            hook, self.during = self.during, None
            hook()
        return super().writer(**kw)


def test_concurrent_commit_during_gc_reusing_old_unreachable_objects(tmp_path):
    reg, _ = _history(tmp_path, 1)
    folder = write_checkpoint(tmp_path / "reused", 7)
    reg.commit(folder, "to be orphaned", branch="gone")
    reg.delete_branch("gone")
    _age_everything(reg)  # its objects are old and unreachable: prunable...
    racing = Registry(reg.root, store=_RacingStore(reg.ah_dir / "objects"))
    writer = Registry.open(reg.root)
    made = []
    # ...but a commit of the same folder lands while gc runs, reusing every one of them.
    racing.store.during = lambda: made.append(writer.commit(folder, "same content, new branch", branch="again").id)
    collect_garbage(racing.ah_dir, racing.store, racing.refs, grace_s=0)
    assert made
    _assert_all_reachable_readable(reg, tmp_path)
    assert Registry.open(reg.root).resolve("again") == made[0]


def test_concurrent_commits_from_another_process(tmp_path):
    reg, _ = _history(tmp_path, 2)
    folders = [write_checkpoint(tmp_path / f"live{i}", 20 + i) for i in range(6)]
    for _round in range(2):
        _age_everything(reg)
        gc = subprocess.Popen([sys.executable, "-m", "adapterhub.cli.main", "--registry", str(reg.root), "gc", "--prune", "now"])
        for i, f in enumerate(folders):
            Registry.open(reg.root).commit(f, f"live {i}", branch=f"live/{_round}/{i}")
        assert gc.wait(timeout=120) == 0
        _assert_all_reachable_readable(reg, tmp_path)


def _many_tensor_commit(reg: Registry, folder: Path, n: int, branch: str, seed: int) -> None:
    """One commit with `n` small tensors: `n` loose objects in one step."""
    import numpy as np
    from safetensors.numpy import save_file

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    save_file({f"t{i}": rng.standard_normal(16).astype(np.float32) for i in range(n)}, str(folder / "adapter_model.safetensors"))
    reg.commit(folder, f"{n} tensors", branch=branch)


def _pack_files(reg: Registry) -> list[str]:
    folder = reg.ah_dir / "objects" / "pack"
    return sorted(os.listdir(folder)) if folder.is_dir() else []


def test_gc_killed_midway_loses_nothing(tmp_path):
    """SIGKILL gc at each of its phases (found by watching the files it writes and removes)."""
    reg, _ = _history(tmp_path, 4)
    _many_tensor_commit(reg, tmp_path / "big", 1500, "big", 1)
    _many_tensor_commit(reg, tmp_path / "doomed", 1500, "doomed", 2)
    reg.delete_branch("doomed")
    _age_everything(reg)
    cmd = [sys.executable, "-m", "adapterhub.cli.main", "--registry", str(reg.root), "gc", "--prune", "now"]
    phases = {
        "writing the pack": lambda n0, p0: any(f.startswith(".tmp-") for f in _pack_files(reg)),
        "pack complete": lambda n0, p0: len([f for f in _pack_files(reg) if f.endswith(".idx")]) > p0,
        "removing loose objects": lambda n0, p0: _loose_count(reg) < n0 * 0.6,
        "late removal": lambda n0, p0: _loose_count(reg) < n0 * 0.1,
    }
    killed = []
    for round_no in range(1):
        for name, reached in phases.items():
            _many_tensor_commit(reg, tmp_path / f"more-{round_no}-{name}", 600, f"more/{round_no}/{len(killed)}", 3 + len(killed))
            _age_everything(reg)
            n0 = _loose_count(reg)
            p0 = len([f for f in _pack_files(reg) if f.endswith(".idx")])
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 60
            while proc.poll() is None and not reached(n0, p0) and time.monotonic() < deadline:
                time.sleep(0.0005)
            proc.send_signal(signal.SIGKILL)
            if proc.wait() == -signal.SIGKILL:
                killed.append(name)
            _assert_all_reachable_readable(reg, tmp_path)
    assert len(killed) >= 3, killed  # most phases were really interrupted
    rc, out, err = run_ah("--registry", reg.root, "gc", "--prune", "now")
    assert rc == 0, err
    _assert_all_reachable_readable(reg, tmp_path)
    assert _loose_count(Registry.open(reg.root)) == 0 and len(_pack_files(reg)) == 2


def test_a_stale_packed_refs_lock_leaves_refs_loose_and_gc_succeeds(tmp_path):
    """A gc (or import) killed while folding refs leaves packed-refs.lock behind: the next
    gc still packs and prunes objects, leaves the refs loose and says why."""
    reg, ids = _history(tmp_path, 3)
    reg.create_branch("side", ids[0])
    lock = reg.ah_dir / "packed-refs.lock"
    lock.write_text("")
    _age_everything(reg)
    result = _gc(reg)
    assert result.packed == result.reachable > 0 and _loose_count(reg) == 0
    assert "packed-refs" in result.refs_not_packed and lock.exists()
    assert (reg.ah_dir / "refs" / "heads" / "side").exists()  # still loose, still read
    assert reg.resolve("side") == ids[0] and reg.resolve("main") == ids[-1]
    rc, out, err = run_ah("--registry", reg.root, "gc", "--prune", "now")
    assert rc == 0 and "warning: refs were left loose" in err and "packed-refs.lock" in err
    lock.unlink()
    result = _gc(reg)
    assert result.refs_not_packed is None and not (reg.ah_dir / "refs" / "heads" / "side").exists()
    assert reg.resolve("side") == ids[0]


def test_gc_keeps_a_pack_it_cannot_open_and_prunes_nothing(tmp_path):
    """A truncated pack is left out of the store: gc must neither remove it (what is left of
    it may still be salvaged) nor prune anything while reachable objects are unreadable."""
    reg, ids = _history(tmp_path, 3)
    _gc(reg)
    (idx,) = list((reg.ah_dir / "objects" / "pack").glob("*.idx"))
    pack = idx.with_suffix(".pack")
    pack.chmod(0o644)
    os.truncate(pack, pack.stat().st_size // 2)
    reg.commit(write_checkpoint(tmp_path / "after", 9), "after the damage")  # lands, whole
    reg.commit(write_checkpoint(tmp_path / "doomed", 8), "doomed", branch="doomed")
    reg.delete_branch("doomed")
    _age_everything(reg)
    result = _gc(Registry.open(reg.root))
    assert result.missing and result.pruned == 0
    assert idx.exists() and pack.exists()
    rc, out, err = run_ah("--registry", reg.root, "gc", "--prune", "now")
    assert rc == 0 and "missing or damaged" in err and idx.exists() and pack.exists()


def test_second_gc_is_refused_while_one_runs(tmp_path):
    reg, _ = _history(tmp_path, 1)
    with gc_lock(reg.ah_dir):
        with pytest.raises(GcRunning, match="another gc is running"):
            _gc(reg)
        rc, out, err = run_ah("--registry", reg.root, "gc")
        assert rc == 1 and err.startswith("error: another gc is running")
    assert _gc(reg).packed > 0  # the lock is free again


def test_missing_reachable_object_stops_pruning(tmp_path):
    reg, ids = _history(tmp_path, 2)
    reg.commit(write_checkpoint(tmp_path / "orphan", 9), "orphan", branch="orphan")
    reg.delete_branch("orphan")
    snap = reg.store.get_commit(ids[0]).snapshot
    reg.store.remove(snap)
    _age_everything(reg)
    result = _gc(reg)
    assert snap in result.missing and result.pruned == 0
    rc, out, err = run_ah("--registry", reg.root, "gc", "--prune", "now")
    assert rc == 0 and "missing or damaged" in err


def test_bad_prune_age_is_a_usage_error(tmp_path):
    reg, _ = _history(tmp_path, 1)
    rc, out, err = run_ah("--registry", reg.root, "gc", "--prune", "soon")
    assert rc == 2 and err.startswith("error: --prune expects a duration")


def test_stats_adds_up(tmp_path):
    reg, ids = _history(tmp_path, 4)
    reg.create_branch("copy", ids[1])
    s = store_stats(reg.ah_dir, reg.store, reg.refs)
    assert s.revisions == 4 and s.packs == 0 and s.loose_objects == s.objects
    sizes = [sum(f.size for f in reg.show(c).snapshot.files) for c in ids]
    assert s.revision_bytes == sum(sizes)
    assert s.dedup_savings > 0  # the config file and safetensors headers are shared
    assert s.logical_bytes > s.stored_bytes and s.ratio > 1
    _gc(reg)
    rc, out, err = run_ah("--registry", reg.root, "stats", "--format", "json")
    assert rc == 0, err
    after = json.loads(out)
    assert after["packs"] == 1 and after["loose_objects"] == 0 and after["objects"] == s.objects
    assert after["logical_bytes"] == s.logical_bytes and after["revision_bytes"] == s.revision_bytes
    rc, out, err = run_ah("--registry", reg.root, "stats")
    assert rc == 0 and "dedup savings" in out and "stored bytes" in out


def test_id_sets_are_exact_for_ids_ending_in_zero_bytes():
    """numpy `S32` strips trailing NULs from elements: membership must still be exact."""
    import os as _os

    from adapterhub.reach import IdSet

    # Bases end in a non-zero byte, so no tricky variant below can equal its own base.
    base = [_os.urandom(31) + b"\x01" for _ in range(200)]
    tricky = [b[:28] + b"\0" * 4 for b in base[:50]] + [b[:31] + b"\0" for b in base[50:100]]
    inside = IdSet.build([b"".join(base + tricky)])
    assert len(inside) == 300
    outside = [b[:28] + b"\0\0\0\1" for b in base[:50]] + [b"\0" * 32]
    for key in base + tricky:
        assert inside.has_key(key) and key.hex() in inside
    for key in outside:
        assert not inside.has_key(key) and key.hex() not in inside
    assert sorted(inside) == sorted(k.hex() for k in base + tricky)
    import numpy as np

    probe = np.frombuffer(b"".join(tricky + outside), dtype="S32")
    assert inside.mask(probe).tolist() == [True] * len(tricky) + [False] * len(outside)


def test_files_under_objects_whose_names_are_not_ids_are_left_alone(tmp_path):
    """A 62-character name that is not hex (helper-23: gc and stats crashed on fromhex),
    an upper-case copy of an id, and a folder that is no fan-out are no objects: gc,
    stats and log go on and leave them where they are."""
    reg = Registry.init(tmp_path / "reg")
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    commit = reg.commit(folder, "one").id
    objects = reg.ah_dir / "objects"
    stray = [objects / commit[:2] / ("z" * 62), objects / commit[:2] / commit[2:].upper(), objects / "zz" / ("a" * 62)]
    for path in stray:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"not an object")
    _age_everything(reg)
    for args in (["stats"], ["gc", "--prune", "now"], ["log"]):
        rc, out, err = run_ah("--registry", reg.root, *args)
        assert rc == 0, (args, err)
    assert all(path.read_bytes() == b"not an object" for path in stray)
    assert Registry.open(reg.root).resolve("HEAD") == commit
