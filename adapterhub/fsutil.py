"""Crash-safe file writes.

Never write in place: bytes go to a temp file in the same folder, are fsynced, then
renamed over the target with os.replace (atomic on POSIX), and the folder is fsynced so
the rename itself survives a power cut. A killed process leaves at most a stray temp
file (named `.tmp-*`, ignored by every reader and removed by gc), never a half-written
object or ref.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path
from typing import Iterable

TMP_PREFIX = ".tmp-"


_sync_file_range = None  # libc's sync_file_range once looked up; False where there is none
_SYNC_FILE_RANGE_WRITE = 2


class NotARegularFile(OSError):
    """A FIFO, socket or device where the registry keeps a file."""


def open_regular(path) -> int:
    """A read-only descriptor of `path`, which must be a regular file. A FIFO put where an
    object or ref file belongs would block a plain open (or its read) forever: every
    command, `ah fsck` included, hung on it. Opened without blocking, checked, and refused
    (NotARegularFile) unless it is a regular file."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotARegularFile(errno.EINVAL, "not a regular file", str(path))
    except BaseException:
        os.close(fd)
        raise
    return fd


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing `length` bytes at `offset` of `fd` to disk now,
    without waiting (Linux `sync_file_range(SYNC_FILE_RANGE_WRITE)`); a no-op elsewhere.

    Durability still comes only from the fsync that follows: this makes that fsync short,
    the disk writing the first megabytes while the rest are still being produced (see
    pack.WRITEBACK_STEP for what it saves on a pack).
    """
    global _sync_file_range
    if _sync_file_range is None:
        try:
            import ctypes

            fn = ctypes.CDLL(None, use_errno=True).sync_file_range
            fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
            _sync_file_range = fn
        except (ImportError, OSError, AttributeError):
            _sync_file_range = False
    if _sync_file_range and length > 0:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)  # errors: only speed is at stake


# One writev per this many bytes gathered: on this machine 60 MB written as 32 kB chunks
# took 50-57 ms with a write() each and 19 ms gathered into ~1 MiB writev calls (the cost
# is per system call, not per byte). That suits pack records, which were encoded a while
# before; 12 commits of 5 MB: 92 MB/s unbatched, 99 at 256 kB, 101 at 1 MiB.
GATHER_BYTES = 1 << 20
# For files written as their pieces come: when a checkout decoded one tensor at a time, a
# tensor was still in the CPU cache and holding a MiB of them until one writev made it
# slower (fp32 171 MB/s against 237 written one by one), while pairs of small pieces still
# saved calls: 64 kB gave 245 (fp32) and 151 (bf16, 139 one by one) (/tmp/ovh/gath.py,
# load 2.5-2.9). A checkout now decodes a batch of tensors in one native call before it
# writes any, and hands the batch over as one list (`write_all`): one writev for a 2.4 MB
# file instead of 35 saved 0.5-1.1 ms of its 8-9 (/tmp/h19/wrab.py, load 1.7-1.8).
FILE_GATHER_BYTES = 64 << 10
_IOV_MAX = 1024


class GatherWriter:
    """Buffers for one file descriptor, written with one `os.writev` per ~GATHER_BYTES.

    Pack records and checked-out tensors come as many 30-100 kB pieces; a system call
    each cost more than copying the bytes. `limit` is how much waits for one call
    (GATHER_BYTES; FILE_GATHER_BYTES for files written as their pieces are decoded). Nothing is copied here: the writer keeps a
    reference to each buffer until it is written, so a caller must not change a buffer
    after handing it over (bytes never change; `write(..., now=True)` for one that may).
    """

    def __init__(self, fd: int, limit: int | None = None):
        self.fd = fd
        self.limit = GATHER_BYTES if limit is None else limit
        self._bufs: list = []
        self._size = 0

    def write(self, data, *, now: bool = False) -> int:
        n = data.nbytes if isinstance(data, memoryview) else len(data)
        if n:
            self._bufs.append(data)
            self._size += n
            if now or self._size >= self.limit or len(self._bufs) >= _IOV_MAX:
                self.flush()
        return n

    def write_all(self, pieces: list) -> None:
        """Write a list of bytes with what waits, in one writev (IOV_MAX pieces a call):
        a checkout's batch of tensors, decoded already, gains nothing from smaller calls."""
        self._bufs.extend(pieces)
        self.flush()

    def flush(self) -> None:
        bufs = self._bufs
        while bufs:
            done = os.writev(self.fd, bufs[:_IOV_MAX])
            # A regular file takes everything but after a signal or on a full disk; then
            # go on from the first byte not written.
            i = 0
            while i < len(bufs):
                n = bufs[i].nbytes if isinstance(bufs[i], memoryview) else len(bufs[i])
                if done < n:
                    break
                done -= n
                i += 1
            bufs = bufs[i:]
            if bufs and done:
                bufs[0] = memoryview(bufs[0]).cast("B")[done:]
        self._bufs = []
        self._size = 0


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(
    path: Path, chunks: bytes | Iterable[bytes | list[bytes]], *, durable: bool = True, user_file: bool = False
) -> None:
    """Write `chunks` to `path` atomically (temp file + fsync + rename + folder fsync).

    `chunks` is bytes, or an iterable of bytes (small ones gathered into fewer system
    calls) and lists of bytes (each list written at once, with what waits before it).

    The rename replaces whatever is at `path`, a symlink included, without following it.
    mkstemp creates files 0600, right for registry internals; a `user_file` (a checked-out
    adapter file) gets the usual 0666 & ~umask, as `cp` or `save_pretrained` would give it.
    """
    StagedFile(path, chunks, durable=durable, user_file=user_file).publish()


class StagedFile:
    """atomic_write in two steps: the constructor writes `chunks` under a temp name next to
    `path` (fsynced when `durable`), `publish` renames it into place and fsyncs the folder;
    `discard` removes it. A writer that makes several files visible in an order (a pack,
    then its index) stages them all first, so their data fsyncs run back to back before
    the first rename instead of one rename's folder fsync sitting between them.
    """

    def __init__(
        self, path: Path, chunks: bytes | Iterable[bytes | list[bytes]], *, durable: bool = True, user_file: bool = False
    ):
        self.path = Path(path)
        self.durable = durable
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=self.path.parent)
        self._tmp: str | None = tmp
        try:
            try:
                if user_file:
                    os.fchmod(fd, 0o666 & ~_umask())
                out = GatherWriter(fd, FILE_GATHER_BYTES)
                if isinstance(chunks, (bytes, bytearray, memoryview)):
                    out.write(chunks, now=True)
                else:
                    for chunk in chunks:
                        if isinstance(chunk, list):
                            out.write_all(chunk)
                        else:
                            # Only bytes wait to be gathered: a producer may refill anything else.
                            out.write(chunk, now=not isinstance(chunk, bytes))
                    out.flush()
                if durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            self.discard()
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
            raise

    def publish(self) -> None:
        try:
            os.replace(self._tmp, self.path)
        except BaseException:
            self.discard()
            raise
        self._tmp = None
        if self.durable:
            fsync_dir(self.path.parent)

    def discard(self) -> None:
        if self._tmp is not None:
            tmp, self._tmp = self._tmp, None
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
