"""Provenance: base model fingerprint (full, header-only, cached), dataset content hash,
defaults from adapter_config.json, and `ah show` printing it all."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from safetensors.numpy import save_file

from adapterhub import fingerprint as fp
from adapterhub.fingerprint import FingerprintError, fingerprint_model, hash_dataset

from ah_testkit import ah, make_registry, write_adapter


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    monkeypatch.setenv("AH_AUTHOR", "Tester <t@example.com>")
    monkeypatch.setenv("AH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("AH_FINGERPRINT_MODE", raising=False)


def base_model(folder, seed=0, shards=1):
    """A tiny base model folder: real safetensors weights, optionally sharded."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors = {f"model.layers.{i}.weight": rng.standard_normal((32, 16)).astype(np.float32) for i in range(4)}
    tensors["model.norm.weight"] = np.ones(16, dtype=np.float16)
    names = sorted(tensors)
    for s in range(shards):
        part = {n: tensors[n] for n in names[s::shards]}
        save_file(part, str(folder / f"model-{s:05d}-of-{shards:05d}.safetensors"), metadata={"shard": str(s)})
    (folder / "config.json").write_text("{}")
    return folder


def test_fingerprint_is_deterministic_and_shard_independent(tmp_path):
    a = fingerprint_model(base_model(tmp_path / "a"), use_cache=False)
    b = fingerprint_model(base_model(tmp_path / "b", shards=3), use_cache=False)
    assert a.digest == b.digest and a.mode == "full" and a.tensors == 5
    assert a.bytes == 4 * 32 * 16 * 4 + 16 * 2
    c = fingerprint_model(base_model(tmp_path / "c", seed=1), use_cache=False)
    assert c.digest != a.digest


def test_one_flipped_weight_changes_full_but_not_header_fingerprint(tmp_path):
    m = base_model(tmp_path / "m")
    full, head = fingerprint_model(m, use_cache=False), fingerprint_model(m, "header", use_cache=False)
    f = m / "model-00000-of-00001.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    assert fingerprint_model(m, use_cache=False).digest != full.digest
    assert fingerprint_model(m, "header", use_cache=False).digest == head.digest
    assert head.digest != full.digest and head.to_json()["mode"] == "header"


def test_cache_keyed_by_size_and_mtime(tmp_path, monkeypatch):
    m = base_model(tmp_path / "m")
    first = fingerprint_model(m)
    assert first.cached_files == 0 and (tmp_path / "home" / fp.CACHE_FILE).is_file()
    second = fingerprint_model(m)
    assert second.cached_files == 1 and second.digest == first.digest
    # Same size, new bytes, new mtime: the cache must not answer.
    f = m / "model-00000-of-00001.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    third = fingerprint_model(m)
    assert third.cached_files == 0 and third.digest != first.digest
    # A damaged cache file is ignored, not fatal.
    (tmp_path / "home" / fp.CACHE_FILE).write_text("{not json")
    assert fingerprint_model(m).digest == third.digest


def test_bad_base_model_folders(tmp_path):
    with pytest.raises(FingerprintError, match="does not exist"):
        fingerprint_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FingerprintError, match="no .safetensors"):
        fingerprint_model(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"\xff" * 8 + b"xx")
    with pytest.raises(FingerprintError, match="cannot fingerprint"):
        fingerprint_model(tmp_path / "bad")


def test_auto_mode_switches_to_header_for_big_models(tmp_path, monkeypatch):
    m = base_model(tmp_path / "m")
    monkeypatch.setenv("AH_FINGERPRINT_FULL_MAX", "100")
    assert fp.choose_mode(m) == "header"
    monkeypatch.setenv("AH_FINGERPRINT_FULL_MAX", str(1 << 30))
    assert fp.choose_mode(m) == "full"
    monkeypatch.setenv("AH_FINGERPRINT_MODE", "header")
    assert fp.choose_mode(m) == "header"


def test_dataset_hash_file_and_folder(tmp_path):
    d = tmp_path / "data"
    (d / "sub").mkdir(parents=True)
    (d / "train.jsonl").write_text('{"x": 1}\n')
    (d / "sub" / "val.jsonl").write_text('{"x": 2}\n')
    h1 = hash_dataset(d)
    # Same content elsewhere, files created in another order: same hash.
    e = tmp_path / "copy"
    (e / "sub").mkdir(parents=True)
    (e / "sub" / "val.jsonl").write_text('{"x": 2}\n')
    (e / "train.jsonl").write_text('{"x": 1}\n')
    assert hash_dataset(e) == h1 and h1["files"] == 2 and h1["kind"] == "folder"
    (e / "sub" / "val.jsonl").write_text('{"x": 3}\n')
    assert hash_dataset(e)["digest"] != h1["digest"]
    assert hash_dataset(d / "train.jsonl")["kind"] == "file"


