"""ObjectStore.read_tensors: a checkout's tensors decoded and re-hashed in one native call.

It must return exactly what read_tensor returns one by one (planes, deltas, extrapolated
deltas; bases cached or not), raise exactly the error read_tensor raises for damaged,
missing or mistyped objects, and teach the base cache the same chains.
"""

from __future__ import annotations

import numpy as np
import pytest

from adapterhub import codec
from adapterhub import store as store_module
from adapterhub.encoding import kernels
from adapterhub.errors import CorruptObject, ObjectNotFound, UnsupportedFormat
from adapterhub.encoding.chain import READ_BUDGET, DeltaBase
from adapterhub.objects import BLOB, TENSOR, hash_object, header
from adapterhub.packstore import PackedObjectStore

needs_native = pytest.mark.skipif(kernels.read_tensors is None, reason="the C extension or libzstd.so.1 is missing")


def _store(path) -> PackedObjectStore:
    (path / "pack").mkdir(parents=True, exist_ok=True)
    return PackedObjectStore(path)


def _revisions(path, dtype="F32", revisions=4, tensors=6, size=5000) -> tuple[PackedObjectStore, list[list[str]]]:
    """A store holding `revisions` checkpoints of steadily moving tensors, each stored as a
    delta (some extrapolated) against the previous one, the way commits store them."""
    store = _store(path)
    rng = np.random.default_rng(0)
    values = rng.standard_normal((tensors, size)) * 0.02
    step = rng.standard_normal((tensors, size)) * 1e-3
    numpy_type = np.float32 if dtype == "F32" else np.float16
    ids: list[list[str]] = []
    for r in range(revisions):
        bodies = [(values[k] + r * step[k]).astype(numpy_type).tobytes() for k in range(tensors)]
        bases = ids[-1] if ids else [None] * tensors
        ids.append([oid for oid, _ in store.put_tensors([(b, dtype, base) for b, base in zip(bodies, bases)])])
    return store, ids


def _encodings(store, oids) -> set[int]:
    return {bytes(store._read_record(oid))[codec.ENCODING_AT] for oid in oids}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", ["F32", "F16"])
def test_bodies_are_read_tensors_one_by_one(tmp_path, threads, dtype):
    store, ids = _revisions(tmp_path, dtype)
    every = [oid for rev in ids for oid in rev]
    assert {codec.ENC_PLANES, codec.ENC_DELTA, codec.ENC_EXTRAPOLATED} <= _encodings(store, every)
    want = [_store(tmp_path).read_tensor(oid) for oid in every]
    # A cold store (bases read on demand), then a warm one (bases from the cache).
    cold = _store(tmp_path)
    assert cold.read_tensors(every[-6:], threads) == want[-6:]
    assert cold.read_tensors(every, threads) == want


@needs_native
def test_the_base_cache_learns_the_chains_read_learns(tmp_path):
    store, ids = _revisions(tmp_path)
    newest = ids[-1]
    one, many = _store(tmp_path), _store(tmp_path)
    for oid in newest:
        one.read_tensor(oid)
    many.read_tensors(newest, 2)
    for oid in newest:
        assert many.base_cache.get(oid) == one.base_cache.get(oid)
    assert {many.base_cache.get(oid)[1] for oid in newest} == {len(ids) - 1}


def _same_error(tmp_path, oids, damage=None):
    """The error read_tensors raises equals read_tensor's for the first bad id."""
    batch, single = _store(tmp_path), _store(tmp_path)
    for store in (batch, single):
        if damage:
            original = store._read_record
            store._read_record = lambda oid, original=original: damage(oid, bytes(original(oid)))
    with pytest.raises((CorruptObject, ObjectNotFound)) as batch_error:
        batch.read_tensors(oids, 2)
    with pytest.raises((CorruptObject, ObjectNotFound)) as single_error:
        for oid in oids:
            single.read_tensor(oid)
    assert type(batch_error.value) is type(single_error.value)
    assert str(batch_error.value) == str(single_error.value)
    return batch_error.value


def test_a_body_that_does_not_hash_to_its_id_is_refused(tmp_path):
    store, ids = _revisions(tmp_path)
    victim, other = ids[0][2], ids[0][3]  # two tensors of one size: the records swap cleanly
    other_record = bytes(store._read_record(other))

    def swap(oid, record):
        return other_record if oid == victim else record

    error = _same_error(tmp_path, ids[0], swap)
    assert "does not hash to its id" in str(error)


