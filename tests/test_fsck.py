"""`ah fsck`: a sound registry passes; each kind of damage is found under its stable id,
on the copy that holds it, with exit code 1 (warnings alone exit 0); fsck never writes."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from pathlib import Path

import pytest

from adapterhub.fsck import FINDINGS, check_registry, list_loose
from adapterhub.gc import collect_garbage
from adapterhub.importer import import_folders
from adapterhub.objects import COMMIT, canonical_json
from adapterhub.pack import Pack, pack_paths
from adapterhub.registry import Registry
from conftest import run_ah
from test_encoding import write_checkpoint

OLD = time.time() - 3 * 3600


def _history(tmp_path: Path, steps: int = 4) -> tuple[Registry, list[str]]:
    """A registry with `steps` revisions of a small checkpoint on main (tensors stored as
    deltas against the previous revision's) and one on a second branch."""
    reg = Registry.init(tmp_path / "reg")
    ids = []
    for step in range(steps):
        ids.append(reg.commit(write_checkpoint(tmp_path / f"ck{step}", step), f"step {step}").id)
    reg.commit(write_checkpoint(tmp_path / "side", 7), "side", branch="side")
    return reg, ids


def _packed(reg: Registry) -> Pack:
    """gc everything into one pack; that pack."""
    collect_garbage(reg.ah_dir, reg.store, reg.refs, grace_s=0)
    (idx,) = pack_paths(reg.ah_dir / "objects" / "pack")
    return Pack(idx)


def _tensors(reg: Registry, commit: str) -> list[str]:
    snap = reg.store.get_snapshot(reg.store.get_commit(commit).snapshot)
    return [t.blob for f in snap.files for t in f.tensors]


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x40
    os.chmod(path, 0o644)
    path.write_bytes(bytes(data))


def _loose_path(reg: Registry, oid: str) -> Path:
    return reg.ah_dir / "objects" / oid[:2] / oid[2:]


def _fsck(reg: Registry, *extra: str) -> tuple[int, dict, str]:
    rc, out, err = run_ah("--registry", reg.root, "fsck", "--format", "json", *extra)
    return rc, json.loads(out), err


def _ids(report: dict) -> list[tuple[str, str]]:
    return sorted((f["id"], f["object"]) for f in report["findings"])


def _tree(root: Path) -> dict[str, tuple[int, str]]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for fn in files:
            p = Path(dirpath) / fn
            out[str(p.relative_to(root))] = (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def test_a_sound_registry_passes_loose_and_packed(tmp_path):
    reg, ids = _history(tmp_path)
    rc, out, err = run_ah("--registry", reg.root, "fsck")
    assert rc == 0, err
    assert err == ""
    (summary,) = out.splitlines()
    assert summary.startswith("checked ") and "0 errors, 0 warnings" in summary
    rc, report, _ = _fsck(reg)
    assert rc == 0 and report["ok"] is True and report["findings"] == []
    n = report["objects_checked"]
    assert n == report["copies_checked"] == report["reachable"] > 4 * len(ids)
    assert report["unreachable"] == 0 and report["refs"] == 2
    _packed(reg).close()
    rc, report, _ = _fsck(reg)
    assert rc == 0 and report["findings"] == [] and report["packs"] == 1
    assert report["objects_checked"] == n


def test_flipped_byte_in_a_loose_object(tmp_path):
    reg, ids = _history(tmp_path)
    tensor = _tensors(reg, ids[-1])[0]
    path = _loose_path(reg, tensor)
    _flip(path, path.stat().st_size - 3)
    rc, out, err = run_ah("--registry", reg.root, "fsck")
    assert rc == 1
    lines = out.splitlines()
    assert any(line.startswith(f"error: object-corrupt {tensor} (loose): ") for line in lines), out
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "Traceback" not in err
    rc, report, _ = _fsck(reg)
    assert rc == 1 and report["ok"] is False
    assert ("object-corrupt", tensor) in _ids(report)
    (f,) = [f for f in report["findings"] if f["object"] == tensor]
    assert f["severity"] == "error" and f["where"] == "loose"


def test_damaged_delta_base_names_root_cause_and_dependents_apart(tmp_path):
    reg, ids = _history(tmp_path, steps=4)
    pack = _packed(reg)
    base = _tensors(reg, ids[0])[0]  # the first revision's tensor: later ones are deltas on it
    offset, length = pack.location(pack.find(base))
    pack.close()
    _flip(pack.path, offset + length - 2)
    rc, report, _ = _fsck(reg)
    assert rc == 1
    found = _ids(report)
    assert ("object-corrupt", base) in found
    assert ("pack-checksum", pack.path.name) in found
    (root,) = [f for f in report["findings"] if f["id"] == "object-corrupt"]
    assert root["where"] == pack.path.name
    dependents = [f for f in report["findings"] if f["id"] == "delta-base-corrupt"]
    assert dependents, found
    assert all(base in f["message"] and f["object"] != base for f in dependents)


def test_truncated_pack(tmp_path):
    reg, ids = _history(tmp_path)
    pack = _packed(reg)
    pack.close()
    with open(pack.path, "r+b") as fh:
        fh.truncate(pack.path.stat().st_size - 100)
    rc, report, _ = _fsck(reg)
    assert rc == 1
    found = _ids(report)
    assert ("pack-corrupt", pack.idx_path.name) in found
    # Everything lived in that pack: the refs now name nothing readable.
    assert ("ref-dangling", "refs/heads/main") in found
    assert all(f["id"] in ("pack-corrupt", "ref-dangling") for f in report["findings"]), found


def test_damaged_pack_index(tmp_path):
    reg, ids = _history(tmp_path)
    pack = _packed(reg)
    first = pack.entry(0).oid
    lengths_at = 24 + 1024 + pack.count * (32 + 4)  # version 2: head, fan-out, ids, offsets
    pack.close()
    # Entry 0's record length, 64 short (64 long would take in the next record's first
    # bytes, which a record's decoder may never read: the content still hashes right).
    data = bytearray(pack.idx_path.read_bytes())
    length = struct.unpack_from("<I", data, lengths_at)[0]
    assert length > 64
    struct.pack_into("<I", data, lengths_at, length - 64)
    os.chmod(pack.idx_path, 0o644)
    pack.idx_path.write_bytes(bytes(data))
    rc, report, _ = _fsck(reg)
    assert rc == 1
    found = {(f["id"], f["object"], f["where"]) for f in report["findings"]}
    assert ("index-checksum", pack.idx_path.name, None) in found
    assert ("object-corrupt", first, pack.path.name) in found
    # Only the index is damaged: the pack's own checksum still matches.
    assert not any(f["id"] == "pack-checksum" for f in report["findings"])
    # A damaged index whose copy of the pack checksum no longer matches the pack: the
    # pack cannot be opened at all.
    struct.pack_into("<I", data, lengths_at, length)
    pack.idx_path.write_bytes(bytes(data))
    _flip(pack.idx_path, pack.idx_path.stat().st_size - 40)
    rc, report, _ = _fsck(reg)
    assert rc == 1
    assert ("pack-corrupt", pack.idx_path.name) in _ids(report)


def test_damaged_snapshot_is_reported_once_where_it_lies(tmp_path):
    reg, ids = _history(tmp_path)
    snap = reg.store.get_commit(ids[1]).snapshot
    path = _loose_path(reg, snap)
    _flip(path, path.stat().st_size - 2)
    rc, report, _ = _fsck(reg)
    assert rc == 1
    assert [(f["id"], f["object"], f["where"]) for f in report["findings"]] == [("object-corrupt", snap, "loose")]


def _commit_like(reg: Registry, commit: str, **changes) -> str:
    """Store a commit object like `commit` with fields changed (any content: ids still hash)."""
    body = json.loads(reg.store.read(commit)[1])
    body.update(changes)
    return reg.store.put(COMMIT, canonical_json(body))


def test_malformed_commit_wrong_type_and_bad_eval_list(tmp_path):
    reg, ids = _history(tmp_path)
    malformed = _commit_like(reg, ids[0], parents="not a list")
    blob = _tensors(reg, ids[0])[0]
    odd = _commit_like(reg, ids[0], snapshot=blob, message="snapshot is a tensor")
    reg.refs.update("refs/heads/malformed", malformed)
    reg.refs.update("refs/heads/odd", odd)
    evals = reg.ah_dir / "evals" / ids[1][:2] / ids[1][2:]
    evals.parent.mkdir(parents=True, exist_ok=True)
    evals.write_text("not an eval list\n")
    rc, report, _ = _fsck(reg)
    assert rc == 1
    assert _ids(report) == sorted([
        ("object-malformed", malformed),
        ("wrong-type", blob),
        ("eval-list-corrupt", ids[1]),
    ]), _ids(report)


def test_imported_registry_and_a_damaged_compression_dictionary(tmp_path):
    """`ah import` stores commits and snapshots compressed with a shared dictionary blob
    (encoding 5): sound, it passes; damaged, it is the root cause, its users dependents."""
    reg = Registry.init(tmp_path / "reg")
    folders = _import_adapters(tmp_path / "in", 24)
    import_folders(reg.ah_dir, reg.store, reg.refs, folders, workers=1)
    rc, report, _ = _fsck(reg)
    assert rc == 0 and report["findings"] == [], report["findings"]
    assert report["reachable"] == report["objects_checked"]
    commit = reg.refs.read("refs/heads/user000")
    (dictionary,) = reg.store.dependencies_of(commit)
    (idx,) = pack_paths(reg.ah_dir / "objects" / "pack")
    pack = Pack(idx)
    offset, length = pack.location(pack.find(dictionary))
    pack.close()
    _flip(pack.path, offset + length - 2)
    rc, report, _ = _fsck(reg)
    assert rc == 1
    by_id = {}
    for f in report["findings"]:
        by_id.setdefault(f["id"], []).append(f["object"])
    assert by_id["object-corrupt"] == [dictionary]
    assert commit in by_id["delta-base-corrupt"] and len(by_id["delta-base-corrupt"]) >= 24
    assert set(by_id) == {"object-corrupt", "delta-base-corrupt", "pack-checksum"}, by_id.keys()


def _import_adapters(root: Path, n: int) -> list[Path]:
    import numpy as np
    from safetensors.numpy import save_file

    out = []
    for i in range(n):
        d = root / f"user{i:03d}"
        d.mkdir(parents=True)
        rng = np.random.default_rng(i)
        save_file({"q.lora_A.weight": (rng.standard_normal((4, 32)) * 0.02).astype(np.float32)},
                  str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "base_model_name_or_path": "tiny"}))
        out.append(d)
    return out