def test_commit_records_everything(tmp_path):
    m = base_model(tmp_path / "base")
    data = tmp_path / "data.jsonl"
    data.write_text("hello\n")
    cfgfile = tmp_path / "train.json"
    cfgfile.write_text(json.dumps({"lr": 1e-4, "epochs": 3}))
    reg, _ = make_registry(tmp_path, 0)
    ad = write_adapter(tmp_path / "ad", base="org/tiny-base")
    res = reg.commit(ad, "with prov", base_model=str(m), dataset=str(data), train_config=cfgfile,
                     params={"seed": 7})
    prov = reg.show(res.id).info.commit.provenance
    assert prov["base_model"]["name"] == "org/tiny-base"  # the hub id from adapter_config.json
    assert prov["base_model"]["path"] == str(m.resolve())
    assert prov["base_model"]["revision"] == "r1"
    assert prov["base_model"]["fingerprint"] == fingerprint_model(m).to_json()
    assert prov["dataset"] == {"uri": str(data), "path": str(data.resolve()), "content": hash_dataset(data)}
    assert prov["train_config"] == {"lr": 1e-4, "epochs": 3} and prov["params"] == {"seed": 7}
    assert {"python", "platform"} <= set(prov["environment"])
    # A hub id that is not a local folder: recorded as a name, no fingerprint, no error.
    res2 = reg.commit(write_adapter(tmp_path / "ad2", seed=3), "hub base", base_model="org/other", dataset="hf://x/y")
    p2 = reg.show(res2.id).info.commit.provenance
    assert p2["base_model"] == {"name": "org/other", "revision": "r1"} and p2["dataset"] == {"uri": "hf://x/y"}


def test_adapter_config_pointing_at_local_folder_is_fingerprinted(tmp_path):
    m = base_model(tmp_path / "base")
    reg, _ = make_registry(tmp_path, 0)
    res = reg.commit(write_adapter(tmp_path / "ad", base=str(m)), "local base")
    base = reg.show(res.id).info.commit.provenance["base_model"]
    assert base["name"] == str(m) and base["fingerprint"]["digest"] == fingerprint_model(m).digest


def test_ah_show_prints_provenance(tmp_path):
    m = base_model(tmp_path / "base")
    reg, _ = make_registry(tmp_path, 0)
    ad = write_adapter(tmp_path / "ad")
    commit_id = ah(reg.root, "commit", str(ad), "-m", "x", "--base-model", str(m), "--dataset", str(ad),
                   env={"AH_FINGERPRINT_MODE": "header"}).stdout.split()[-1]
    text = ah(reg.root, "show", commit_id).stdout
    digest = fingerprint_model(m, "header", use_cache=False).digest
    for needle in ("base_model:", "fingerprint:", digest, "mode: header", "dataset:", "content:", "environment:", "python:"):
        assert needle in text, needle
    js = json.loads(ah(reg.root, "show", commit_id, "--format", "json").stdout)
    assert js["provenance"]["base_model"]["fingerprint"]["digest"] == digest


def test_empty_author_falls_back_to_the_default(tmp_path):
    reg, _ = make_registry(tmp_path, 0)
    ad = write_adapter(tmp_path / "ad")
    ah(reg.root, "commit", str(ad), "-m", "x", "--author", "", env={"AH_AUTHOR": "Default <d@e>"})
    assert json.loads(ah(reg.root, "show", "HEAD", "--format", "json").stdout)["author"] == "Default <d@e>"


def test_bad_base_model_folder_fails_commit_cleanly(tmp_path):
    (tmp_path / "nobase").mkdir()
    reg, _ = make_registry(tmp_path, 0)
    p = ah(reg.root, "commit", str(write_adapter(tmp_path / "ad")), "-m", "x", "--base-model", str(tmp_path / "nobase"),
           check=False)
    assert p.returncode == 2 and "no .safetensors" in p.stderr and "Traceback" not in p.stderr