@pytest.mark.parametrize("cut", [10, 40, 200])
def test_a_truncated_record_is_refused(tmp_path, cut):
    store, ids = _revisions(tmp_path)
    victim = ids[2][1]

    def truncate(oid, record):
        return record[:cut] if oid == victim else record

    _same_error(tmp_path, ids[2], truncate)


def test_an_id_of_another_type_is_named(tmp_path):
    store, ids = _revisions(tmp_path)
    blob = store.put(BLOB, b"not a tensor" * 100)
    error = _same_error(tmp_path, ids[0][:2] + [blob])
    assert "expected a tensor, found a blob" in str(error)


def test_a_missing_object_or_delta_base_is_named(tmp_path):
    store, ids = _revisions(tmp_path)
    _same_error(tmp_path, ids[0][:2] + ["ab" * 32])
    victim_base = ids[0][3]

    def hide_base(oid, record):
        if oid == victim_base:
            raise ObjectNotFound(oid)
        return record

    error = _same_error(tmp_path, ids[1], hide_base)
    assert victim_base in str(error)


def test_the_python_path_returns_the_same(tmp_path, monkeypatch):
    store, ids = _revisions(tmp_path)
    every = [oid for rev in ids for oid in rev]
    want = [_store(tmp_path).read_tensor(oid) for oid in every]
    monkeypatch.setattr(kernels, "read_tensors", None)
    assert _store(tmp_path).read_tensors(every, 2) == want


@needs_native
@pytest.mark.parametrize(
    "job, error, message",
    [
        ([b"x"], TypeError, "must be a tuple"),
        (("ab" * 32, b"", 0), TypeError, "a job is"),
        (("ab" * 31, b"\0" * 8, 0, 8, 4, True, None, 1, None), ValueError, "64 hex digits"),
        (("ab" * 32, b"\0" * 8, 9, 8, 4, True, None, 1, None), ValueError, "out of range"),
        (("ab" * 32, b"\0" * 8, 0, -1, 4, True, None, 1, None), ValueError, "out of range"),
        (("ab" * 32, b"\0" * 8, 0, 8, 3, True, None, 1, None), ValueError, "width"),
        (("ab" * 32, b"\0" * 8, 0, 8, 4, True, b"\0" * 7, 1, None), ValueError, "length"),
        (("ab" * 32, b"\0" * 8, 0, 8, 4, True, None, 1, b"\0" * 8), ValueError, "prev extrapolates a base"),
    ],
)
def test_bad_read_jobs_are_refused_clearly(job, error, message):
    with pytest.raises(error, match=message):
        kernels.read_tensors([job], 2)


@needs_native
def test_damaged_sections_come_back_as_none_not_as_bytes():
    """The native call never returns a body it could not decode or verify."""
    body = (np.arange(3000, dtype=np.float32) * 1e-3).tobytes()
    oid = hash_object(TENSOR, body)
    record = codec.encode_tensor(header(TENSOR, len(body)), body, "F32")
    pos, body_len, width, rotate, kind, base_id, depth, prev_id = kernels.read_plan(record)
    assert (body_len, width, rotate, base_id, depth, prev_id) == (len(body), 4, True, None, 0, None)
    good = (oid, record, pos, body_len, width, rotate, None, kind, None)
    wrong_id = ("cd" * 32,) + good[1:]
    cut = (oid, record[:-5]) + good[2:]
    assert kernels.read_tensors([good, wrong_id, cut, good], 2) == [body, None, None, body]


def _outcome(store, call):
    try:
        return ("ok", call())
    except (CorruptObject, ObjectNotFound, UnsupportedFormat) as exc:
        return (type(exc).__name__, str(exc))


