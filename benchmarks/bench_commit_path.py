"""Where a commit's and a checkout's time goes: the codec alone, then the whole path.

bench_storage.py compares tools end to end; this one isolates adapterhub's own stages on
the same inputs (12 fp32 checkpoints of a LoRA r=16 training run, and the same cast to
bf16), in process, so that a change to one stage can be measured A/B:

- codec: every tensor of every checkpoint as a delta against the previous checkpoint's
  (the first as planes), encoded by the native batch call on 1 and on 2 threads;
- commit: `Registry.commit` of the 12 checkpoints into a fresh registry, `--rounds`
  times; per revision the fastest round counts (less noise from a shared machine);
- checkout: `Registry.checkout` of each revision in order, right after the commits;
- command line: `ah commit` of the same checkpoints, a new process each (how a training
  script that shells out commits): a fresh process starts with an empty base cache, so
  it reads its delta bases (the parent's tensors, a whole chain deep) from the store;
  beside it `ah --version`, the start-up every command pays;
- CPU: what a commit costs in CPU time (all the process's threads, and its `git`
  children: provenance), against ZipNN compressing the same files on one thread. Wall
  times on a shared 2-core machine swing by 2x; CPU time much less, and it says what
  two cores can do at best: a commit can only keep up with ZipNN's two-thread throughput
  if its CPU time per checkpoint is at most about twice ZipNN's one-thread CPU time;
- fixed cost: what a commit of a tiny adapter costs (wall, CPU, git CPU, fsyncs), with
  and without the git processes of provenance, beside ZipNN's whole compression of one
  checkpoint: what no commit can go below, whatever the codec does.

    python3 benchmarks/bench_commit_path.py            # ~1 minute on 2 cores
    python3 benchmarks/bench_commit_path.py --quick    # ~20 s (smaller checkpoints)

Run it from two trees (PYTHONPATH=tree) alternately to compare versions.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_storage import to_bf16  # noqa: E402
from common import MB, dir_size, format_table, machine_info, train_revisions, write_json, RESULTS_DIR  # noqa: E402


def codec_mb_s(folders: list[Path], threads: int, reps: int) -> float | None:
    """MB/s of the native batch encoder over all tensors (deltas against the previous
    checkpoint's same-named tensor); None without the native codec."""
    from adapterhub import codec
    from adapterhub.encoding import kernels
    from adapterhub.encoding.chain import DeltaBase
    from adapterhub.objects import TENSOR, header
    from adapterhub.safetensors_file import parse_layout

    if getattr(kernels, "encode_records", None) is None:  # a tree from before the batch encoder
        return None
    jobs, size, previous = [], 0, {}
    for folder in folders:
        data = (folder / "adapter_model.safetensors").read_bytes()
        current = {}
        for span in parse_layout(data).tensors:
            body = data[span.start : span.end]
            base = DeltaBase("00" * 32, previous[span.name], 0) if span.name in previous else None
            job = codec._native_job(header(TENSOR, len(body)), body, span.dtype, base)
            if job is not None:
                jobs.append(job)
                size += len(body)
            current[span.name] = body
        previous = current
    start = time.perf_counter()
    for _ in range(reps):
        kernels.encode_records(jobs, threads)
    return size * reps / MB / (time.perf_counter() - start)


def _cpu_s() -> tuple[float, float]:
    """(CPU seconds of this process's threads, of its waited-for children) so far."""
    t = os.times()
    return t.user + t.system, t.children_user + t.children_system


def commit_and_checkout(folders: list[Path], work: Path, rounds: int) -> tuple[float, float, float, float]:
    """(commit MB/s, best round per revision; in-order checkout MB/s, last round; CPU ms
    per commit in process and in git children, lowest round)."""
    from adapterhub.registry import Registry

    logical = sum(dir_size(f) for f in folders)
    best = [float("inf")] * len(folders)
    checkout_s = 0.0
    cpu = (float("inf"), float("inf"))
    for r in range(rounds):
        registry = Registry.init(work / f"registry{r}")
        ids = []
        own0, kids0 = _cpu_s()
        for i, folder in enumerate(folders):
            start = time.perf_counter()
            ids.append(registry.commit(folder, f"revision {i}").id)
            best[i] = min(best[i], time.perf_counter() - start)
        own1, kids1 = _cpu_s()
        if own1 - own0 + kids1 - kids0 < sum(cpu) * len(folders) / 1e3:
            cpu = ((own1 - own0) / len(folders) * 1e3, (kids1 - kids0) / len(folders) * 1e3)
        checkout_s = 0.0
        for i, oid in enumerate(ids):
            start = time.perf_counter()
            registry.checkout(oid, work / f"out{r}-{i}")
            checkout_s += time.perf_counter() - start
        shutil.rmtree(work / f"registry{r}")
    return logical / MB / sum(best), logical / MB / checkout_s, cpu[0], cpu[1]


def cli_commit_ms(folders: list[Path], work: Path) -> tuple[float, float, float]:
    """(mean ms of `ah commit` a process each, over the sequence; the slowest one, at the
    deepest chain; fastest of 3 `ah --version`), in a fresh registry."""
    ah = [sys.executable, "-m", "adapterhub.cli.main", "--registry", str(work)]
    # As installed: modules load from their cached bytecode (written here first if missing),
    # not compiled at every start as under PYTHONDONTWRITEBYTECODE.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    run = lambda args: subprocess.run(ah + args, check=True, capture_output=True, env=env)  # noqa: E731
    import adapterhub

    subprocess.run([sys.executable, "-m", "compileall", "-q", str(Path(adapterhub.__file__).parent)], env=env, capture_output=True)
    run(["init"])
    times = []
    for i, folder in enumerate(folders):
        start = time.perf_counter()
        run(["commit", str(folder), "-m", f"revision {i}"])
        times.append(time.perf_counter() - start)
    version = []
    for _ in range(3):
        start = time.perf_counter()
        run(["--version"])
        version.append(time.perf_counter() - start)
    return sum(times) / len(times) * 1e3, max(times) * 1e3, min(version) * 1e3


def fixed_commit_cost(work: Path, commits: int = 30) -> dict:
    """What a commit costs whatever the adapter's size: `commits` revisions of a tiny
    adapter (two 4 kB tensors and a config) in process; median wall ms, CPU ms in this
    process and in its git children (provenance), fsyncs (durability) per commit, with
    the git provenance and without it (author and record collected once, reused)."""
    import statistics

    import numpy as np
    from safetensors.numpy import save_file

    from adapterhub import provenance
    from adapterhub.registry import Registry

    rng = np.random.default_rng(0)
    folders = []
    for i in range(commits):
        folder = work / "tiny" / f"r{i:02d}"
        folder.mkdir(parents=True)
        save_file({"a": rng.standard_normal((16, 64)).astype(np.float32), "b": rng.standard_normal((64, 16)).astype(np.float32)},
                  str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 16}')
        folders.append(folder)
    fsyncs = [0]
    real_fsync, real_collect, real_author = os.fsync, provenance.collect, provenance.default_author

    def counted_fsync(fd):
        fsyncs[0] += 1
        return real_fsync(fd)

    out = {}
    try:
        os.fsync = counted_fsync
        for mode in ("git", "no git"):
            if mode == "no git":
                record, author = real_collect(folders[0]), real_author()
                provenance.collect = lambda *a, **k: record
                provenance.default_author = lambda: author
            registry = Registry.init(work / f"tiny-{mode.replace(' ', '-')}")
            walls, fsyncs[0] = [], 0
            own0, kids0 = _cpu_s()
            for i, folder in enumerate(folders):
                start = time.perf_counter()
                registry.commit(folder, f"revision {i}")
                walls.append(time.perf_counter() - start)
            own1, kids1 = _cpu_s()
            out[mode] = dict(wall_ms=statistics.median(walls) * 1e3, cpu_ms=(own1 - own0) / commits * 1e3,
                             git_cpu_ms=(kids1 - kids0) / commits * 1e3, fsyncs=fsyncs[0] / commits)
    finally:
        os.fsync, provenance.collect, provenance.default_author = real_fsync, real_collect, real_author
    return out


def zipnn_ms(folders: list[Path], dtype: str, threads: int, clock=time.process_time, reps: int = 3) -> float | None:
    """Milliseconds by `clock` (CPU time by default; time.perf_counter for wall time) that
    ZipNN on `threads` threads, in memory, takes to compress one checkpoint's weights
    file, lowest of `reps` passes; None without zipnn."""
    try:
        from zipnn import ZipNN
    except ImportError:
        return None
    files = [(f / "adapter_model.safetensors").read_bytes() for f in folders]
    zipnn = ZipNN(input_format="byte", bytearray_dtype=dtype, threads=threads)
    best = float("inf")
    for _ in range(reps):
        start = clock()
        for data in files:
            zipnn.compress(data)
        best = min(best, clock() - start)
    return best / len(files) * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 MB checkpoints, 4 of them, 2 rounds")
    p.add_argument("--rounds", type=int, help="commit rounds (default 3)")
    p.add_argument("--json", type=Path, default=RESULTS_DIR / "commit_path.json")
    args = p.parse_args(argv)
    revisions, size_mb, rounds = (4, 1, 2) if args.quick else (12, 5, 3)
    rounds = args.rounds or rounds
    work = Path(tempfile.mkdtemp(prefix="ah-bench-commit-path-"))
    try:
        _, fp32 = train_revisions(work / "fp32", revisions, int(size_mb * MB), rank=16)
        bf16 = to_bf16(fp32, work / "bf16")
        rows, cpu_rows, cli_rows, results = [], [], [], {"machine": machine_info(), "revisions": revisions}
        zipnn_wall = {}
        fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        for label, folders, dtype in (("fp32", fp32, "float32"), ("bf16", bf16, "bfloat16")):
            one, two = codec_mb_s(folders, 1, 3), codec_mb_s(folders, 2, 3)
            commit, checkout, cpu_own, cpu_git = commit_and_checkout(folders, work / f"run-{label}", rounds)
            zipnn_cpu = zipnn_ms(folders, dtype, threads=1)
            cli_mean, cli_max, start_ms = cli_commit_ms(folders, work / f"cli-{label}")
            results[label] = dict(codec_1_thread_mb_s=one, codec_2_threads_mb_s=two, commit_mb_s=commit, checkout_mb_s=checkout,
                                  commit_cpu_ms=cpu_own, commit_git_cpu_ms=cpu_git, zipnn_cpu_ms=zipnn_cpu,
                                  cli_commit_ms=cli_mean, cli_commit_max_ms=cli_max, cli_start_ms=start_ms)
            cli_rows.append([label, fmt(cli_mean), fmt(cli_max), fmt(start_ms)])
            rows.append([label, fmt(one), fmt(two), fmt(commit), fmt(checkout)])
            ratio = None if zipnn_cpu is None else (cpu_own + cpu_git) / zipnn_cpu
            cpu_rows.append([label, fmt(cpu_own), fmt(cpu_git), fmt(zipnn_cpu), fmt(ratio)])
            results[label]["zipnn_wall_ms"] = zipnn_wall[label] = zipnn_ms(folders, dtype, os.cpu_count() or 1, time.perf_counter)
        fixed = results["fixed_commit_cost"] = fixed_commit_cost(work)
        print(f"{revisions} checkpoints of {size_mb} MB (fp32), in process; commit: best of {rounds} rounds per revision")
        print(format_table(["sequence", "codec MB/s (1 thread)", "codec MB/s (2)", "commit MB/s", "checkout MB/s"], rows))
        print("\nCPU per checkpoint (ms): a commit's, in this process and in its git children, and ZipNN's (1 thread)")
        print(format_table(["sequence", "commit CPU", "git CPU", "ZipNN CPU", "commit / ZipNN"], cpu_rows))
        print("\n`ah commit` from the command line, a new process per checkpoint (ms of wall time)")
        print(format_table(["sequence", "mean", "slowest (deepest chain)", "`ah --version`"], cli_rows))
        print("\nWhat every commit costs whatever its size: a tiny adapter (two 4 kB tensors), in process, median of 30")
        print(format_table(["provenance", "wall ms", "CPU ms", "git CPU ms", "fsyncs"],
                           [[mode, fmt(v["wall_ms"]), fmt(v["cpu_ms"]), fmt(v["git_cpu_ms"]), fmt(v["fsyncs"])]
                            for mode, v in fixed.items()]))
        print("ZipNN's whole compression of one checkpoint, both cores (ms of wall time): "
              + ", ".join(f"{label} {fmt(ms)}" for label, ms in zipnn_wall.items()))
        write_json(args.json, results)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