def test_missing_snapshot_reachable_from_a_branch(tmp_path):
    reg, ids = _history(tmp_path)
    snap = reg.store.get_commit(ids[1]).snapshot
    _loose_path(reg, snap).unlink()
    rc, report, _ = _fsck(reg)
    assert rc == 1
    assert ("object-missing", snap) in _ids(report)


def test_missing_delta_base(tmp_path):
    reg, ids = _history(tmp_path)
    base = _tensors(reg, ids[0])[0]
    dependent = _tensors(reg, ids[1])[0]
    assert reg.store.delta_base_of(dependent) == base
    _loose_path(reg, base).unlink()
    rc, report, _ = _fsck(reg)
    assert rc == 1
    (f,) = [f for f in report["findings"] if f["object"] == dependent]
    assert f["id"] == "delta-base-missing" and base in f["message"] and f["where"] == "loose"


def test_ref_to_a_missing_commit_and_to_a_non_commit(tmp_path):
    reg, ids = _history(tmp_path)
    ghost = "ab" * 32
    (reg.ah_dir / "refs" / "heads" / "ghost").write_text(ghost + "\n")
    snap = reg.store.get_commit(ids[0]).snapshot
    (reg.ah_dir / "refs" / "tags" / "snap").write_text(snap + "\n")
    rc, report, _ = _fsck(reg)
    assert rc == 1
    found = _ids(report)
    assert ("ref-dangling", "refs/heads/ghost") in found
    assert ("ref-wrong-type", "refs/tags/snap") in found
    # The walk still follows the snapshot the tag names: nothing else is reported.
    assert len(found) == 2, found