def test_damaged_record_headers_read_exactly_as_one_by_one(tmp_path):
    """Every single-bit flip in the first 80 bytes (record header, extrapolation source,
    canonical header, base id, depth, kind, layout, first section bytes) and every cut
    there, of a record of each encoding: read_tensors gives read_tensor's body or its
    very error, never another body."""
    store, ids = _revisions(tmp_path)
    every = [oid for rev in ids for oid in rev]
    records = {oid: bytes(store._read_record(oid)) for oid in every}
    samples = {}
    for oid in reversed(every):
        samples.setdefault(records[oid][codec.ENCODING_AT], oid)
    assert {codec.ENC_PLANES, codec.ENC_DELTA, codec.ENC_EXTRAPOLATED} <= set(samples)
    damage = {}
    batch, single = _store(tmp_path), _store(tmp_path)
    for target in (batch, single):
        original = target._read_record
        target._read_record = lambda oid, original=original: damage.get(oid) or original(oid)
    for victim in samples.values():
        record = records[victim]
        variants = [record[:cut] for cut in range(1, 80)]
        for at in range(80):
            for bit in range(8):
                flipped = bytearray(record)
                flipped[at] ^= 1 << bit
                variants.append(bytes(flipped))
        for damaged in variants:
            damage[victim] = damaged
            assert _outcome(batch, lambda: batch.read_tensors([victim], 2)[0]) == _outcome(single, lambda: single.read_tensor(victim))


@pytest.mark.parametrize("length", [READ_BUDGET, READ_BUDGET + 1, READ_BUDGET + 2, READ_BUDGET + 3])
def test_a_chain_longer_than_the_read_budget_fails_alike(tmp_path, length):
    """A chain of deltas each declaring depth 1 (damage, or writers that disagreed) is cut
    at the read budget by both reads: the batch spends a level of it on the record itself."""
    store = _store(tmp_path)
    values = (np.random.default_rng(0).standard_normal(3000) * 0.02).astype(np.float32)
    prev = None
    with store.batch():
        for k in range(length):
            body = (values + np.float32(k * 1e-4)).tobytes()
            oid = hash_object(TENSOR, body)
            base = DeltaBase(prev[0], prev[1], 0) if prev else None
            store._write_record(oid, codec.encode_tensor(header(TENSOR, len(body)), body, "F32", base))
            prev = (oid, body)
    top = prev[0]
    batch, single = _store(tmp_path), _store(tmp_path)
    assert _outcome(batch, lambda: batch.read_tensors([top], 1)[0]) == _outcome(single, lambda: single.read_tensor(top))


def test_with_two_bad_tensors_the_first_is_named_as_one_by_one(tmp_path):
    store, ids = _revisions(tmp_path)
    first, second = ids[1][1], ids[1][4]
    cut = bytes(store._read_record(first))[:-7]

    def damage(oid, record):
        if oid == second:
            raise ObjectNotFound(oid)
        return cut if oid == first else record

    error = _same_error(tmp_path, ids[1], damage)
    assert first in str(error)


@pytest.mark.parametrize("batch_bytes", [1, 5000, 64 << 20])
def test_a_checkout_reads_a_file_in_batches_of_any_size(tmp_path, monkeypatch, batch_bytes):
    """A file's tensors are decoded in batches of about READ_BATCH_BYTES: one tensor a
    batch, a few, or all; the file comes back the same, also after a second revision."""
    import json

    from safetensors.numpy import save_file

    from adapterhub import snapshot
    from adapterhub.registry import Registry

    monkeypatch.setattr(snapshot, "READ_BATCH_BYTES", batch_bytes)
    registry = Registry.init(tmp_path / "registry")
    rng = np.random.default_rng(1)
    tensors = {f"layer.{k}.lora_A.weight": rng.standard_normal((16, 100 + k)).astype(np.float32) for k in range(9)}
    commits = []
    for revision in range(2):
        folder = tmp_path / f"adapter{revision}"
        folder.mkdir()
        save_file({name: t + revision * 1e-3 for name, t in tensors.items()}, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 16}))
        commits.append((folder, registry.commit(folder, f"revision {revision}").id))
    for folder, commit in commits:
        out = tmp_path / f"out-{commit[:8]}"
        registry.checkout(commit, out)
        for path in folder.iterdir():
            assert (out / path.name).read_bytes() == path.read_bytes()


