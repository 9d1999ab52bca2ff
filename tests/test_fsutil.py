"""fsutil: gathered writes land byte for byte whatever the kernel takes per call, and
atomic_write never reuses a buffer a producer may refill."""

from __future__ import annotations

import os
from array import array

import pytest

from adapterhub import fsutil
from adapterhub.fsutil import GatherWriter, atomic_write


def _pieces(n: int, size: int) -> list[bytes]:
    return [bytes([i % 251]) * (size + i % 7) for i in range(n)]


@pytest.mark.parametrize("limit", [None, 1, 4097, 70_000])
def test_gathered_writes_survive_short_writes(tmp_path, monkeypatch, limit):
    # writev may take fewer bytes than offered (a signal, a full disk): the rest follows,
    # from the first byte not written, including the middle of a buffer.
    real = os.writev

    def short(fd, bufs):
        if limit is None:
            return real(fd, bufs)
        flat, size = [], 0
        for b in bufs:  # just enough of the front buffers to take `limit` bytes
            flat.append(bytes(memoryview(b).cast("B")))
            size += len(flat[-1])
            if size >= limit:
                break
        return os.write(fd, b"".join(flat)[:limit])

    monkeypatch.setattr(os, "writev", short)
    # More than IOV_MAX buffers and several flushes; fewer bytes where writes are tiny.
    pieces = _pieces(3000, 700) if limit is None or limit > 4096 else _pieces(40, 300)
    floats = array("f", range(1000))  # a memoryview counts bytes, not elements
    path = tmp_path / "out"
    fd = os.open(path, os.O_CREAT | os.O_WRONLY)
    out = GatherWriter(fd)
    for p in pieces:
        out.write(p)
    out.write(memoryview(floats))
    out.write(b"")
    out.flush()
    os.close(fd)
    assert path.read_bytes() == b"".join(pieces) + floats.tobytes()


def test_gather_writer_holds_at_most_about_a_mebibyte(tmp_path, monkeypatch):
    calls = []
    real = os.writev
    monkeypatch.setattr(os, "writev", lambda fd, bufs: calls.append(sum(len(b) for b in bufs)) or real(fd, bufs))
    fd = os.open(tmp_path / "out", os.O_CREAT | os.O_WRONLY)
    out = GatherWriter(fd)
    for p in _pieces(100, 32_000):
        out.write(p)
    out.flush()
    os.close(fd)
    assert sum(calls) == os.path.getsize(tmp_path / "out")
    assert len(calls) <= 4 and max(calls) < fsutil.GATHER_BYTES + 40_000


def test_atomic_write_writes_a_refilled_buffer_before_asking_for_the_next(tmp_path):
    # A producer that refills one bytearray must get every fill written, not the last one
    # several times: only immutable bytes are kept for a later writev.
    buf = bytearray(4)

    def refill():
        for i in range(5):
            buf[:] = bytes([i]) * 4
            yield buf
            yield b"|"

    atomic_write(tmp_path / "f", refill(), durable=False)
    assert (tmp_path / "f").read_bytes() == b"".join(bytes([i]) * 4 + b"|" for i in range(5))


def test_atomic_write_failure_leaves_no_temp_file(tmp_path):
    def broken():
        yield b"x" * 10
        raise RuntimeError("producer failed")

    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "f", broken())
    assert os.listdir(tmp_path) == []


def test_atomic_write_gathers_small_pieces_but_not_a_mebibyte(tmp_path, monkeypatch):
    # Files are written as their pieces are decoded: small pieces share a call, big ones
    # go out within FILE_GATHER_BYTES (still in the CPU cache), never a MiB at a time.
    calls = []
    real = os.writev
    monkeypatch.setattr(os, "writev", lambda fd, bufs: calls.append(sum(len(b) for b in bufs)) or real(fd, bufs))
    atomic_write(tmp_path / "small", iter(_pieces(100, 100)), durable=False)
    assert len(calls) <= 2 and sum(calls) == os.path.getsize(tmp_path / "small")
    calls.clear()
    pieces = _pieces(100, 43_000)
    atomic_write(tmp_path / "big", iter(pieces), durable=False)
    assert (tmp_path / "big").read_bytes() == b"".join(pieces)
    assert max(calls) < fsutil.FILE_GATHER_BYTES + 43_100 and len(calls) >= 40


def test_a_staged_file_is_invisible_until_published_and_discard_leaves_nothing(tmp_path):
    from adapterhub.fsutil import StagedFile

    staged = StagedFile(tmp_path / "a", [b"one", b"two"])
    assert not (tmp_path / "a").exists() and len(os.listdir(tmp_path)) == 1  # only its temp file
    staged.publish()
    assert (tmp_path / "a").read_bytes() == b"onetwo" and os.listdir(tmp_path) == ["a"]
    dropped = StagedFile(tmp_path / "b", b"never")
    dropped.discard()
    dropped.discard()  # twice is harmless
    assert os.listdir(tmp_path) == ["a"]
