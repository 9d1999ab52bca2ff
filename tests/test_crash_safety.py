"""Crash safety: `ah commit` and `ah checkout` killed with SIGKILL at many moments never
leave a half-written object, ref or output file visible, and the next command works.

The kill moments are fractions of a measured uninterrupted run, so they land in start-up,
in tensor storage and near the ref update on fast and slow machines alike.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from adapterhub.errors import RefLocked
from adapterhub.fsutil import TMP_PREFIX
from adapterhub.pack import Pack
from adapterhub.refs import HEADS
from adapterhub.registry import Registry
from adapterhub.snapshot import iter_file_bytes

pytestmark = pytest.mark.slow

TENSORS = 10
TENSOR_ELEMS = 1 << 20  # 10 x 4 MiB of float32: a 40 MiB adapter
FRACTIONS = (0.05, 0.2, 0.4, 0.6, 0.8, 0.95)
REFLOG_LINE = re.compile(r"^[0-9a-f]{64} [0-9a-f]{64} \d+ [^\t]+\t.*$")


def _big_adapter(folder: Path, seed: int) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 64, "seed": seed}))
    shape = (1024, TENSOR_ELEMS // 1024)
    tensors = {f"base_model.model.layers.{i}.lora_A.weight": rng.standard_normal(shape, dtype=np.float32)
               for i in range(TENSORS)}
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _ah_popen(*args) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "adapterhub.cli.main", *[str(a) for a in args]],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def _timed_run(*args) -> float:
    start = time.monotonic()
    proc = _ah_popen(*args)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()
    return time.monotonic() - start


def _run_and_kill(delay: float, *args) -> bool:
    """Start `ah ARGS`, SIGKILL it after `delay` seconds; True if it finished first."""
    proc = _ah_popen(*args)
    try:
        proc.wait(timeout=delay)
        return True
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        return False
    finally:
        proc.stdout.close()
        proc.stderr.close()


def _assert_registry_consistent(reg: Registry, sources: dict[str, Path]) -> None:
    """Every visible object verifies; every ref, HEAD and reflog line is whole; every
    commit on main is complete, and the tip's files rebuild byte for byte."""
    store = reg.store
    for oid in store.iter_ids():
        obj_type, _ = store.read(oid)  # re-hashes: raises CorruptObject on a torn object
        store.get(oid)  # and the structured ones parse
    pack_dir = reg.ah_dir / "objects" / "pack"
    for name in os.listdir(pack_dir) if pack_dir.is_dir() else ():
        # A commit's pack: visible only as a complete pack with its index, whole.
        if name.startswith(TMP_PREFIX):
            continue
        assert name.startswith("pack-") and name.endswith((".pack", ".idx")), name
        if name.endswith(".idx"):
            assert (pack_dir / name).with_suffix(".pack").is_file(), name
            pack = Pack(pack_dir / name)
            pack.verify()
            pack.close()
    for fan in (reg.ah_dir / "objects").iterdir():
        if fan == pack_dir:
            continue
        for name in os.listdir(fan):
            # Only whole objects and temp files: nothing else under objects/.
            assert len(name) == 62 or name.startswith(TMP_PREFIX), name
    target, _ = reg.refs.read_head()
    assert target == HEADS + "main"
    assert [name for name, _ in reg.refs.list(HEADS)] == [HEADS + "main"]
    history = reg.log("main")
    for info in history:
        assert all(store.has(b) for b in store.get_snapshot(info.commit.snapshot).blob_ids())
    tip = history[0]
    for entry in store.get_snapshot(tip.commit.snapshot).files:
        digest = hashlib.sha256()
        for chunk in iter_file_bytes(store, entry):
            digest.update(chunk)
        assert digest.hexdigest() == _sha(sources[tip.message] / entry.path), (tip.message, entry.path)
    for log in (reg.ah_dir / "logs").rglob("*"):
        if log.is_file():
            for line in log.read_text().splitlines():
                assert REFLOG_LINE.match(line), line


