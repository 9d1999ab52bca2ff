"""codec.encode_tensors and its native batch call (`_native.encode_records`).

A commit's tensors are coded in one C call on kept worker threads. That call makes the
same choices as codec.encode_tensor (delta, extrapolated delta, planes, the shorter on a
tie the delta), so the records must be byte for byte encode_tensor's whatever the thread
count, when several Python threads call at once, in a forked child, and through the
Python fallback; bad jobs are refused with clear errors.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from adapterhub import codec
from adapterhub.encoding import kernels
from adapterhub.encoding.chain import MAX_CHAIN, DeltaBase
from adapterhub.objects import TENSOR, header

native = kernels.encode_records
needs_native = pytest.mark.skipif(native is None, reason="the C extension or libzstd.so.1 is missing")

WIDTH = {"F32": 4, "BF16": 2, "F16": 2, "I32": 4, "F64": 8, "U8": 1, None: 1}


def _as(values: np.ndarray, dtype: str | None) -> bytes:
    """Float values as the bytes of a safetensors dtype (BF16: the top half of F32)."""
    if dtype == "BF16":
        return (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes()
    if dtype == "I32":
        return (values * 1e6).astype(np.int32).tobytes()
    numpy_type = {"F32": np.float32, "F16": np.float16, "F64": np.float64}.get(dtype)
    return values.astype(numpy_type).tobytes() if numpy_type else (values * 1e4).astype(np.int8).tobytes()


def _jobs(seed: int, count: int = 160) -> list[tuple]:
    """A mix of what commits meet: every dtype, odd lengths with tails, small tensors, no
    base, a base of another length, a full chain, and a base with an extrapolation source
    (weights moving steadily, so that extrapolating sometimes pays; and a source of another
    length or without its id)."""
    rng = random.Random(seed)
    gen = np.random.default_rng(seed)
    jobs = []
    for _ in range(count):
        dtype = rng.choice(list(WIDTH))
        n = rng.choice([1, 500, 1100, 3000, 9000, 20000])
        start = gen.standard_normal(n) * 0.02
        step = gen.standard_normal(n) * rng.choice([1e-5, 1e-3])
        noise = gen.standard_normal(n) * rng.choice([0, 1e-6, 1e-3])
        tail = os.urandom(rng.choice([0, 0, 0, 1, 3]))
        prev_body, base_body, body = (_as(start + k * step + (noise if k == 2 else 0), dtype) + tail for k in range(3))
        base = None
        if rng.random() < 0.85:
            if rng.random() < 0.05:
                base_body = base_body[:-1]
            prev = prev_oid = None
            if rng.random() < 0.7:
                prev = prev_body if rng.random() < 0.9 else prev_body[:-1]
                prev_oid = os.urandom(32).hex() if rng.random() < 0.9 else None
            depth = rng.choice([0, 1, 3, MAX_CHAIN - 1, MAX_CHAIN])
            base = DeltaBase(os.urandom(32).hex(), base_body, depth, prev, prev_oid)
        jobs.append((header(TENSOR, len(body)), memoryview(body), dtype, base))
    return jobs


def _reference(jobs) -> list[bytes]:
    return [codec.encode_tensor(*job) for job in jobs]


@needs_native
@pytest.mark.parametrize("threads", [1, 2, 4])
def test_batch_records_are_encode_tensors_byte_for_byte(threads):
    jobs = _jobs(threads)
    want = _reference(jobs)
    assert codec.encode_tensors(jobs, threads) == want
    # The batch covered each kind of record it can choose, and read back.
    encodings = {record[codec.ENCODING_AT] for record, job in zip(want, jobs) if codec._native_job(*job) is not None}
    assert {codec.ENC_PLANES, codec.ENC_DELTA, codec.ENC_EXTRAPOLATED} <= encodings
    bases = {job[3].oid: job[3].body for job in jobs if job[3] is not None}
    bases.update({job[3].prev_oid: job[3].prev for job in jobs if job[3] is not None and job[3].prev_oid})
    for (head, body, _, _), record in zip(jobs, want):
        assert codec.decode("x", record, lambda oid, _budget: bases[oid]) == head + bytes(body)


@needs_native
def test_python_threads_calling_at_once_each_get_their_records():
    """One batch runs on the kept workers at a time; a caller that finds them busy codes
    its batch alone. Either way every caller gets its own records."""
    batches = [_jobs(10 + k, 60) for k in range(4)]
    want = [_reference(jobs) for jobs in batches]
    got: list = [None] * len(batches)

    def run(k):
        for _ in range(3):
            got[k] = codec.encode_tensors(batches[k], 2)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == want


def _child_encodes(queue, jobs, want):
    queue.put(codec.encode_tensors(jobs, 2) == want)


@needs_native
def test_a_forked_child_codes_without_the_parents_workers():
    """The parent's worker threads do not exist after fork(): the child must start its
    own instead of waiting for them forever (ah import forks its workers)."""
    jobs = _jobs(20, 40)
    want = _reference(jobs)
    assert codec.encode_tensors(jobs, 2) == want  # the parent's workers now exist
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_encodes, args=(queue, jobs, want))
    child.start()
    child.join(60)
    if child.exitcode is None:
        child.kill()
    assert child.exitcode == 0
    assert queue.get(timeout=5) is True


@pytest.mark.parametrize("threads", [1, 2])
def test_the_python_path_writes_the_same_records(monkeypatch, threads):
    """Without the native batch (numpy kernels, no libzstd) encode_tensors runs
    encode_tensor itself, on the pool's threads when it has one."""
    jobs = _jobs(30, 40)
    want = _reference(jobs)
    monkeypatch.setattr(kernels, "encode_records", None)
    with ThreadPoolExecutor(2) as pool:
        assert codec.encode_tensors(jobs, threads, pool) == want


def _job(body=b"\0" * 8000, width=4, base=None, kind=1, delta_prefix=b"d", prev=None, ext_prefix=None):
    return (body, width, True, b"p", base, kind, delta_prefix, prev, ext_prefix, 0.0)


@needs_native
@pytest.mark.parametrize(
    "job, error, message",
    [
        ([b"x"], TypeError, "must be a tuple"),
        ((b"x", 4), TypeError, "a job is"),
        (_job(width=3), ValueError, "width"),
        (_job(base=b"\0" * 7999), ValueError, "length"),
        (_job(base=b"\0" * 8000, delta_prefix=None), TypeError, "delta_prefix"),
        (_job(prev=b"\0" * 8000), ValueError, "prev extrapolates a base"),
        (_job(base=b"\0" * 8000, kind=0, prev=b"\0" * 8000, ext_prefix=b"e"), ValueError, "prev extrapolates a base"),
        (_job(base=b"\0" * 8000, prev=b"\0" * 8000, ext_prefix=None), TypeError, "ext_prefix"),
        (_job(base=b"\0" * 8000, prev=b"\0" * 80), ValueError, "length"),
    ],
)
def test_bad_jobs_are_refused_clearly(job, error, message):
    good = _job()
    with pytest.raises(error, match=message):
        native([good, job, good], 2)
    # The refusal left nothing behind: the next batch is coded as usual.
    assert native([good, good], 2) == native([good], 1) * 2


@needs_native
def test_an_empty_batch_is_an_empty_list():
    assert native([], 2) == []
    assert codec.encode_tensors([], 2) == []