def test_packed_ref_and_detached_head_are_checked(tmp_path):
    reg, ids = _history(tmp_path)
    reg.refs.pack_refs()
    assert not (reg.ah_dir / "refs" / "heads" / "main").exists()
    (reg.ah_dir / "HEAD").write_text("cd" * 32 + "\n")
    rc, report, _ = _fsck(reg)
    assert rc == 1
    assert _ids(report) == [("ref-dangling", "HEAD")]
    assert report["refs"] == 2
    (reg.ah_dir / "HEAD").write_text("garbage\n")
    rc, report, _ = _fsck(reg)
    assert rc == 1 and _ids(report) == [("head-broken", "HEAD")]


def test_damaged_in_one_copy_sound_in_another(tmp_path):
    reg, ids = _history(tmp_path)
    pack = _packed(reg)
    tensor = _tensors(reg, ids[-1])[1]
    commit = ids[2]
    # A bad loose copy beside the sound packed one...
    record = bytearray(pack.read_record(tensor))
    record[-2] ^= 0x40
    path = _loose_path(reg, tensor)
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(bytes(record))
    # ... and a sound loose copy beside a damaged packed one.
    offset, length = pack.location(pack.find(commit))
    _loose_path(reg, commit).parent.mkdir(exist_ok=True)
    _loose_path(reg, commit).write_bytes(pack.record_at(commit, offset, length))
    pack.close()
    _flip(pack.path, offset + length - 2)
    rc, report, _ = _fsck(reg)
    assert rc == 1
    bad = {(f["id"], f["object"], f["where"]) for f in report["findings"]}
    assert bad == {
        ("object-corrupt", tensor, "loose"),
        ("object-corrupt", commit, pack.path.name),
        ("pack-checksum", pack.path.name, None),
    }
    assert report["copies_checked"] == report["objects_checked"] + 2
    # The walk went on through the sound copy: all history is still reachable.
    assert report["reachable"] == report["objects_checked"] and report["unreachable"] == 0


def test_leftover_temp_files_and_stale_locks_are_warnings(tmp_path):
    reg, _ids_ = _history(tmp_path)
    tmp = reg.ah_dir / "objects" / "pack" / ".tmp-dead.pack"
    tmp.write_bytes(b"AHPK")
    lock = reg.ah_dir / "refs" / "heads" / "main.lock"
    lock.write_text("")
    young = reg.ah_dir / "objects" / ".tmp-writing"
    young.write_bytes(b"x")
    orphan = reg.ah_dir / "objects" / "pack" / ("pack-" + "ef" * 32 + ".pack")
    orphan.write_bytes(b"AHPK")
    for p in (tmp, lock, orphan):
        os.utime(p, (OLD, OLD))
    rc, out, err = run_ah("--registry", reg.root, "fsck")
    assert rc == 0, err
    assert "warning: temp-file objects/pack/.tmp-dead.pack: " in out
    assert "warning: stale-lock refs/heads/main.lock: " in out
    rc, report, _ = _fsck(reg)
    assert rc == 0 and report["ok"] is True
    assert _ids(report) == [
        ("orphan-pack", f"objects/pack/{orphan.name}"),
        ("stale-lock", "refs/heads/main.lock"),
        ("temp-file", "objects/pack/.tmp-dead.pack"),
    ]
    assert all(f["severity"] == "warning" for f in report["findings"])
    assert report["in_progress"] == 1  # the young temp file: a writer at work


def test_unreachable_objects_are_counted_not_reported(tmp_path):
    reg, ids = _history(tmp_path)
    reg.refs.delete("refs/heads/side")
    rc, report, _ = _fsck(reg)
    assert rc == 0 and report["findings"] == []
    assert report["unreachable"] > 0
    assert report["reachable"] + report["unreachable"] == report["objects_checked"]


def test_fsck_never_writes(tmp_path):
    reg, ids = _history(tmp_path)
    pack = _packed(reg)
    pack.close()
    reg.commit(write_checkpoint(tmp_path / "more", 9), "loose one")
    _flip(pack.path, 40)
    (reg.ah_dir / "objects" / ".tmp-old").write_bytes(b"x")
    os.utime(reg.ah_dir / "objects" / ".tmp-old", (OLD, OLD))
    before = _tree(reg.ah_dir)
    rc, _report, _ = _fsck(reg)
    assert rc == 1
    assert _tree(reg.ah_dir) == before