def test_code_version_names_head_and_tracked_changes_only(tmp_path):
    import subprocess

    from adapterhub.provenance import code_version

    repo = tmp_path / "repo"
    repo.mkdir()
    env = {**os.environ, "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}

    def git(*args):
        return subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True, text=True).stdout

    outside = tmp_path / "plain"
    outside.mkdir()
    git("init", "-q")
    assert code_version(repo) is None  # a repo without a commit names none
    (repo / "train.py").write_text("print(1)\n")
    git("add", "train.py")
    git("-c", "user.name=T", "-c", "user.email=t@e", "commit", "-q", "-m", "one")
    head = git("rev-parse", "HEAD").strip()
    assert code_version(repo) == {"git_commit": head, "dirty": False}
    (repo / "notes.txt").write_text("untracked\n")
    assert code_version(repo) == {"git_commit": head, "dirty": False}  # untracked: not dirty
    (repo / "train.py").write_text("print(2)\n")
    assert code_version(repo) == {"git_commit": head, "dirty": True}
    git("add", "train.py")
    assert code_version(repo) == {"git_commit": head, "dirty": True}  # staged counts too
    if not any((p / ".git").exists() for p in (outside, *outside.parents)):
        assert code_version(outside) is None


def test_default_author_reads_git_identity_with_local_winning(tmp_path, monkeypatch):
    import socket
    import subprocess

    from adapterhub.provenance import default_author

    monkeypatch.delenv("AH_AUTHOR", raising=False)
    glob = tmp_path / "global.gitconfig"
    glob.write_text("[user]\n\tname = Global Name\n\temail = global@example.com\n")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(glob))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    repo = tmp_path / "repo"
    repo.mkdir()
    monkeypatch.chdir(repo)
    assert default_author() == "Global Name <global@example.com>"
    subprocess.run(["git", "init", "-q"], check=True)
    subprocess.run(["git", "config", "user.name", "Local Name"], check=True)
    assert default_author() == "Local Name <global@example.com>"  # the repo's own config wins
    glob.write_text("[user]\n\tname = Only Name\n")
    subprocess.run(["git", "config", "--unset", "user.name"], check=True)
    assert default_author() == f"Only Name <Only Name@{socket.gethostname()}>"


def test_a_commit_from_a_removed_current_folder_works_and_records_no_code(tmp_path, monkeypatch):
    """git cannot run in a folder that no longer exists: the commit still succeeds, with
    no `code` field (not a stale or made-up one)."""
    from adapterhub.registry import Registry
    from ah_testkit import write_adapter

    reg = Registry.init(tmp_path / "reg")
    adapter = write_adapter(tmp_path / "a0")
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    for i in range(2):
        assert "code" not in reg.store.get_commit(reg.commit(adapter, f"from nowhere {i}").id).provenance


def test_installed_versions_are_what_importlib_metadata_says(tmp_path, monkeypatch):
    """Commits record package versions from the metadata folders' names on sys.path (the
    import of importlib.metadata and its METADATA parsing cost 28-50 ms a process); every
    installed distribution must come out as importlib.metadata.version says, the first
    path entry winning, and a development install (no version in its folder's name) is
    asked of importlib.metadata."""
    from importlib import metadata

    from adapterhub.provenance import installed_versions

    names = sorted({d.metadata["Name"] for d in metadata.distributions()})
    assert installed_versions(names) == {n: metadata.version(n) for n in names}
    assert installed_versions(["no-such-package-anywhere"]) == {}
    # A shadowing entry first on sys.path wins, as in importlib.metadata; a source
    # tree's unversioned egg-info is read through importlib.metadata.
    first = tmp_path / "first"
    (first / "Safe_Tensors-9.9.9.dist-info").mkdir(parents=True)
    (first / "Safe_Tensors-9.9.9.dist-info" / "METADATA").write_text("Name: safe-tensors\nVersion: 9.9.9\n")
    dev = tmp_path / "dev"
    (dev / "devpkg.egg-info").mkdir(parents=True)
    (dev / "devpkg.egg-info" / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: devpkg\nVersion: 0.3.dev1\n")
    monkeypatch.syspath_prepend(str(dev))
    monkeypatch.syspath_prepend(str(first))
    assert installed_versions(["safe-tensors", "devpkg"]) == {"safe-tensors": "9.9.9", "devpkg": "0.3.dev1"}
    assert metadata.version("safe-tensors") == "9.9.9" and metadata.version("devpkg") == "0.3.dev1"
