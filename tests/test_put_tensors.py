"""ObjectStore.put_tensors: many tensors in one call, the codec on a thread pool.

It must store exactly what put_ex one by one stores (same ids, same "new" flags, same
records), whatever the thread count, and never store a tensor twice.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from adapterhub.objects import TENSOR, hash_object
from adapterhub.packstore import PackedObjectStore


def _tensors(seed: int, n: int = 12, size: int = 6000) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(size) * 0.02).astype(np.float32).tobytes() for _ in range(n)]


def _moved(bodies: list[bytes], seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for b in bodies:
        a = np.frombuffer(b, dtype=np.float32)
        out.append((a + (rng.standard_normal(a.size) * 1e-4).astype(np.float32)).tobytes())
    return out


def _store(path) -> PackedObjectStore:
    (path / "pack").mkdir(parents=True)
    return PackedObjectStore(path)


def _records(store: PackedObjectStore, oids) -> dict[str, bytes]:
    return {oid: bytes(store._read_record(oid)) for oid in oids}


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_put_tensors_stores_what_put_ex_stores(tmp_path, workers):
    first = _tensors(1)
    second = _moved(first, 2)
    one, many = _store(tmp_path / "one"), _store(tmp_path / "many")
    base_ids = [one.put_ex(TENSOR, b, dtype="F32")[0] for b in first]
    assert [oid for oid, _ in many.put_tensors([(b, "F32", None) for b in first])] == base_ids
    # A second revision, each tensor offered its predecessor as a delta base; one without
    # a dtype (stored as plain zstd) and one without a base.
    items = [(b, "F32", base) for b, base in zip(second, base_ids)] + [(b"\x01" * 999, None, None), (second[0][::-1], "F32", None)]
    want = [one.put_ex(TENSOR, body, dtype=dtype, delta_base=base) for body, dtype, base in items]
    with ThreadPoolExecutor(workers) as pool:
        got = many.put_tensors(items, pool, workers)
    assert got == want
    assert all(created for _, created in got)
    assert _records(many, [oid for oid, _ in got]) == _records(one, [oid for oid, _ in want])
    for (oid, _), (body, _, _) in zip(got, items):
        assert many.read(oid) == (TENSOR, bytes(body))


def test_a_tensor_twice_in_one_call_is_stored_once(tmp_path):
    store = _store(tmp_path / "objects")
    body = _tensors(3, n=1)[0]
    with ThreadPoolExecutor(2) as pool:
        got = store.put_tensors([(body, "F32", None), (body, "F32", None)], pool, 2)
    oid = hash_object(TENSOR, body)
    assert got == [(oid, True), (oid, False)]
    assert store.read(oid) == (TENSOR, body)


def test_tensors_already_stored_are_not_written_again(tmp_path):
    store = _store(tmp_path / "objects")
    bodies = _tensors(4, n=3)
    store.put_ex(TENSOR, bodies[1], dtype="F32")
    before = _records(store, [hash_object(TENSOR, bodies[1])])
    got = store.put_tensors([(b, "F32", None) for b in bodies])
    assert [created for _, created in got] == [True, False, True]
    assert _records(store, [got[1][0]]) == before


def _child_runs_a_task(queue) -> None:
    from adapterhub import snapshot

    queue.put(snapshot.codec_pool().submit(lambda: "ran").result(timeout=20))


def test_a_forked_child_gets_its_own_codec_pool():
    """The parent's pool threads do not exist in a forked child (ah import forks its
    workers): a task submitted there must still run, not wait forever."""
    import multiprocessing

    from adapterhub import snapshot

    assert snapshot.codec_pool().submit(lambda: 1).result() == 1  # the parent's threads exist
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_runs_a_task, args=(queue,))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    assert queue.get(timeout=5) == "ran"


@pytest.mark.parametrize("value, want", [("3", 3), ("1", 1), ("four", None), ("0", None), ("-2", None), ("", None)])
def test_ah_threads_sets_the_codec_threads_and_a_bad_value_is_ignored(value, want):
    import os
    import subprocess
    import sys

    code = "import warnings, os; warnings.simplefilter('always'); from adapterhub import snapshot; print(snapshot.WORKERS)"
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, AH_THREADS=value), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    default = min(4, os.cpu_count() or 1)
    assert int(out.stdout) == (want or default)
    assert ("AH_THREADS" in out.stderr) == (want is None and value != "")
