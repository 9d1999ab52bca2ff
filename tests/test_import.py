"""`ah import`: many adapter folders in one run, both cores, straight into packs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from adapterhub.errors import BadRefName, UsageError
from adapterhub.importer import ImportFailed, import_folders
from adapterhub.reach import ref_roots, walk
from adapterhub.registry import Registry
from conftest import run_ah, sha256_tree

SHARED = [(np.random.default_rng(s).standard_normal((4, 32)) * 0.02).astype(np.float32) for s in range(3)]


def _adapters(root: Path, n: int, seed: int = 0) -> list[Path]:
    out = []
    for i in range(n):
        d = root / f"user{i:03d}"
        d.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(seed * 1000 + i)
        save_file(
            {"q.lora_A.weight": SHARED[i % 3], "q.lora_B.weight": (rng.standard_normal((32, 4)) * 0.01).astype(np.float32)},
            str(d / "adapter_model.safetensors"),
        )
        (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "base_model_name_or_path": "tiny"}))
        out.append(d)
    return out


def _import(reg, folders, **kw):
    return import_folders(reg.ah_dir, reg.store, reg.refs, folders, **kw)


@pytest.mark.parametrize("workers", [1, 2])
def test_import_creates_a_branch_per_folder_in_packs(tmp_path, workers):
    reg = Registry.init(tmp_path / "reg")
    folders = _adapters(tmp_path / "in", 40)
    result = _import(reg, folders, prefix="users/", workers=workers)
    assert (result.adapters, result.created, result.updated, result.packs) == (40, 40, 0, 1)
    assert not list(reg.store.loose.iter_ids())  # nothing loose: all in the pack
    # Per adapter: commit, snapshot, its own lora_B; shared: 3 lora_A, 1 header layout, 1
    # config, and the dictionary the snapshots and commits are compressed with.
    assert result.objects_written == 40 * 3 + 3 + 1 + 1 + 1
    fresh = Registry.open(reg.root)
    assert len(fresh.branches()) == 40
    for f in folders[::13]:
        out = tmp_path / "out" / f.name
        fresh.checkout(f"users/{f.name}", out)
        assert sha256_tree(out) == sha256_tree(f)
    assert not walk(fresh.store, ref_roots(fresh.refs), fresh.ah_dir).missing


def test_reimport_moves_existing_branches_forward(tmp_path):
    reg = Registry.init(tmp_path / "reg")
    first = _import(reg, _adapters(tmp_path / "in", 20), workers=2)
    tips = {b.name: b.commit for b in Registry.open(reg.root).branches()}
    second = _import(reg, _adapters(tmp_path / "in", 20, seed=1), workers=2)
    assert first.created == 20 and (second.created, second.updated) == (0, 20)
    fresh = Registry.open(reg.root)
    for b in fresh.branches():
        assert fresh.commit_info(b.commit).parents == (tips[b.name],)


def test_bad_names_are_refused_before_any_work(tmp_path):
    reg = Registry.init(tmp_path / "reg")
    a = _adapters(tmp_path / "one", 1)[0]
    b = _adapters(tmp_path / "two", 1)[0]  # same folder name "user000"
    with pytest.raises(UsageError, match="both import into branch 'user000'"):
        _import(reg, [a, b])
    bad = tmp_path / "bad name"
    bad.mkdir()
    with pytest.raises(BadRefName):
        _import(reg, [bad])
    with pytest.raises(UsageError, match="is not a folder"):
        _import(reg, [tmp_path / "missing"])
    # Nothing was written: `init` makes objects/pack, and it is still empty.
    assert list((reg.ah_dir / "objects" / "pack").iterdir()) == []
    assert reg.branches() == []


def test_a_bad_folder_fails_the_import_and_moves_no_ref(tmp_path):
    reg = Registry.init(tmp_path / "reg")
    folders = _adapters(tmp_path / "in", 30)
    (folders[17] / "adapter_model.bin").write_bytes(b"\x80\x04junk")
    with pytest.raises(ImportFailed, match="user017.*pickle") as info:
        _import(reg, folders, workers=2)
    assert info.value.exit_code == 2
    assert Registry.open(reg.root).branches() == []
    rc, out, err = run_ah("--registry", reg.root, "import", *folders)
    assert rc == 2 and err.startswith("error: ") and "user017" in err and "Traceback" not in err


def test_cli_import(tmp_path):
    reg = Registry.init(tmp_path / "reg")
    folders = _adapters(tmp_path / "in", 25)
    rc, out, err = run_ah("--registry", reg.root, "import", "--prefix", "u/", "--format", "json", *folders)
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["adapters"] == 25 and doc["created"] == 25 and doc["rate"] > 0
    rc, out, err = run_ah("--registry", reg.root, "log", "--format", "json", "u/user024")
    assert rc == 0 and json.loads(out)[0]["message"] == "import user024"


def test_snapshots_and_commits_are_compressed_with_a_dictionary_gc_keeps(tmp_path):
    import os
    import time

    from adapterhub import codec
    from adapterhub.gc import collect_garbage

    reg = Registry.init(tmp_path / "reg")
    folders = _adapters(tmp_path / "in", 30)
    _import(reg, folders, workers=2)
    fresh = Registry.open(reg.root)
    tip = fresh.resolve("user029")
    snap = fresh.store.get_commit(tip).snapshot
    for oid in (tip, snap):
        assert fresh.store._read_record(oid)[4] == codec.ENC_DICT_PREFIX
    (dict_id,) = fresh.store.dependencies_of(tip)
    assert fresh.store.object_type(dict_id) == "blob" and fresh.store.dependencies_of(snap) == (dict_id,)
    # No ref names the dictionary: gc must keep it because the commits need it.
    old = time.time() - 30 * 86400
    for dirpath, _dirs, files in os.walk(reg.ah_dir / "objects"):
        for f in files:
            os.utime(os.path.join(dirpath, f), (old, old))
    result = collect_garbage(reg.ah_dir, fresh.store, fresh.refs, grace_s=0)
    assert result.pruned == 0
    again = Registry.open(reg.root)
    assert again.store.has(dict_id)
    out = tmp_path / "out"
    again.checkout("user029", out)
    assert sha256_tree(out) == sha256_tree(folders[29])


def test_encoding_3_record_whose_dictionary_is_missing(tmp_path):
    """Encoding 3 is no longer written (encoding 5 replaced it) but old registries hold it."""
    import zstandard

    from adapterhub import codec
    from adapterhub.errors import CorruptObject
    from adapterhub.objects import BLOB, COMMIT, hash_object, header
    from adapterhub.store import LooseObjectStore

    (tmp_path / "objects").mkdir()
    store = LooseObjectStore(tmp_path / "objects")
    zdict = b'{"author":"A <a@example.com>","message":"import x","parents":[]}'
    dict_id = store.put(BLOB, zdict)
    body = b'{"author":"A <a@example.com>","message":"import y","parents":[]}'
    oid = hash_object(COMMIT, body)
    raw = zstandard.ZstdCompressionDict(zdict, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    frame = zstandard.ZstdCompressor(level=3, dict_data=raw, write_content_size=True).compress(header(COMMIT, len(body)) + body)
    record = codec.RECORD_HEADER.pack(codec.MAGIC, codec.ENC_DICT, len(header(COMMIT, len(body))) + len(body))
    store._write_record(oid, record + bytes.fromhex(dict_id) + frame)
    assert store.read(oid) == (COMMIT, body) and store.dependencies_of(oid) == (dict_id,)
    store.remove(dict_id)
    with pytest.raises(CorruptObject, match=f"{oid}.*compression dictionary {dict_id} is missing"):
        LooseObjectStore(tmp_path / "objects").read(oid)
    store._write_record(dict_id, codec.encode([header(BLOB, 5), b"wrong"]))  # damaged dictionary
    with pytest.raises(CorruptObject, match=dict_id):
        LooseObjectStore(tmp_path / "objects").read(oid)
