"""Core benchmark: adapterhub vs git + git-lfs vs plain copies, side by side in one run.

Two scenarios, each on real PEFT LoRA adapters built locally (no downloads):

  single    one ~100 MB adapter (LoRA r=64 on every linear layer of a tiny Llama), committed
            once and checked out once;
  training  N checkpoints of a real CPU training run (a few AdamW steps between saves),
            committed in order and each checked out again.

For every tool it measures commit time, checkout time and the bytes kept on disk, checks
every checkout against its input by sha256 (a difference fails the run with exit 1), prints
one table per scenario and writes the same figures to benchmarks/results/core.json.

    python3 benchmarks/bench_core.py            # full size, a few minutes on 2 cores
    python3 benchmarks/bench_core.py --quick    # small sizes, under a minute (smoke test)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402  (the path line above makes the sibling module importable)
    ALL_TOOLS,
    MB,
    RESULTS_DIR,
    BenchmarkError,
    code_version,
    ToolRun,
    dir_size,
    format_table,
    human_bytes,
    machine_info,
    ratio,
    run_tool,
    save_random_adapter,
    stopwatch,
    train_revisions,
    write_json,
)

TABLE_HEADERS = (
    "tool", "commit s", "s/rev", "checkout s", "s/rev", "stored",
    "stored/git-lfs", "stored/copy", "commit/git-lfs", "checkout/git-lfs",
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes for a smoke test (< 1 minute)")
    p.add_argument("--size-mb", type=float, help="size of the single adapter (default 100; --quick: 4)")
    p.add_argument("--revisions", type=int, help="checkpoints in the training run (default 10; --quick: 3)")
    p.add_argument("--train-size-mb", type=float, help="size of the trained adapter (default 20; --quick: 1)")
    p.add_argument("--steps-per-revision", type=int, help="optimizer steps between checkpoints (default 3; --quick: 1)")
    p.add_argument("--json", type=Path, default=RESULTS_DIR / "core.json", help="where to write the results")
    p.add_argument("--workdir", type=Path, help="scratch folder (default: a temporary one, removed afterwards)")
    args = p.parse_args(argv)
    defaults = dict(size_mb=4, revisions=3, train_size_mb=1, steps_per_revision=1) if args.quick else dict(
        size_mb=100, revisions=10, train_size_mb=20, steps_per_revision=3
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.revisions < 1 or args.size_mb <= 0 or args.train_size_mb <= 0 or args.steps_per_revision < 1:
        p.error("sizes must be positive and --revisions/--steps-per-revision at least 1")
    return args


def summarize(runs: list[ToolRun]) -> list[dict]:
    """Per-tool figures plus ratios against git-lfs and plain copy (> 1 means more)."""
    by_name = {r.tool: r for r in runs}
    lfs, copy = by_name["git-lfs"], by_name["plain copy"]
    out = []
    for r in runs:
        out.append({
            "tool": r.tool,
            "revisions": r.revisions,
            "commit_s_total": r.commit_total,
            "commit_s_per_revision": r.commit_total / r.revisions,
            "commit_s": r.commit_s,
            "checkout_s_total": r.checkout_total,
            "checkout_s_per_revision": r.checkout_total / r.revisions,
            "checkout_s": r.checkout_s,
            "stored_bytes": r.stored_bytes,
            "stored_vs_git_lfs": ratio(r.stored_bytes, lfs.stored_bytes),
            "stored_vs_plain_copy": ratio(r.stored_bytes, copy.stored_bytes),
            "commit_time_vs_git_lfs": ratio(r.commit_total, lfs.commit_total),
            "commit_time_vs_plain_copy": ratio(r.commit_total, copy.commit_total),
            "checkout_time_vs_git_lfs": ratio(r.checkout_total, lfs.checkout_total),
            "checkout_time_vs_plain_copy": ratio(r.checkout_total, copy.checkout_total),
        })
    return out


def table(rows: list[dict]) -> str:
    return format_table(TABLE_HEADERS, [
        (
            r["tool"], r["commit_s_total"], r["commit_s_per_revision"], r["checkout_s_total"],
            r["checkout_s_per_revision"], human_bytes(r["stored_bytes"]), r["stored_vs_git_lfs"],
            r["stored_vs_plain_copy"], r["commit_time_vs_git_lfs"], r["checkout_time_vs_git_lfs"],
        )
        for r in rows
    ])


def run_scenario(name: str, folders: list[Path], scratch: Path) -> list[ToolRun]:
    """Every tool on the same input folders, each in its own fresh folder."""
    runs = []
    for tool_cls in ALL_TOOLS:
        base = scratch / name / tool_cls.slug()
        runs.append(run_tool(tool_cls(base / "tool"), folders, base / "checkouts"))
        shutil.rmtree(base / "checkouts")  # keep the scratch disk use to one tool's checkouts
    return runs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = machine_info()
    print(f"bench_core: {info['cpus']} CPUs, load average {info['loadavg_1_5_15']} at start", flush=True)
    scratch = Path(tempfile.mkdtemp(prefix="ah-bench-core-", dir=args.workdir))
    try:
        with stopwatch() as t_inputs:
            single_dir = scratch / "inputs" / "single"
            single_spec = save_random_adapter(single_dir, int(args.size_mb * MB))
            train_spec, train_dirs = train_revisions(
                scratch / "inputs" / "training", args.revisions, int(args.train_size_mb * MB),
                steps_per_revision=args.steps_per_revision,
            )
        print(f"inputs built in {t_inputs.seconds:.1f} s (untimed below)", flush=True)
        scenarios = {
            "single": ([single_dir], single_spec,
                       f"one adapter, {human_bytes(dir_size(single_dir))}"),
            "training": (train_dirs, train_spec,
                         f"{len(train_dirs)} checkpoints x {human_bytes(dir_size(train_dirs[0]))}, "
                         f"{args.steps_per_revision} AdamW steps apart"),
        }
        results = {"machine": info, "code": code_version(), "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   "scenarios": {}}
        for name, (folders, spec, label) in scenarios.items():
            with stopwatch() as t:
                rows = summarize(run_scenario(name, folders, scratch))
            results["scenarios"][name] = {
                "description": label,
                "input_bytes_per_revision": dir_size(folders[0]),
                "input_bytes_total": sum(dir_size(f) for f in folders),
                "model": {"hidden": spec.hidden, "intermediate": spec.intermediate, "layers": spec.layers,
                          "lora_rank": spec.rank, "adapter_params": spec.adapter_params},
                "wall_s": t.seconds,
                "tools": rows,
            }
            print(f"\n[{name}] {label}; LoRA r={spec.rank} on a {spec.layers}-layer, "
                  f"{spec.hidden}-wide Llama; all checkouts sha256-identical")
            print(table(rows), flush=True)
    except BenchmarkError as exc:
        print(f"\nBENCHMARK FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    results["machine"]["loadavg_1_5_15_at_end"] = [round(x, 2) for x in os.getloadavg()]
    write_json(args.json, results)
    print(f"\nresults written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