@pytest.mark.parametrize("meanwhile", ["commit-in-a-pack", "commit-loose", "gc"])
def test_writers_between_listing_and_ref_read_are_not_damage(tmp_path, monkeypatch, meanwhile):
    """fsck takes no lock: a commit that lands after the objects were listed (its ref then
    names objects fsck never listed) or a gc that packs loose objects and removes old
    packs meanwhile must not be reported as missing or damaged."""
    import adapterhub.fsck as fsck
    import adapterhub.packstore as packstore

    reg, ids = _history(tmp_path)
    if meanwhile == "gc":
        _packed(reg).close()
        reg.commit(write_checkpoint(tmp_path / "loose", 11), "loose again")
    if meanwhile == "commit-in-a-pack":
        monkeypatch.setattr(packstore, "BATCH_PACK_MIN_OBJECTS", 1)
    roots = fsck._Checker.roots

    def write_then_roots(self):
        other = Registry.open(reg.root)
        if meanwhile == "gc":
            collect_garbage(other.ah_dir, other.store, other.refs, grace_s=0)
        else:
            other.commit(write_checkpoint(tmp_path / "late", 12), "landed during fsck")
        return roots(self)

    monkeypatch.setattr(fsck._Checker, "roots", write_then_roots)
    result = check_registry(reg.ah_dir, reg.ah_dir / "objects", reg.refs)
    assert result.findings == [] and result.ok


def test_library_result_matches_json_and_ids_are_documented(tmp_path):
    reg, ids = _history(tmp_path)
    _loose_path(reg, reg.store.get_commit(ids[0]).snapshot).unlink()
    result = check_registry(reg.ah_dir, reg.ah_dir / "objects", reg.refs)
    rc, report, _ = _fsck(reg)
    assert rc == 1
    assert [f.id for f in result.findings] == [f["id"] for f in report["findings"]]
    assert report["objects_checked"] == result.objects_checked
    guide = (Path(__file__).resolve().parents[1] / "docs" / "user-guide.md").read_text()
    for kind, (severity, _what) in FINDINGS.items():
        assert f"`{kind}`" in guide, kind
        assert severity in ("error", "warning")


def test_progress_counts_every_copy_once(tmp_path):
    reg, _ids_ = _history(tmp_path, steps=3)
    _packed(reg).close()
    reg.commit(write_checkpoint(tmp_path / "loose", 9), "loose")
    totals, steps = [], []
    result = check_registry(reg.ah_dir, reg.ah_dir / "objects", reg.refs, progress_total=totals.append,
                            progress=steps.append)
    assert result.ok
    assert totals == [result.copies_checked] and sum(steps) == result.copies_checked


def test_usage_errors(tmp_path):
    rc, out, err = run_ah("--registry", tmp_path / "nothing", "fsck")
    assert rc == 2 and out == ""
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    reg, _ = _history(tmp_path)
    rc, out, err = run_ah("--registry", reg.root, "fsck", "--format", "xml")
    assert rc == 2 and err.startswith("error: ")


def test_damaged_first_name_of_packed_refs_is_reported(tmp_path):
    """One flipped bit in the first packed name ("refs/heads/main" -> "rdfs/heads/main") hid
    every ref of the first restart block from a listing under refs/: fsck said nothing and
    counted their history unreachable. It reads every record (RefStore.packed_all)."""
    reg, ids = _history(tmp_path, steps=3)
    for i in range(20):
        reg.refs.update(f"refs/heads/users/u{i:03d}", ids[2])
    reg.refs.pack_refs()
    path = reg.ah_dir / "packed-refs"
    data = bytearray(path.read_bytes())
    data[data.index(b"refs/heads/main") + 1] ^= 0x01
    path.write_bytes(bytes(data))
    rc, report, _ = _fsck(reg)
    assert rc == 1
    (f,) = [f for f in report["findings"] if f["id"] == "ref-corrupt"]
    assert f["object"] == "packed-refs" and "unknown" in f["message"] and "unreachable" in f["message"]
    # Nothing is said about HEAD: the branch it names may be among the unknown ones.
    assert {f["id"] for f in report["findings"]} == {"ref-corrupt"}, _ids(report)
    # The refs a listing still finds past the damaged first block are checked.
    assert 0 < report["refs"] < 22 and report["reachable"] > 0


def test_packed_refs_that_cannot_be_read_is_a_finding(tmp_path):
    reg, ids = _history(tmp_path)
    (reg.ah_dir / "packed-refs").mkdir()
    rc, report, _ = _fsck(reg)
    assert rc == 1
    assert ("ref-corrupt", "packed-refs") in _ids(report)


def test_head_naming_a_missing_branch_beside_others_is_a_warning(tmp_path):
    """The branch HEAD names was lost (its ref file gone, its reflog still there)."""
    reg, ids = _history(tmp_path)
    (reg.ah_dir / "refs" / "heads" / "main").unlink()
    rc, report, _ = _fsck(reg)
    assert rc == 0 and report["ok"] is True
    assert [(f["id"], f["object"], f["severity"]) for f in report["findings"]] == [("head-unborn", "HEAD", "warning")]
    # Unborn without a reflog (as `ah import` leaves a new registry): nothing to say.
    (reg.ah_dir / "HEAD").write_text("ref: refs/heads/nonexistent\n")
    rc, report, _ = _fsck(reg)
    assert rc == 0 and report["findings"] == []
    # A new registry: HEAD names main, which no commit made yet, and no branch exists.
    fresh = Registry.init(tmp_path / "fresh")
    rc, report, _ = _fsck(fresh)
    assert rc == 0 and report["findings"] == []