@needs_native
def test_a_cold_deep_chain_is_decoded_a_level_per_native_call(tmp_path, monkeypatch):
    """The newest of 12 revisions (chains 11 deep, extrapolated links among them) read by a
    fresh store: the same bodies as one by one, one native call per chain level for all
    tensors at once, and no record decoded one by one."""
    store, ids = _revisions(tmp_path, revisions=12)
    newest = ids[-1]
    want = [_store(tmp_path).read_tensor(oid) for oid in newest]
    calls = []
    native = kernels.read_tensors

    def counted(jobs, threads):
        calls.append(len(jobs))
        return native(jobs, threads)

    monkeypatch.setattr(kernels, "read_tensors", counted)
    cold = _store(tmp_path)
    monkeypatch.setattr(cold, "_read_verified", lambda *a, **k: pytest.fail("a record was decoded one by one"))
    assert cold.read_tensors(newest, 2) == want
    assert len(calls) == 12 and set(calls) == {len(newest)}


@needs_native
@pytest.mark.parametrize("level", [0, 5, 10])
def test_a_damaged_link_deep_in_a_cold_chain_fails_as_one_by_one(tmp_path, level):
    store, ids = _revisions(tmp_path, revisions=12)
    victim = ids[level][3]

    def flip(oid, record):
        if oid != victim:
            return record
        damaged = bytearray(record)
        damaged[-9] ^= 0x40
        return bytes(damaged)

    _same_error(tmp_path, ids[-1], flip)


@needs_native
def test_a_cycle_of_deltas_ends_alike(tmp_path):
    """Two hand-made delta records naming each other as base: both reads end, alike."""
    store = _store(tmp_path)
    rng = np.random.default_rng(3)
    a = (rng.standard_normal(2000) * 0.02).astype(np.float32).tobytes()
    b = (np.frombuffer(a, np.float32) + np.float32(1e-4)).tobytes()
    ida, idb = hash_object(TENSOR, a), hash_object(TENSOR, b)
    with store.batch():
        store._write_record(ida, codec.encode_tensor(header(TENSOR, len(a)), a, "F32", DeltaBase(idb, b, 0)))
        store._write_record(idb, codec.encode_tensor(header(TENSOR, len(b)), b, "F32", DeltaBase(ida, a, 0)))
    batch, single = _store(tmp_path), _store(tmp_path)
    assert _outcome(batch, lambda: batch.read_tensors([ida, idb], 2)) == _outcome(single, lambda: [single.read_tensor(ida), single.read_tensor(idb)])


def _flip_last(record) -> bytes:
    """The record with its last byte changed: headers intact, data damaged."""
    damaged = bytearray(record)
    damaged[-1] ^= 0x5A
    return bytes(damaged)


@needs_native
def test_a_damaged_record_is_refused_even_when_its_body_is_cached_as_a_base(tmp_path):
    """A tensor asked for together with one whose delta base it is: its body is in the
    base cache, but its own damaged record must still fail the read, as one by one."""
    store, ids = _revisions(tmp_path)
    base, child = ids[1][2], ids[2][2]
    warm_batch, warm_single = _store(tmp_path), _store(tmp_path)
    for warm in (warm_batch, warm_single):
        warm.read_tensor(base)  # now in the base cache
        original = warm._read_record
        warm._read_record = lambda oid, original=original: _flip_last(original(oid)) if oid == base else original(oid)
    got = _outcome(warm_batch, lambda: warm_batch.read_tensors([child, base], 2))
    assert got == _outcome(warm_single, lambda: [warm_single.read_tensor(child), warm_single.read_tensor(base)])
    assert got[0] == "CorruptObject"


@needs_native
@pytest.mark.parametrize("order", ["tip first", "below first"])
def test_a_node_planned_once_is_reused_only_within_the_budget_left(tmp_path, order):
    """Two tensors of one over-long chain asked for together, the base cache off (bodies
    too big for it): the one just under the read budget reads, the one past it fails,
    whichever is planned first - as one by one."""
    store = _store(tmp_path)
    values = (np.random.default_rng(1).standard_normal(3000) * 0.02).astype(np.float32)
    prev, chain = None, []
    with store.batch():
        for k in range(READ_BUDGET + 2):
            body = (values + np.float32(k * 1e-4)).tobytes()
            oid = hash_object(TENSOR, body)
            base = DeltaBase(prev[0], prev[1], 0) if prev else None  # each declares depth 1
            store._write_record(oid, codec.encode_tensor(header(TENSOR, len(body)), body, "F32", base))
            prev = (oid, body)
            chain.append(oid)
    asked = [chain[-1], chain[-2]] if order == "tip first" else [chain[-2], chain[-1]]
    batch, single = _store(tmp_path), _store(tmp_path)
    batch.base_cache.max_bytes = single.base_cache.max_bytes = 0
    got = _outcome(batch, lambda: batch.read_tensors(asked, 2))
    assert got == _outcome(single, lambda: [single.read_tensor(oid) for oid in asked])
    assert got[0] == "CorruptObject" and "deeper than" in got[1]


