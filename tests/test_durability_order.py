"""The order of a commit's disk operations survives a power cut at any moment.

test_crash_safety kills the process, which loses nothing the kernel already holds; a power
cut also loses what was not fsynced. So this test records every fsync and rename a commit
makes and replays them against the POSIX rules: a file's bytes are durable once the file
was fsynced, a rename once its folder was fsynced afterwards. It then asserts, at every
rename, what a reader after a power cut could find:

- a file is renamed into place only once its own bytes are durable (no empty or torn
  object, pack, index or ref under its final name);
- a pack index, which makes its pack visible, is renamed only once the pack's rename is
  durable (never an index naming a pack that is not there);
- the branch moves only once every object and pack rename of the commit is durable (no
  ref naming a commit whose objects are gone);
- when `commit` returns, the branch's move itself is durable.

A commit that streams its pack while encoding, or merges fsyncs, must keep all of these.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from adapterhub.refs import HEADS
from adapterhub.registry import Registry


def _adapter(folder: Path, seed: int, elems: int, tensors: int = 8) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    save_file({f"layer{i}.lora_A.weight": rng.standard_normal(elems).astype(np.float32) for i in range(tensors)},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    return folder


class DiskTrace:
    """fsync and rename calls, in order, with the paths they touched."""

    def __init__(self, monkeypatch):
        self.events: list[tuple] = []
        real_fsync, real_replace = os.fsync, os.replace

        def fsync(fd):
            self.events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
            return real_fsync(fd)

        def replace(src, dst, **kw):
            real_replace(src, dst, **kw)
            self.events.append(("rename", os.path.realpath(src), os.path.realpath(dst)))

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)

    def check(self, ah_dir: Path, branch_ref: Path) -> list[tuple]:
        """Replay the trace under the power-cut rules; returns the renames, in order."""
        ah = os.path.realpath(ah_dir)
        ref = os.path.realpath(branch_ref)
        synced: set[str] = set()  # files whose bytes are durable (by the name they had then)
        unsynced_renames: list[tuple[str, str]] = []  # (folder, final name) not yet durable
        renames = []
        for event in self.events:
            if event[0] == "fsync":
                path = event[1]
                synced.add(path)
                if os.path.isdir(path):
                    unsynced_renames = [r for r in unsynced_renames if r[0] != path]
                continue
            _, src, dst = event
            if not dst.startswith(ah + os.sep):
                continue  # not the registry (a checkout's files are not durable by design)
            renames.append(dst)
            assert src in synced, f"{dst} renamed into place before its bytes were fsynced"
            pending = [r[1] for r in unsynced_renames]
            if dst.endswith(".idx"):
                pack = dst[: -len(".idx")] + ".pack"
                assert pack not in pending, f"{dst} made its pack visible before the pack's rename was durable"
            if dst == ref:
                assert not pending, f"the branch moved before these renames were durable: {pending}"
            unsynced_renames.append((os.path.dirname(dst), dst))
        assert ref in renames, "the commit never moved the branch"
        left = [r[1] for r in unsynced_renames]
        assert ref not in left, "commit returned before the branch's move was durable"
        assert not left, f"commit returned with renames not yet durable: {left}"
        return renames


@pytest.mark.parametrize("elems, where", [(1 << 16, "pack"), (64, "loose")])
def test_commit_orders_fsyncs_and_renames_for_a_power_cut(tmp_path, monkeypatch, elems, where):
    reg = Registry.init(tmp_path / "reg")
    reg.commit(_adapter(tmp_path / "first", 0, elems), "first")
    trace = DiskTrace(monkeypatch)
    reg.commit(_adapter(tmp_path / "second", 1, elems), "second")
    renames = trace.check(reg.ah_dir, reg.ah_dir / HEADS / "main")
    packs = [r for r in renames if r.endswith((".pack", ".idx"))]
    loose = [r for r in renames if "/objects/" in r and "/pack/" not in r]
    if where == "pack":
        # One pack, its data renamed before its index; nothing of the commit loose.
        assert [Path(p).suffix for p in packs] == [".pack", ".idx"] and not loose
    else:
        assert loose and not packs
