"""Progress bars for long work, shown only on a terminal so scripts and pipes stay clean."""

from __future__ import annotations

import contextlib
import sys


@contextlib.contextmanager
def byte_progress(total: int, desc: str):
    """Yield a callback taking a byte count; draws a tqdm bar on a TTY for big jobs."""
    if not sys.stderr.isatty() or total < (32 << 20):
        yield None
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False) as bar:
        yield bar.update


@contextlib.contextmanager
def count_progress(total: int, desc: str, unit: str = "adapter"):
    """Yield a callback taking an item count; a tqdm bar on a TTY when there are many items."""
    if not sys.stderr.isatty() or total < 100:
        yield None
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit=unit, leave=False) as bar:
        yield bar.update
