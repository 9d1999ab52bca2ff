"""The checkout's fast paths write exactly what the slow ones would: a decoded batch of
tensors goes out as one list (one writev, whatever the kernel takes per call), and the
file is byte-identical to its source."""

from __future__ import annotations

import os

import numpy as np
import pytest
from safetensors.numpy import save_file

from adapterhub import snapshot
from adapterhub.fsutil import atomic_write


def test_a_list_of_pieces_is_written_whole_even_through_short_writes(tmp_path, monkeypatch):
    # More than IOV_MAX pieces, empty ones among them, and a kernel that takes at most
    # 5000 bytes a call: every byte lands, in order.
    real = os.writev

    def short(fd, bufs):
        data = b"".join(bytes(memoryview(b).cast("B")) for b in bufs[:8])
        return os.write(fd, data[:5000]) if data else real(fd, bufs)

    monkeypatch.setattr(os, "writev", short)
    pieces = [bytes([i % 251]) * (i % 9) * 100 for i in range(2100)]
    atomic_write(tmp_path / "f", iter([b"head", pieces, b"tail", [b"", b"x"]]), durable=False)
    assert (tmp_path / "f").read_bytes() == b"head" + b"".join(pieces) + b"tailx"


def test_a_list_goes_out_in_one_call_with_what_waits(tmp_path, monkeypatch):
    calls = []
    real = os.writev
    monkeypatch.setattr(os, "writev", lambda fd, bufs: calls.append(len(bufs)) or real(fd, bufs))
    atomic_write(tmp_path / "f", iter([b"prefix", [b"a" * 40_000] * 50]), durable=False)
    assert calls == [51]
    assert (tmp_path / "f").read_bytes() == b"prefix" + b"a" * 2_000_000


def _checkpoints(tmp_path, revisions=3):
    rng = np.random.default_rng(0)
    values = {f"layer.{k}.weight": (rng.standard_normal((64, 96)) * 0.02).astype(np.float32) for k in range(12)}
    folders = []
    for r in range(revisions):
        folder = tmp_path / f"rev{r}"
        folder.mkdir()
        save_file({name: v + np.float32(r * 1e-4) for name, v in values.items()}, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text('{"r": 8}')
        folders.append(folder)
    return folders


@pytest.mark.parametrize("batch_bytes", [1, 10_000, 64 << 20])
def test_checkouts_in_order_are_byte_identical_in_any_batch_size(registry, tmp_path, monkeypatch, batch_bytes):
    monkeypatch.setattr(snapshot, "READ_BATCH_BYTES", batch_bytes)
    folders = _checkpoints(tmp_path)
    ids = [registry.commit(folder, f"rev {i}").id for i, folder in enumerate(folders)]
    calls = []
    real = os.writev
    monkeypatch.setattr(os, "writev", lambda fd, bufs: calls.append(len(bufs)) or real(fd, bufs))
    for i, (oid, folder) in enumerate(zip(ids, folders)):
        out = tmp_path / f"out{i}"
        registry.checkout(oid, out)
        for path in folder.iterdir():
            assert (out / path.name).read_bytes() == path.read_bytes()
    if batch_bytes == 64 << 20:  # per checkout: the config, and the tensor file in one call
        assert len(calls) == 2 * len(ids)


def test_iter_file_bytes_still_yields_every_piece_in_order(registry, tmp_path):
    folders = _checkpoints(tmp_path, revisions=1)
    commit = registry.commit(folders[0], "one")
    snap = registry.store.get_snapshot(registry.store.get_commit(commit.id).snapshot)
    for entry in snap.files:
        data = b"".join(snapshot.iter_file_bytes(registry.store, entry))
        assert data == (folders[0] / entry.path).read_bytes()