def _commit_after_crash(reg: Registry, folder: Path, message: str):
    """The next commit works; a lock left by a writer killed inside its ref update is
    reported by name (never broken silently), and once removed the commit goes through."""
    lock = reg.ah_dir / "refs" / "heads" / "main.lock"
    if lock.exists():
        with pytest.raises(RefLocked, match=re.escape(str(lock))):
            reg.commit(folder, message)
        lock.unlink()
    return reg.commit(folder, message)


def test_killed_commit_leaves_no_torn_object_or_ref(registry, tmp_path):
    reg = registry
    sources: dict[str, Path] = {}
    first = _big_adapter(tmp_path / "src0", seed=0)
    sources["baseline"] = first
    full = _timed_run("--registry", reg.root, "commit", first, "-m", "baseline")
    outcomes = []
    for n, frac in enumerate((0.0,) + FRACTIONS, start=1):
        delay = 0.05 if frac == 0.0 else frac * full
        folder = _big_adapter(tmp_path / f"src{n}", seed=n)
        message = f"attempt {n}"
        sources[message] = folder
        before = sum(1 for _ in reg.store.iter_ids())
        finished = _run_and_kill(delay, "--registry", reg.root, "commit", folder, "-m", message)
        temps = len(list((reg.ah_dir / "objects").glob(f"*/{TMP_PREFIX}*")))
        new = sum(1 for _ in reg.store.iter_ids()) - before
        outcomes.append((round(delay, 2), "finished" if finished else "killed", temps, new))
        reg = Registry.open(reg.root)
        _assert_registry_consistent(reg, sources)
        tip = reg.refs.read(HEADS + "main")
        assert tip is not None  # the baseline commit is never lost
        history = [c.message for c in reg.log("main")]
        assert history[-1] == "baseline"
        if finished:
            assert history[0] == message
    # A commit after all the crashes succeeds, on top of whatever the tip is.
    final = _big_adapter(tmp_path / "final", seed=99)
    sources["final"] = final
    tip = reg.refs.read(HEADS + "main")
    res = _commit_after_crash(reg, final, "final")
    assert res.parents == (tip,)
    _assert_registry_consistent(reg, sources)
    out = tmp_path / "check"
    reg.checkout("main", out)
    assert {p.name: _sha(p) for p in out.iterdir()} == {p.name: _sha(p) for p in final.iterdir()}
    print(f"\ncommit kill points (s, outcome, temp files left, new objects): {outcomes}; "
          f"uninterrupted commit took {full:.2f}s")
    assert any(o[1] == "killed" for o in outcomes)


def test_killed_checkout_never_leaves_a_truncated_file(registry, tmp_path):
    folder = _big_adapter(tmp_path / "src", seed=7)
    (folder / "README.md").write_text("# big adapter\n")
    registry.commit(folder, "big")
    want = {p.name: _sha(p) for p in folder.iterdir()}
    full = _timed_run("--registry", registry.root, "checkout", "main", "-o", tmp_path / "calibrate")
    outcomes = []
    for n, frac in enumerate((0.0,) + FRACTIONS):
        out = tmp_path / f"out{n}"
        delay = 0.05 if frac == 0.0 else frac * full
        finished = _run_and_kill(delay, "--registry", registry.root, "checkout", "main", "-o", out)
        temps = len(list(out.glob(f"{TMP_PREFIX}*")))
        outcomes.append((round(delay, 2), "finished" if finished else "killed", temps))
        if out.exists():
            for p in out.iterdir():
                if p.name.startswith(TMP_PREFIX):
                    continue  # an unfinished temp file is all a kill may leave
                # Under its final name a file is complete, never truncated.
                assert p.name in want and _sha(p) == want[p.name], p.name
        if finished:
            assert {p.name: _sha(p) for p in out.iterdir()} == want
        # A forced checkout over whatever the kill left completes the folder.
        registry.checkout("main", out, force=True)
        got = {p.name: _sha(p) for p in out.iterdir() if not p.name.startswith(TMP_PREFIX)}
        assert got == want
    print(f"\ncheckout kill points (s, outcome, temp files left): {outcomes}; uninterrupted checkout took {full:.2f}s")
    assert any(o[1] == "killed" for o in outcomes)
