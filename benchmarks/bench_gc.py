"""gc at scale: time and peak memory of `ah gc` on a registry of N imported small adapters.

Builds the scale part's registry (bench_storage.make_small_adapters + `ah import`'s API),
then runs gc twice, each in a fresh process on a copy of it: as imported, and after
dropping every 10th branch with `--prune now` (its objects aged a day first, as gc never
prunes anything under a minute old): a rewrite that prunes. Peak memory is sampled from
/proc/self/status every 20 ms (anonymous and file-backed resident pages).

    python3 benchmarks/bench_gc.py                   # 20,000 adapters (~2 minutes)
    python3 benchmarks/bench_gc.py --adapters 100000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_storage import make_small_adapters  # noqa: E402
from common import format_table, stopwatch  # noqa: E402


def _rss_kb() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("RssAnon", "RssFile")):
                key, value = line.split(":")
                out[key] = int(value.split()[0])
    return out


def measured_gc(root: Path, drop_every: int = 0) -> dict:
    """gc of the registry at `root` (optionally after deleting every `drop_every`-th
    packed branch), with its peak resident memory."""
    from adapterhub.gc import collect_garbage
    from adapterhub.packed_refs import PackedRefs, render as render_packed_refs
    from adapterhub.registry import Registry

    if drop_every:
        day_ago = time.time() - 86400
        for path in (root / ".ah" / "objects").rglob("*"):
            os.utime(path, (day_ago, day_ago))
        path = root / ".ah" / "packed-refs"
        kept = [e for i, e in enumerate(PackedRefs(path).iter_prefix("")) if i % drop_every != drop_every // 2]
        path.write_bytes(render_packed_refs(kept))
    reg = Registry.open(root)
    peak = {"RssAnon": 0, "RssFile": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            for key, value in _rss_kb().items():
                peak[key] = max(peak[key], value)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with stopwatch() as t:
        result = collect_garbage(reg.ah_dir, reg.store, reg.refs, grace_s=0 if drop_every else 14 * 86400)
    done.set()
    sampler.join()
    return dict(seconds=t.seconds, peak_anon_mb=peak["RssAnon"] / 1024, peak_file_mb=peak["RssFile"] / 1024,
                reachable=result.reachable, pruned=result.pruned)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapters", type=int, default=20000)
    p.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # internal: one gc, JSON out
    p.add_argument("--drop-every", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:
        print(json.dumps(measured_gc(args.measure, args.drop_every)))
        return 0
    from adapterhub.importer import import_folders
    from adapterhub.registry import Registry

    work = Path(tempfile.mkdtemp(prefix="ah-bench-gc-"))
    try:
        folders = make_small_adapters(work / "adapters", args.adapters)
        reg = Registry.init(work / "registry")
        with stopwatch() as imp:
            import_folders(reg.ah_dir, reg.store, reg.refs, folders, prefix="users/")
        shutil.rmtree(work / "adapters")
        rows = []
        for label, drop in (("as imported", 0), ("every 10th branch dropped, --prune now", 10)):
            copy = work / f"copy-{drop}"
            shutil.copytree(work / "registry", copy, symlinks=True)
            out = subprocess.run([sys.executable, __file__, "--measure", str(copy), "--drop-every", str(drop)],
                                 capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            shutil.rmtree(copy)
            rows.append([label, f"{r['seconds']:.1f} s", f"{r['peak_anon_mb']:.0f} MB", f"{r['peak_file_mb']:.0f} MB",
                         f"{r['reachable']:,}", f"{r['pruned']:,}"])
        print(f"{args.adapters:,} adapters imported in {imp.seconds:.1f} s; gc on copies of that registry:")
        print(format_table(("gc", "time", "peak anon RSS", "peak file RSS", "reachable", "pruned"), rows))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