def test_objects_of_the_wrong_type_are_named_with_what_names_them(tmp_path):
    """A commit's parents must be commits, a snapshot's tensor entries tensors and its file
    blobs blobs, an eval list's entries evals that parse: each wrong one is reported with
    the object that names it (checkout, log and eval list all fail on them)."""
    from adapterhub.evals import EvalLists
    from adapterhub.objects import EVAL, SNAPSHOT

    reg, ids = _history(tmp_path)
    snap_id = reg.store.get_commit(ids[3]).snapshot
    tensor = _tensors(reg, ids[0])[0]
    on_snapshot = _commit_like(reg, ids[3], parents=[snap_id], message="parent is a snapshot")
    on_tensor = _commit_like(reg, ids[3], parents=[tensor], message="parent is a tensor")
    snap = json.loads(reg.store.read(snap_id)[1])
    entry = [f for f in snap["files"] if f["kind"] == "safetensors"][0]
    entry["tensors"][0]["blob"] = ids[0]  # a commit where a tensor should be
    entry["tensors"][1]["blob"] = entry["blob"]  # the header blob where a tensor should be
    odd_snap = reg.store.put(SNAPSHOT, canonical_json(snap))
    odd_files = _commit_like(reg, ids[3], snapshot=odd_snap, message="odd tensors")
    for name, oid in (("a", on_snapshot), ("b", on_tensor), ("c", odd_files)):
        reg.refs.update(f"refs/heads/{name}", oid)
    bad_eval = reg.store.put(EVAL, b'{"not": "an eval record"}')
    EvalLists(reg.ah_dir).append(ids[2], [bad_eval, _tensors(reg, ids[1])[0]])
    rc, report, _ = _fsck(reg)
    assert rc == 1
    found = {(f["id"], f["object"]): f["message"] for f in report["findings"]}
    assert set(found) == {
        ("wrong-type", snap_id), ("wrong-type", tensor), ("wrong-type", ids[0]), ("wrong-type", entry["blob"]),
        ("wrong-type", _tensors(reg, ids[1])[0]), ("object-malformed", bad_eval),
    }, sorted(found)
    assert found[("wrong-type", snap_id)] == f"commit {on_snapshot} names it as a parent, but it is a snapshot"
    assert found[("wrong-type", tensor)] == f"commit {on_tensor} names it as a parent, but it is a tensor"
    assert found[("wrong-type", ids[0])].startswith(f"snapshot {odd_snap} names it as tensor ")
    assert found[("wrong-type", ids[0])].endswith(", but it is a commit")
    assert found[("wrong-type", entry["blob"])].endswith(", but it is a blob")
    assert found[("wrong-type", _tensors(reg, ids[1])[0])] == (
        f"the eval list of commit {ids[2]} names it as an eval, but it is a tensor")
    assert found[("object-malformed", bad_eval)].startswith("eval: ")


def test_odd_entries_in_the_store_are_findings_not_crashes(tmp_path):
    """Names that are no object file under objects/ are stray-file warnings; a folder where
    an object file, a pack index or packed-refs belongs is a finding on that entry, and
    the run goes on to its report."""
    reg, ids = _history(tmp_path)
    objects = reg.ah_dir / "objects"
    (objects / "zz").mkdir()
    (objects / "zz" / ("q" * 62)).write_bytes(b"junk")
    (objects / ids[0][:2]).mkdir(exist_ok=True)
    (objects / ids[0][:2] / ("g" * 62)).write_bytes(b"junk")
    (objects / ids[0][:2] / ("A" * 62)).write_bytes(b"junk")
    tensor = _tensors(reg, ids[-1])[0]
    _loose_path(reg, tensor).unlink()
    _loose_path(reg, tensor).mkdir()
    rc, report, err = _fsck(reg)
    assert rc == 1 and "Traceback" not in err
    assert _ids(report) == sorted([
        ("stray-file", f"objects/zz/{'q' * 62}"),
        ("stray-file", f"objects/{ids[0][:2]}/{'g' * 62}"),
        ("stray-file", f"objects/{ids[0][:2]}/{'A' * 62}"),
        ("object-corrupt", tensor),
    ]), _ids(report)
    assert all(f["severity"] == "warning" for f in report["findings"] if f["id"] == "stray-file")

    reg2, _ = _history(tmp_path / "two")
    _packed(reg2).close()
    idx_dir = reg2.ah_dir / "objects" / "pack" / ("pack-" + "ab" * 32 + ".idx")
    idx_dir.mkdir()
    (reg2.ah_dir / "objects" / "cd").write_bytes(b"x")
    rc, report, err = _fsck(reg2)
    assert rc == 1 and "Traceback" not in err
    assert _ids(report) == [("pack-corrupt", idx_dir.name), ("stray-file", "objects/cd")], _ids(report)


@pytest.mark.parametrize("damage", ["garbage", "folder"])
def test_a_damaged_eval_list_does_not_hide_the_history_behind_it(tmp_path, damage):
    """The walk goes on through the commit's parents after its eval list fails (fsck
    passes reach.walk an error callback); gc, without one, still prunes nothing."""
    reg, ids = _history(tmp_path)
    evals = reg.ah_dir / "evals" / ids[3][:2] / ids[3][2:]
    evals.parent.mkdir(parents=True, exist_ok=True)
    if damage == "garbage":
        evals.write_text("garbage\n")
    else:
        evals.mkdir()
    snap0 = reg.store.get_commit(ids[0]).snapshot
    _loose_path(reg, snap0).unlink()
    rc, report, err = _fsck(reg)
    assert rc == 1 and "Traceback" not in err
    assert _ids(report) == sorted([("eval-list-corrupt", ids[3]), ("object-missing", snap0)]), _ids(report)
    if damage == "garbage":
        reg.refs.delete("refs/heads/side")  # unreachable now: gc would prune it, were it not stopped
        before = list_loose(reg.ah_dir / "objects")[0]
        result = collect_garbage(reg.ah_dir, reg.store, reg.refs, grace_s=0)
        assert ids[3] in result.missing
        store = Registry.open(reg.root).store
        assert all(store.has(oid) for oid in before)  # nothing pruned