class _Counted(bytes):
    """A record that counts how many of its kind are alive."""

    alive = 0

    def __new__(cls, data):
        _Counted.alive += 1
        return super().__new__(cls, data)

    def __del__(self):
        _Counted.alive -= 1


@needs_native
def test_a_cold_chain_holds_one_level_of_records_at_a_time(tmp_path, monkeypatch):
    """Planning reads every record of the chains; only the level being decoded may keep
    them (a deep chain's records all at once would multiply a batch's memory by its depth)."""
    store, ids = _revisions(tmp_path, revisions=12)
    cold = _store(tmp_path)
    original = cold._read_record
    monkeypatch.setattr(cold, "_read_record", lambda oid: _Counted(original(oid)))
    native, seen = kernels.read_tensors, []

    def counted(jobs, threads):
        seen.append((_Counted.alive, len(jobs)))
        return native(jobs, threads)

    monkeypatch.setattr(kernels, "read_tensors", counted)
    assert cold.read_tensors(ids[-1], 2) == [_store(tmp_path).read_tensor(oid) for oid in ids[-1]]
    assert len(seen) == 12 and all(alive <= jobs + 1 for alive, jobs in seen), seen


@needs_native
def test_a_warm_read_reads_each_record_once(tmp_path, monkeypatch):
    """The next revision's tensors with every base in the base cache (an in-order
    checkout): each record is read once, kept from planning for its native job."""
    store, ids = _revisions(tmp_path)
    warm = _store(tmp_path)
    want = [_store(tmp_path).read_tensor(oid) for oid in ids[-1]]
    warm.read_tensors(ids[-2], 2)  # the bases, now cached
    reads = []
    original = warm._read_record
    monkeypatch.setattr(warm, "_read_record", lambda oid: reads.append(oid) or original(oid))
    assert warm.read_tensors(ids[-1], 2) == want
    assert sorted(reads) == sorted(ids[-1])


@needs_native
def test_planning_a_cold_chain_holds_no_record_while_it_plans_the_bases(tmp_path, monkeypatch):
    """A record whose bases are not at hand is let go before they are planned: a deep
    cold chain never holds its records of every level at once, even while planning."""
    store, ids = _revisions(tmp_path, revisions=12, tensors=1)
    cold = _store(tmp_path)
    original = cold._read_record
    peak = []

    def read(oid):
        record = _Counted(original(oid))
        peak.append(_Counted.alive)
        return record

    monkeypatch.setattr(cold, "_read_record", read)
    assert cold.read_tensors(ids[-1], 2) == [_store(tmp_path).read_tensor(ids[-1][0])]
    assert max(peak) <= 2, peak


def _warm_revisions(tmp_path, revisions=3, tensors=12):
    """A store whose base cache holds every revision but the newest's bases' sources: the
    newest revision's tensors are read with every base at hand (an in-order checkout)."""
    store, ids = _revisions(tmp_path, revisions=revisions, tensors=tensors)
    warm = _store(tmp_path)
    for rev in ids[:-1]:
        warm.read_tensors(rev, 2)
    return warm, ids


@needs_native
@pytest.mark.parametrize("run_bytes", [1, 30_000, 1 << 30])
def test_runs_of_a_warm_read_are_read_tensor_one_by_one(tmp_path, monkeypatch, run_bytes):
    """A warm read goes in runs (a C thread decodes the next while the caller takes one):
    in order, duplicates included, the same bodies as one by one, the base cache taught."""
    monkeypatch.setattr(store_module, "READ_RUN_BYTES", run_bytes)
    warm, ids = _warm_revisions(tmp_path)
    asked = ids[-1] + ids[-1][:3] + ids[-2][:2]
    want = [_store(tmp_path).read_tensor(oid) for oid in asked]
    runs = list(warm.iter_read_tensors(asked, 2))
    assert [body for run in runs for body in run] == want
    assert len(runs) == 1 if run_bytes > 1 << 20 else len(runs) > 1
    assert all(warm.base_cache.get(oid) is not None for oid in ids[-1])


