"""Encoding 4: deltas against the extrapolation `2 * base - prev` of the two revisions before.

Checked on momentum-like sequences (where the writer must pick it) and noise-like ones
(where it must not), through the store, through real commits, gc and checkout, and
against forged records (a whole base, a missing base's base, a depth that cannot hold).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from adapterhub import codec
from adapterhub.encoding.chain import DeltaBase
from adapterhub.encoding.planes import layout_for
from adapterhub.encoding import kernels, predict, reference
from adapterhub.errors import CorruptObject
from adapterhub.gc import collect_garbage
from adapterhub.objects import TENSOR, hash_object, header
from adapterhub.registry import Registry
from adapterhub.store import LooseObjectStore


def _momentum_run(n: int, steps: int = 4, size: int = 8192, dtype=np.float32, seed: int = 0) -> list[np.ndarray]:
    """Checkpoints of weights that keep moving the same way (steady per-element velocity)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(size).astype(np.float64) * 0.02
    velocity = rng.standard_normal(size) * 1e-4
    out = []
    for _ in range(n):
        w = w + velocity + rng.standard_normal(size) * 1e-6
        out.append(w.astype(dtype))
    return out


def _noise_run(n: int, size: int = 8192, seed: int = 1) -> list[np.ndarray]:
    """Checkpoints whose steps are independent noise: extrapolating doubles the error."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(size) * 0.02
    return [(w + rng.standard_normal(size) * 1e-4).astype(np.float32) for _ in range(n)]


def _store(tmp_path) -> LooseObjectStore:
    (tmp_path / "objects").mkdir(parents=True)
    return LooseObjectStore(tmp_path / "objects")


def _put_chain(store, arrays, dtype="F32") -> list[str]:
    ids, base = [], None
    for a in arrays:
        base = store.put(TENSOR, a.tobytes(), dtype=dtype, delta_base=base)
        ids.append(base)
    return ids


@pytest.mark.parametrize("np_dtype, st_dtype", [(np.float32, "F32"), (np.float16, "F16"), (np.float64, "F64")])
def test_extrapolation_is_exact_and_undone_by_the_ordinary_delta(np_dtype, st_dtype):
    layout = layout_for(st_dtype)
    rng = np.random.default_rng(5)
    # Signs flip, values cross zero, and the extrapolation overflows the integer range.
    base = rng.standard_normal(1001).astype(np_dtype)
    prev = -base * np_dtype(3)
    prev[:5] = np.array([np.inf, -np.inf, np.nan, 0.0, -0.0], dtype=np_dtype)
    body = rng.standard_normal(1001).astype(np_dtype)
    pred = predict.extrapolate(base.tobytes(), prev.tobytes(), layout)
    assert len(pred) == base.nbytes
    h = header(TENSOR, body.nbytes)
    record = codec.RECORD_HEADER.pack(codec.MAGIC, codec.ENC_EXTRAPOLATED, len(h) + body.nbytes) + bytes.fromhex("cd" * 32)
    record += codec._tensor_codec().encode_delta(h, body.tobytes(), layout, DeltaBase("ab" * 32, pred, 1))
    tensors = {"ab" * 32: base.tobytes(), "cd" * 32: prev.tobytes()}
    loaded = []
    out = codec.decode("t", record, lambda oid, budget: (loaded.append(oid), tensors[oid])[1])
    assert out == h + body.tobytes() and sorted(loaded) == sorted(tensors)
    assert codec.dependencies("t", record) == ("ab" * 32, "cd" * 32)


@pytest.mark.skipif(kernels.native is None, reason="the native codec extension is not built")
@pytest.mark.parametrize("width, rotate", [(2, True), (4, True), (2, False), (4, False)])
def test_extrapolation_score_is_the_same_in_c_and_numpy(width, rotate):
    rng = np.random.default_rng(width + rotate)
    for n in (0, 1, 7, 1000, 4099):
        # Random bit patterns: signs, NaNs, infinities and the extremes of the integer range.
        x, b, p = (rng.integers(0, 256, n * width, dtype=np.uint8).tobytes() for _ in range(3))
        for step in (1, 2, 7, max(1, n)):
            assert kernels.native.extrapolation_score(x, b, p, width, rotate, step) == \
                reference.extrapolation_score(x, b, p, width, rotate, step)
    with pytest.raises(ValueError):
        kernels.native.extrapolation_score(b"ab", b"ab", b"a", 2, True, 1)
    with pytest.raises(ValueError):
        reference.extrapolation_score(b"abcdefgh", b"abcdefgh", b"abcdefgh", 8, True, 1)


def test_writer_extrapolates_a_momentum_run_and_reads_it_back(tmp_path):
    store = _store(tmp_path)
    run = _momentum_run(6)
    ids = _put_chain(store, run)
    encs = [store._read_record(i)[4] for i in ids]
    # First whole, second a plain delta (its base is whole), then extrapolated.
    assert encs[0] == codec.ENC_PLANES and encs[1] == codec.ENC_DELTA
    assert set(encs[2:]) == {codec.ENC_EXTRAPOLATED}
    # Smaller than the plain delta the writer would otherwise have chosen.
    plain = codec.encode_tensor(header(TENSOR, run[3].nbytes), run[3].tobytes(), "F32",
                                DeltaBase(ids[2], run[2].tobytes(), 2))
    assert len(store._read_record(ids[3])) < 0.97 * len(plain)
    fresh = LooseObjectStore(tmp_path / "objects")  # no base cache: every base read from disk
    for oid, a in zip(ids, run):
        assert oid == hash_object(TENSOR, a.tobytes())
        assert fresh.read(oid) == (TENSOR, a.tobytes())
    assert fresh.delta_base_of(ids[4]) == ids[3]


def test_writer_keeps_plain_deltas_when_steps_do_not_repeat(tmp_path):
    store = _store(tmp_path)
    ids = _put_chain(store, _noise_run(5))
    assert [store._read_record(i)[4] for i in ids[1:]] == [codec.ENC_DELTA] * 4


def _forge(store, oid: str, prev: str) -> bytes:
    """The stored encoding-4 record of `oid` with its second source replaced by `prev`."""
    record = bytearray(store._read_record(oid))
    assert record[4] == codec.ENC_EXTRAPOLATED
    record[13:45] = bytes.fromhex(prev)
    return bytes(record)


def test_forged_extrapolation_sources_are_refused(tmp_path):
    store = _store(tmp_path)
    run = _momentum_run(3)
    ids = _put_chain(store, run)
    other = store.put(TENSOR, _momentum_run(1, size=100)[0].tobytes(), dtype="F32")
    blob = store.put("blob", b"x" * run[0].nbytes)
    cases = [(other, "differ in length"), (blob, "not a tensor"), ("ef" * 32, "missing"),
             (ids[2], "deeper than|cycle")]  # itself: a cycle through the second source
    for prev, error in cases:
        forged_store = _store(tmp_path / f"forged-{prev[:6]}")
        for oid in (ids[1], ids[0], other, blob):
            forged_store._write_record(oid, store._read_record(oid))
        forged_store._write_record(ids[2], _forge(store, ids[2], prev))
        with pytest.raises(CorruptObject, match=error):
            forged_store.read(ids[2])


def test_a_wrong_but_valid_second_source_fails_the_hash_check(tmp_path):
    store = _store(tmp_path)
    run = _momentum_run(3)
    ids = _put_chain(store, run)
    forged_store = _store(tmp_path / "forged")
    decoy = store.put(TENSOR, run[1].tobytes(), dtype="F32")  # same length, wrong values
    for oid in (ids[0], ids[1], decoy):
        forged_store._write_record(oid, store._read_record(oid))
    forged_store._write_record(ids[2], _forge(store, ids[2], ids[1]))
    with pytest.raises(CorruptObject, match="does not hash"):
        forged_store.read(ids[2])


def test_missing_base_of_the_base_is_a_clear_error(tmp_path):
    store = _store(tmp_path)
    ids = _put_chain(store, _momentum_run(3))
    partial = _store(tmp_path / "partial")
    for oid in ids[1:]:  # the first tensor (the base's base) is lost
        partial._write_record(oid, store._read_record(oid))
    with pytest.raises(CorruptObject, match="missing"):
        partial.read(ids[2])


def test_every_truncation_of_an_extrapolated_record_is_refused(tmp_path):
    store = _store(tmp_path)
    run = _momentum_run(3, size=512)
    ids = _put_chain(store, run)
    record = store._read_record(ids[2])
    assert record[4] == codec.ENC_EXTRAPOLATED
    bodies = {ids[0]: run[0].tobytes(), ids[1]: run[1].tobytes()}
    assert codec.decode("t", record, lambda oid, budget: bodies[oid]) == header(TENSOR, run[2].nbytes) + run[2].tobytes()
    for cut in range(0, len(record), 5):
        with pytest.raises(CorruptObject):
            codec.decode("t", record[:cut], lambda oid, budget: bodies[oid])


def _write_checkpoint(folder, w: np.ndarray):
    folder.mkdir(parents=True)
    save_file({"layer.lora_A.weight": w.reshape(64, -1)}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    return folder


def test_commits_gc_and_checkouts_of_an_extrapolated_run(tmp_path, monkeypatch):
    monkeypatch.setenv("AH_AUTHOR", "T <t@e>")
    reg = Registry.init(tmp_path / "reg")
    run = _momentum_run(5)
    ids = [reg.commit(_write_checkpoint(tmp_path / f"ck{i}", w), f"step {i}").id for i, w in enumerate(run)]
    result = collect_garbage(reg.ah_dir, reg.store, reg.refs, grace_s=0)  # repack: bases and their bases kept
    assert result.packed == result.reachable
    reopened = Registry.open(reg.root)
    encs = {reopened.store._read_record(t.blob)[4]
            for c in ids for e in reopened.store.get_snapshot(reopened.store.get_commit(c).snapshot).files
            if e.kind == "safetensors" for t in e.tensors}
    assert codec.ENC_EXTRAPOLATED in encs
    for i, c in enumerate(ids):
        out = tmp_path / f"co{i}"
        Registry.open(reg.root).checkout(c, out)  # a fresh store each time: cold base cache
        assert (out / "adapter_model.safetensors").read_bytes() == (tmp_path / f"ck{i}" / "adapter_model.safetensors").read_bytes()


def test_aggressive_gc_stores_tips_whole_and_history_behind_them(tmp_path, monkeypatch):
    """`ah gc --aggressive`: the newest revision of each branch reads with no delta, older
    ones as deltas against newer ones; every revision still checks out byte-identical, a
    commit on the old layout made alongside still reads, and nothing needed is pruned."""
    monkeypatch.setenv("AH_AUTHOR", "T <t@e>")
    reg = Registry.init(tmp_path / "reg")
    run = _momentum_run(7)
    ids = []
    for i, w in enumerate(run[:6]):
        monkeypatch.setenv("AH_COMMIT_TIME", str(1_700_000_000 + i))
        ids.append(reg.commit(_write_checkpoint(tmp_path / f"ck{i}", w), f"step {i}").id)
    reg.create_branch("side", ids[2])
    monkeypatch.setenv("AH_COMMIT_TIME", str(1_700_000_100))  # the newest tip
    side = reg.commit(_write_checkpoint(tmp_path / "side", run[6]), "side", branch="side").id

    def tensor(commit: str) -> str:
        store = Registry.open(reg.root).store
        files = store.get_snapshot(store.get_commit(commit).snapshot).files
        return next(f for f in files if f.kind == "safetensors").tensors[0].blob

    def depth(commit: str) -> int:
        ref = codec.delta_ref("t", Registry.open(reg.root).store._read_record(tensor(commit)))
        return ref.depth if ref else 0

    assert depth(ids[5]) == 5  # forward chain: the newest is the deepest
    # A writer racing gc encodes X against the oldest tensor (whole now: X declares depth 1)
    # and writes it after gc made that tensor a delta (depth 3): X must still read.
    racer = Registry.open(reg.root).store
    x_body = (run[0] + np.float32(1e-4)).tobytes()
    x_id = hash_object(TENSOR, x_body)
    x_record = racer.encode_record(x_id, TENSOR, x_body, dtype="F32", delta_base=tensor(ids[0]))
    assert codec.delta_ref(x_id, x_record).depth == 1
    result = collect_garbage(reg.ah_dir, Registry.open(reg.root).store, reg.refs, grace_s=0, aggressive=True)
    assert not result.missing and result.pruned == 0
    assert depth(ids[5]) == 0 and depth(side) == 0
    # The side branch is the newest tip, so the shared history (ids[2] and older) hangs
    # behind it; main's own commits hang behind main's tip.
    assert [depth(c) for c in reversed(ids)] == [0, 1, 2, 1, 2, 3]
    store = Registry.open(reg.root).store
    assert store.delta_base_of(tensor(ids[4])) == tensor(ids[5])
    # A commit written on the old layout (its base's declared depth 5) still reads.
    monkeypatch.setenv("AH_COMMIT_TIME", str(1_700_000_200))
    late = reg.commit(_write_checkpoint(tmp_path / "late", run[6] + np.float32(1e-5)), "late").id
    for commit, folder in [(c, tmp_path / f"ck{i}") for i, c in enumerate(ids)] + [(side, tmp_path / "side")]:
        out = tmp_path / f"co-{commit[:8]}"
        Registry.open(reg.root).checkout(commit, out)  # a fresh store: nothing cached
        assert (out / "adapter_model.safetensors").read_bytes() == (folder / "adapter_model.safetensors").read_bytes()
    assert Registry.open(reg.root).store.read(tensor(late))[0] == TENSOR
    racer.loose._write_record(x_id, x_record)
    assert depth(ids[0]) == 3 and Registry.open(reg.root).store.read(x_id) == (TENSOR, x_body)
    # Running it again changes nothing that is already laid out.
    again = collect_garbage(reg.ah_dir, Registry.open(reg.root).store, reg.refs, grace_s=0, aggressive=True)
    assert not again.missing and depth(late) == 0


def test_aggressive_gc_rewrites_tensors_whose_ids_end_in_zero_bytes(tmp_path, monkeypatch):
    """numpy's `S32` drops trailing NUL bytes; a tip tensor whose id ends in 0x00 must still
    be rewritten, or its old record (a delta on its parent) would sit beside the parent's
    new one (a delta on it): a cycle."""
    monkeypatch.setenv("AH_AUTHOR", "T <t@e>")
    run = _momentum_run(4)
    rng = np.random.default_rng(9)
    tip = run[-1]
    while not bytes.fromhex(hash_object(TENSOR, tip.reshape(64, -1).tobytes()))[-1:] == b"\0":
        tip = (run[-1] + rng.standard_normal(run[-1].shape).astype(np.float32) * 1e-7).astype(np.float32)
    run[-1] = tip
    reg = Registry.init(tmp_path / "reg")
    ids = [reg.commit(_write_checkpoint(tmp_path / f"ck{i}", w), f"step {i}").id for i, w in enumerate(run)]
    collect_garbage(reg.ah_dir, Registry.open(reg.root).store, reg.refs, grace_s=0, aggressive=True)
    for i, commit in enumerate(ids):
        out = tmp_path / f"co{i}"
        Registry.open(reg.root).checkout(commit, out)
        assert (out / "adapter_model.safetensors").read_bytes() == (tmp_path / f"ck{i}" / "adapter_model.safetensors").read_bytes()


def test_aggressive_gc_follows_an_annotated_tag_to_its_commit(tmp_path, monkeypatch):
    """An annotated tag is a tip too (helper-23: gc --aggressive raised AttributeError on
    Tag.target): its commit's tensors are laid out whole like a branch tip's."""
    monkeypatch.setenv("AH_AUTHOR", "T <t@e>")
    reg = Registry.init(tmp_path / "reg")
    run = _momentum_run(3)
    ids = []
    for i, w in enumerate(run):
        monkeypatch.setenv("AH_COMMIT_TIME", str(1_700_000_000 + i))
        ids.append(reg.commit(_write_checkpoint(tmp_path / f"ck{i}", w), f"step {i}").id)
    monkeypatch.setenv("AH_COMMIT_TIME", str(1_700_000_100))
    reg.create_tag("v1", ids[1], message="annotated")
    reg.refs.update("refs/heads/main", ids[0])  # the tag now names the newest tip kept
    result = collect_garbage(reg.ah_dir, Registry.open(reg.root).store, reg.refs, grace_s=0, aggressive=True)
    assert not result.missing
    store = Registry.open(reg.root).store
    tip = store.get_snapshot(store.get_commit(ids[1]).snapshot)
    blob = next(f for f in tip.files if f.kind == "safetensors").tensors[0].blob
    assert store.delta_base_of(blob) is None
    out = tmp_path / "co"
    Registry.open(reg.root).checkout("v1", out)
    assert (out / "adapter_model.safetensors").read_bytes() == (tmp_path / "ck1" / "adapter_model.safetensors").read_bytes()