def test_many_packs_are_searched_once_per_lookup_not_once_per_pack(tmp_path, monkeypatch):
    """A store of one pack per commit (big commits, imports): every lookup went through
    every pack (1,200 packs: 8.5 s, 7 million searches); one id column over all packs
    answers each with one search."""
    import adapterhub.packstore as packstore

    monkeypatch.setattr(packstore, "BATCH_PACK_MIN_OBJECTS", 1)
    reg = Registry.init(tmp_path / "reg")
    for i in range(30):
        reg.commit(write_checkpoint(tmp_path / f"ck{i}", i), f"c{i}", branch=f"b{i % 5}")
    packs = pack_paths(reg.ah_dir / "objects" / "pack")
    assert len(packs) == 30
    calls = []
    find = Pack.find
    monkeypatch.setattr(Pack, "find", lambda self, oid: calls.append(oid) or find(self, oid))
    result = check_registry(reg.ah_dir, reg.ah_dir / "objects", reg.refs)
    assert result.ok and result.findings == [] and result.packs == 30
    assert len(calls) <= 2 * result.objects_checked, (len(calls), result.objects_checked)


def test_delta_chains_are_decoded_once_not_once_per_level(tmp_path, monkeypatch):
    """The base cache is grown to hold a few revisions of the largest adapter: with its
    fixed budget, a tensor over a quarter of it never entered, and each revision was
    decoded through its whole chain again (16 revisions of a 20 MB tensor: 136 decodes).
    Here the budget is made small and the tensor big against it."""
    import numpy as np
    from safetensors.numpy import save_file

    import adapterhub.packstore as packstore
    import adapterhub.store as store_mod

    monkeypatch.setattr(packstore, "BATCH_PACK_MIN_OBJECTS", 1)  # a pack per commit, oldest first
    reg = Registry.init(tmp_path / "reg")
    rng = np.random.default_rng(0)
    a = rng.standard_normal((128, 256)).astype(np.float32)
    revisions = 8
    for step in range(revisions):
        folder = tmp_path / f"ck{step}"
        folder.mkdir()
        a = a + np.float32(1e-4) * rng.standard_normal(a.shape).astype(np.float32)
        save_file({"w": a}, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text("{}")
        reg.commit(folder, f"s{step}")
    monkeypatch.setattr(store_mod.BaseCache.__init__, "__defaults__", (256 << 10,))
    decodes = []
    kernels = store_mod.kernels
    for name in ("read_tensors", "read_tensors_start"):
        native = getattr(kernels, name)
        if native is not None:
            monkeypatch.setattr(kernels, name, lambda jobs, threads, native=native: (
                decodes.extend(j[0] for j in jobs), native(jobs, threads))[1])
    verified = store_mod.ObjectStore._read_verified

    def counted(self, oid, *args, **kwargs):
        out = verified(self, oid, *args, **kwargs)
        if out[0] == "tensor":
            decodes.append(oid)
        return out

    monkeypatch.setattr(store_mod.ObjectStore, "_read_verified", counted)
    result = check_registry(reg.ah_dir, reg.ah_dir / "objects", reg.refs)
    assert result.ok and result.findings == []
    assert len(set(decodes)) == revisions
    assert len(decodes) <= 2 * revisions, len(decodes)  # a chain per level would be 36


def test_temp_file_messages_say_who_removes_them(tmp_path):
    """gc cleans temp files only in objects/pack/ and objects/<xx>/: the warning says so
    there, and "safe to delete" anywhere else (gc never removes those)."""
    reg, ids = _history(tmp_path)
    places = {
        ".tmp-config": False, "objects/.tmp-a": False, "refs/heads/.tmp-b": False,
        f"objects/{ids[0][:2]}/.tmp-c": True, "objects/pack/.tmp-d.pack": True,
    }
    for rel in places:
        path = reg.ah_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        os.utime(path, (OLD, OLD))
    rc, report, _ = _fsck(reg)
    assert rc == 0
    messages = {f["object"]: f["message"] for f in report["findings"] if f["id"] == "temp-file"}
    assert set(messages) == set(places)
    for rel, by_gc in places.items():
        assert ("`ah gc` removes it" in messages[rel]) is by_gc, (rel, messages[rel])
        assert ("safe to delete" in messages[rel]) is not by_gc, (rel, messages[rel])
    collect_garbage(reg.ah_dir, reg.store, reg.refs, grace_s=0)
    assert {rel for rel in places if (reg.ah_dir / rel).exists()} == {rel for rel, by_gc in places.items() if not by_gc}


def test_a_ref_read_after_the_relisting_is_checked_against_a_new_listing(tmp_path, monkeypatch):
    """stored_now lists the store again once: a detached-HEAD commit that lands right after
    that relisting (HEAD is read last) named objects no listing had seen. A ref found
    dangling is checked once more against a listing made after every ref was read."""
    import adapterhub.fsck as fsck
    import adapterhub.packstore as packstore

    monkeypatch.setattr(packstore, "BATCH_PACK_MIN_OBJECTS", 1)  # commits land in new packs
    reg, ids = _history(tmp_path)
    (reg.ah_dir / "HEAD").write_text(ids[1] + "\n")  # detached
    roots = fsck._Checker.roots

    def roots_then_commit(self):
        out = roots(self)
        Registry.open(reg.root).commit(write_checkpoint(tmp_path / "late", 21), "on a branch", branch="late")
        return out

    stored_now = fsck._Checker.stored_now
    calls = []

    def stored_now_then_head_commit(self, oid):
        found = stored_now(self, oid)
        if not calls:
            calls.append(oid)
            Registry.open(reg.root).commit(write_checkpoint(tmp_path / "late2", 22), "detached HEAD commit")
        return found

    monkeypatch.setattr(fsck._Checker, "roots", roots_then_commit)
    monkeypatch.setattr(fsck._Checker, "stored_now", stored_now_then_head_commit)
    result = check_registry(reg.ah_dir, reg.ah_dir / "objects", reg.refs)
    assert calls and result.findings == [] and result.ok


@pytest.mark.parametrize("damage", ["loose-ref", "packed-refs"])
def test_head_naming_a_damaged_ref_reports_the_ref_only(tmp_path, damage):
    """HEAD itself is sound when the ref it names is damaged: only ref-corrupt."""
    reg, ids = _history(tmp_path)
    if damage == "loose-ref":
        (reg.ah_dir / "refs" / "heads" / "main").write_text("garbage\n")
        expected = [("ref-corrupt", "refs/heads/main")]
    else:
        reg.refs.pack_refs()
        (reg.ah_dir / "packed-refs").write_bytes(b"garbage\n")
        expected = [("ref-corrupt", "packed-refs")]
    rc, report, _ = _fsck(reg)
    assert rc == 1
    assert _ids(report) == expected


def test_loose_ref_files_with_invalid_names_are_warnings(tmp_path):
    """No command reads such a file as a ref (RefStore.read takes it for none), so what it
    names is not kept by gc: fsck says so instead of skipping it silently."""
    reg, ids = _history(tmp_path)
    bad = ["refs/heads/a..b", "refs/heads/x y", "refs/heads/.hidden", "refs/heads/z~1"]
    for name in bad:
        (reg.ah_dir / name).write_text(ids[0] + "\n")
    rc, report, _ = _fsck(reg)
    assert rc == 0
    assert _ids(report) == sorted(("ref-bad-name", name) for name in bad)
    assert all(f["severity"] == "warning" for f in report["findings"])
    assert report["refs"] == 2


def test_dependency_lookups_read_record_heads_only(tmp_path, monkeypatch):
    """The walk asks every reachable object's dependencies: from its records' first
    RECORD_HEAD_MAX bytes, not whole records (a 32 MB tensor was copied to read 20 bytes)."""
    from adapterhub import codec
    from adapterhub.fsck import _Listed
    from adapterhub.store import LooseObjectStore

    reg, ids = _history(tmp_path)
    base, dependent = _tensors(reg, ids[0])[0], _tensors(reg, ids[1])[0]
    _packed(reg).close()
    reg.commit(write_checkpoint(tmp_path / "loose", 9), "a loose one")
    loose_dependent = _tensors(reg, reg.refs.read("refs/heads/main"))[0]
    reads = []
    read = LooseObjectStore._read_record
    monkeypatch.setattr(LooseObjectStore, "_read_record", lambda self, oid, limit=-1: reads.append(limit) or read(self, oid, limit))
    listed = _Listed(reg.ah_dir / "objects")
    try:
        assert listed.dependencies_of(dependent) == (base,)
        assert listed.dependencies_of(loose_dependent)
        assert all(len(r) <= codec.RECORD_HEAD_MAX for _, r in listed.copies(dependent, codec.RECORD_HEAD_MAX))
    finally:
        listed.close()
    assert reads and all(limit == codec.RECORD_HEAD_MAX for limit in reads), reads


def test_snapshot_entries_are_typed_from_the_parsed_snapshot_whatever_keys_it_carries(tmp_path):
    """A snapshot may carry keys a reader ignores (a later format's): its entries are taken
    from the parse, not matched in its text, which missed a tensor entry with an extra key
    and read a fake entry under an unknown top-level key as one (helper-25)."""
    from adapterhub.objects import SNAPSHOT

    reg, ids = _history(tmp_path)
    snap_id = reg.store.get_commit(ids[3]).snapshot

    def crafted(branch: str, mutate) -> None:
        snap = json.loads(reg.store.read(snap_id)[1])
        entry = [f for f in snap["files"] if f["kind"] == "safetensors"][0]
        mutate(snap, entry)
        reg.refs.update(f"refs/heads/{branch}",
                        _commit_like(reg, ids[3], snapshot=reg.store.put(SNAPSHOT, canonical_json(snap)), message=branch))

    def extra_key_on_a_wrong_entry(snap, entry):
        entry["tensors"][0]["blob"], entry["tensors"][0]["c"] = entry["blob"], 1

    def fake_entry_under_an_unknown_key(snap, entry):
        snap["x"] = [{"blob": entry["blob"], "dtype": "F32"}]

    header_blob = [f for f in json.loads(reg.store.read(snap_id)[1])["files"] if f["kind"] == "safetensors"][0]["blob"]
    crafted("extra", extra_key_on_a_wrong_entry)
    rc, report, _ = _fsck(reg)
    assert rc == 1 and [(f["id"], f["object"]) for f in report["findings"]] == [("wrong-type", header_blob)]
    reg.refs.delete("refs/heads/extra")
    crafted("fake", fake_entry_under_an_unknown_key)
    rc, report, _ = _fsck(reg)
    assert rc == 0 and report["findings"] == [], report["findings"]


def test_entries_beside_the_fan_out_folders_and_in_pack_are_stray(tmp_path):
    reg, ids = _history(tmp_path)
    collect_garbage(reg.ah_dir, reg.store, reg.refs)
    objects = reg.ah_dir / "objects"
    (objects / "README").write_text("x")
    (objects / "abc").mkdir()
    (objects / "abc" / ("0" * 62)).write_text("x")
    (objects / "pack" / "notes.txt").write_text("x")
    rc, report, _ = _fsck(reg)
    assert rc == 0
    assert _ids(report) == sorted([("stray-file", "objects/README"), ("stray-file", "objects/abc"),
                                   ("stray-file", "objects/pack/notes.txt")]), _ids(report)


def _cache_runs(reg: Registry, monkeypatch) -> tuple[list[int], object]:
    """fsck `reg`; (the sizes the base cache was reserved for, the run's cache)."""
    import adapterhub.fsck as fsck_mod
    import adapterhub.store as store_mod

    reserved: list[int] = []
    reserve = store_mod.BaseCache.reserve
    monkeypatch.setattr(store_mod.BaseCache, "reserve", lambda self, n: (reserved.append(n), reserve(self, n))[1])
    caches = []
    close = fsck_mod._Listed.close
    monkeypatch.setattr(fsck_mod._Listed, "close", lambda self: (caches.append(self.base_cache), close(self))[1])
    result = check_registry(reg.ah_dir, reg.ah_dir / "objects", reg.refs)
    assert result.ok and result.findings == []
    return reserved, caches[0]


def test_the_base_cache_is_grown_only_when_the_store_holds_deltas(tmp_path, monkeypatch):
    """Without a delta no decoded tensor is looked up again: the cache is not grown to
    hold adapters for nothing (6 adapters of 64 MB: 532 -> 708 MiB peak), nor does it
    keep what was checked. A reachable delta grows it before the copy check, an
    unreachable one when the copy check meets it."""
    import numpy as np
    from safetensors.numpy import save_file

    reg = Registry.init(tmp_path / "reg")
    for i in range(3):  # different random tensors, each a branch's first commit: nothing to delta against
        folder = tmp_path / f"a{i}"
        folder.mkdir()
        rng = np.random.default_rng(i)
        save_file({"w": rng.standard_normal((64, 256)).astype(np.float32)}, str(folder / "adapter_model.safetensors"))
        reg.commit(folder, f"a{i}", branch=f"b{i}")
    reserved, cache = _cache_runs(reg, monkeypatch)
    assert reserved == [] and cache.max_bytes == 0 and len(cache._items) == 0

    reg, _ = _history(tmp_path / "deltas")  # revisions stored as deltas, reachable
    reserved, cache = _cache_runs(reg, monkeypatch)
    assert len(reserved) == 1 and cache.max_bytes >= 64 << 20

    for name in ("refs/heads/main", "refs/heads/side"):  # the same deltas, none reachable
        reg.refs.delete(name)
    reserved, cache = _cache_runs(reg, monkeypatch)
    assert len(reserved) == 1 and cache.max_bytes >= 64 << 20


def test_the_id_column_over_all_packs_finds_every_copy(tmp_path, monkeypatch):
    """_Listed's one sorted column over every pack (sorted in place, fan-out by the first
    two bytes): each packed id is found in every pack that holds it, oldest first, and
    the stored ids count each id once, loose ones too."""
    import adapterhub.packstore as packstore
    from adapterhub.fsck import _Listed

    monkeypatch.setattr(packstore, "BATCH_PACK_MIN_OBJECTS", 1)  # a pack per commit
    reg = Registry.init(tmp_path / "reg")
    for i in range(5):
        reg.commit(write_checkpoint(tmp_path / f"ck{i}", i), f"c{i}", branch=f"b{i % 2}")
    pack_dir = reg.ah_dir / "objects" / "pack"
    first = min(pack_paths(pack_dir), key=lambda p: p.stat().st_mtime_ns)
    for suffix in (".pack", ".idx"):  # a second copy of every object of the oldest pack, in the newest
        copy = pack_dir / ("pack-" + "f" * 40 + suffix)
        copy.write_bytes(first.with_suffix(suffix).read_bytes())
        os.utime(copy, ns=(time.time_ns() + 10**9,) * 2)
    monkeypatch.setattr(packstore, "BATCH_PACK_MIN_OBJECTS", 1 << 30)
    reg.commit(write_checkpoint(tmp_path / "loose", 9), "loose")
    listed = _Listed(reg.ah_dir / "objects")
    try:
        assert len(listed.packs) == 6 and listed.packs[-1].path.name.startswith("pack-fff")
        where: dict[str, list[tuple[int, int]]] = {}
        for n, pack in enumerate(listed.packs):
            for i, key in enumerate(pack.id_array().tolist()):
                where.setdefault(key.ljust(32, b"\0").hex(), []).append((n, i))
        assert any(len(v) > 1 for v in where.values())
        for oid, copies in where.items():
            assert listed.locate(oid) == copies
            assert listed.find_prefix(oid[:6]) == sorted(o for o in where if o.startswith(oid[:6]))
        assert listed.locate("ff" * 32) == [] and listed.locate("00" * 32) == []
        stored = listed.stored()
        assert len(stored) == len(set(where) | listed.loose_ids) > len(where)
        assert all(oid in stored for oid in listed.loose_ids)
    finally:
        listed.close()


def test_idset_take_sorts_dedupes_and_empties_the_buffer():
    from adapterhub.reach import IdSet

    a, b = bytes([1]) * 32, bytes([2]) * 32
    for raw, want in ((b + a + b, [a, b]), (a, [a]), (b"", [])):
        buf = bytearray(raw)
        ids = IdSet.take(buf)
        assert ids.array.tolist() == want and len(buf) == 0
        assert IdSet.build([raw]).array.tolist() == want