@needs_native
def test_a_damaged_record_in_a_later_run_fails_as_one_by_one(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "READ_RUN_BYTES", 1)
    warm, ids = _warm_revisions(tmp_path)
    victim = ids[-1][7]
    original = warm._read_record
    warm._read_record = lambda oid: _flip_last(original(oid)) if oid == victim else original(oid)
    single = _store(tmp_path)
    single_original = single._read_record
    single._read_record = lambda oid: _flip_last(single_original(oid)) if oid == victim else single_original(oid)
    got = []
    with pytest.raises(CorruptObject) as batch_error:
        for run in warm.iter_read_tensors(ids[-1], 2):
            got += run
    with pytest.raises(CorruptObject) as single_error:
        for oid in ids[-1]:
            single.read_tensor(oid)
    assert str(batch_error.value) == str(single_error.value)
    assert got == [_store(tmp_path).read_tensor(oid) for oid in ids[-1][:7]]


@needs_native
def test_a_read_left_halfway_lets_the_next_one_run(tmp_path, monkeypatch):
    """A caller that stops after the first run (its file failed) drops a run a C thread is
    decoding: it is waited for, and the next read uses the kept threads as before."""
    monkeypatch.setattr(store_module, "READ_RUN_BYTES", 1)
    warm, ids = _warm_revisions(tmp_path)
    want = [_store(tmp_path).read_tensor(oid) for oid in ids[-1]]
    runs = warm.iter_read_tensors(ids[-1], 2)
    assert next(runs) == want[:1]
    runs.close()
    assert warm.read_tensors(ids[-1], 2) == want


@needs_native
def test_a_base_to_decode_first_ends_the_runs(tmp_path, monkeypatch):
    """Runs while the bases are at hand, then a tensor whose chain is cold: the rest is read
    level by level, the same bodies as one by one."""
    monkeypatch.setattr(store_module, "READ_RUN_BYTES", 1)
    store, ids = _revisions(tmp_path, revisions=6)
    warm = _store(tmp_path)
    warm.read_tensors(ids[-2], 2)  # the newest's bases only
    asked = ids[-1] + ids[2]  # then tensors of a revision whose bases are not at hand
    want = [_store(tmp_path).read_tensor(oid) for oid in asked]
    runs = list(warm.iter_read_tensors(asked, 2))
    assert [body for run in runs for body in run] == want and len(runs) > 1


@needs_native
def test_a_started_read_waits_like_read_tensors(tmp_path):
    store, ids = _revisions(tmp_path)
    plan = store._read_record(ids[0][0])
    pos, body_len, width, rotate, kind, _, _, _ = kernels.read_plan(plan)
    jobs = [(ids[0][0], plan, pos, body_len, width, rotate, None, kind, None)] * 5
    want = kernels.read_tensors(jobs, 2)
    pending = kernels.read_tensors_start(jobs, 2)
    assert pending.wait() == want and want[0] == store.read_tensor(ids[0][0])
    with pytest.raises(RuntimeError):
        pending.wait()
    dropped = kernels.read_tensors_start(jobs, 2)
    del dropped  # waited for, then let go
    assert kernels.read_tensors_start(jobs, 1).wait() == want


@needs_native
def test_a_started_read_waited_for_by_two_threads_at_once_gives_one_result(tmp_path):
    """Both waiters passed the "waited for already" check before either took the result
    (the GIL is let go while the threads are joined): the jobs were freed twice (a crash
    under helper-22's review, /tmp/rev22/r1_double_wait.py). One gets the bodies, the
    other the RuntimeError."""
    import threading

    store, ids = _revisions(tmp_path)
    plan = store._read_record(ids[0][0])
    pos, body_len, width, rotate, kind, _, _, _ = kernels.read_plan(plan)
    jobs = [(ids[0][0], plan, pos, body_len, width, rotate, None, kind, None)] * 64
    want = kernels.read_tensors(jobs, 2)
    for _ in range(20):
        pending = kernels.read_tensors_start(jobs, 2)
        got, errors = [], []

        def wait():
            try:
                got.append(pending.wait())
            except RuntimeError as exc:
                errors.append(exc)

        threads = [threading.Thread(target=wait) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert got == [want] and len(errors) == 1 and "waited for already" in str(errors[0])
