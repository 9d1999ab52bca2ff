"""Storage benchmark: bytes and speed of keeping a training run's checkpoints, and scale.

Part 1, checkpoints. A real CPU training run of a LoRA r=16 adapter on every linear layer
of a tiny Llama (AdamW, a few steps between saves) writes N checkpoints with
`PeftModel.save_pretrained` (fp32); the same checkpoints cast to bf16 form the second
sequence (what mixed-precision training saves from its fp32 master weights). Each
sequence is committed in order and every revision checked out again in order, three passes
(each revision's fastest kept; sha256-verified) by:
git + git-lfs, plain copies, zstd-3 per file, ZipNN per file (skipped if `zipnn` is not
installed), and adapterhub. One table per sequence, plus the single-adapter case (the
first checkpoint alone) and the issue's targets marked PASS/FAIL.

Part 2, scale. N small synthetic adapters (a few kB each; every adapter shares its A
matrices with many others, its B matrices are its own) are imported with `ah import`'s
API using both cores; then the import rate, stored bytes per adapter against its own
zstd-3 payload, and the time to resolve one branch and check out one adapter.

    python3 benchmarks/bench_storage.py                 # ~3-5 minutes on 2 cores
    python3 benchmarks/bench_storage.py --quick         # ~1 minute (smoke test)
    python3 benchmarks/bench_storage.py --scale-adapters 1000000   # the issue's full scale
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    MB,
    RESULTS_DIR,
    AdapterHubTool,
    BenchmarkError,
    GitLfsTool,
    PlainCopyTool,
    Tool,
    dir_size,
    format_table,
    human_bytes,
    machine_info,
    run_tool,
    stopwatch,
    train_revisions,
    tree_sha256,
    verify_checkout,
    write_json,
)

THREADS = os.cpu_count() or 1
# In-order checkouts are timed this many times per tool, each revision's fastest kept.
CHECKOUT_ROUNDS = 3


# --- the per-file compressors compared ---------------------------------------------------------
class _PerFileTool(Tool):
    """Each file of each revision compressed on its own into `store/revNN/<file>.<ext>`."""

    ext = "bin"

    def compress(self, path: Path) -> bytes:
        raise NotImplementedError

    def decompress(self, data: bytes, name: str) -> bytes:
        raise NotImplementedError

    def commit(self, folder: Path, index: int) -> str:
        dest = self.workdir / "store" / f"rev{index:02d}"
        for src in sorted(p for p in folder.rglob("*") if p.is_file()):
            out = dest / f"{src.relative_to(folder).as_posix()}.{self.ext}"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(self.compress(src))
        return str(dest)

    def checkout(self, handle: str, out: Path) -> None:
        src_root = Path(handle)
        for src in sorted(p for p in src_root.rglob("*") if p.is_file()):
            rel = src.relative_to(src_root).as_posix()[: -len(self.ext) - 1]
            target = out / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.decompress(src.read_bytes(), rel))

    def stored_bytes(self) -> int:
        return dir_size(self.workdir / "store")


class Zstd3Tool(_PerFileTool):
    """zstd level 3 of every file (multi-threaded, both cores)."""

    name = "zstd-3"
    ext = "zst"

    def __init__(self, workdir: Path):
        super().__init__(workdir)
        import zstandard

        self.cctx = zstandard.ZstdCompressor(level=3, threads=THREADS)
        self.dctx = zstandard.ZstdDecompressor()

    def compress(self, path: Path) -> bytes:
        return self.cctx.compress(path.read_bytes())

    def decompress(self, data: bytes, name: str) -> bytes:
        return self.dctx.decompress(data)


def _safetensors_dtype(data: bytes) -> str:
    """The dtype of a safetensors file's tensors, as ZipNN names it (one dtype per adapter file)."""
    import struct

    n = struct.unpack_from("<Q", data)[0]
    header = json.loads(data[8 : 8 + n])
    dtypes = {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    return {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}.get(dtypes.pop() if len(dtypes) == 1 else "", "float32")


class ZipNNTool(_PerFileTool):
    """ZipNN (byte grouping + Huffman/zstd, its AUTO method) of every safetensors file, as
    its file tool does (the whole file as bytes of the file's dtype, both cores); other
    files (config, README) with zstd-3."""

    name = "zipnn"
    ext = "znn"

    def __init__(self, workdir: Path):
        super().__init__(workdir)
        import zstandard
        from zipnn import ZipNN

        self._zipnn = {dt: ZipNN(input_format="byte", bytearray_dtype=dt, threads=THREADS) for dt in ("float32", "bfloat16", "float16")}
        self.zstd = zstandard.ZstdCompressor(level=3)
        self.dzstd = zstandard.ZstdDecompressor()

    def compress(self, path: Path) -> bytes:
        data = path.read_bytes()
        if path.suffix == ".safetensors":
            return b"Z" + self._zipnn[_safetensors_dtype(data)].compress(data)
        return b"S" + self.zstd.compress(data)

    def decompress(self, data: bytes, name: str) -> bytes:
        if data[:1] == b"S":
            return self.dzstd.decompress(data[1:])
        # The ZipNN header records the dtype; any instance decodes it.
        return bytes(self._zipnn["float32"].decompress(data[1:]))


def zipnn_available() -> bool:
    try:
        import zipnn  # noqa: F401
    except ImportError:
        return False
    return True


# --- inputs ----------------------------------------------------------------------------------------
def to_bf16(folders: list[Path], out_root: Path) -> list[Path]:
    """The same checkpoints with every floating tensor cast to bf16 (metadata kept)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    out = []
    for folder in folders:
        dest = out_root / folder.name
        shutil.copytree(folder, dest, ignore=shutil.ignore_patterns("*.safetensors"))
        for st in folder.glob("*.safetensors"):
            with safe_open(str(st), "pt") as f:
                meta = f.metadata()
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            tensors = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in tensors.items()}
            save_file(tensors, str(dest / st.name), metadata=meta)
        out.append(dest)
    return out


# --- part 1 ----------------------------------------------------------------------------------------
HEADERS = ("tool", "stored", "vs copy", "vs zipnn", "commit s", "commit MB/s", "checkout s", "checkout MB/s")


def sequence_table(runs: list, logical: int) -> tuple[str, dict]:
    by = {r.tool: r for r in runs}
    zipnn = by.get("zipnn")
    copy = by["plain copy"]
    rows, data = [], {}
    for r in runs:
        row = dict(
            stored=r.stored_bytes,
            vs_copy=r.stored_bytes / copy.stored_bytes,
            vs_zipnn=r.stored_bytes / zipnn.stored_bytes if zipnn else None,
            commit_s=r.commit_total,
            commit_mb_s=logical / MB / r.commit_total,
            checkout_s=r.checkout_total,
            checkout_mb_s=logical / MB / r.checkout_total,
        )
        data[r.tool] = dict(row, commit_each_s=r.commit_s, checkout_each_s=r.checkout_s)
        rows.append([r.tool, human_bytes(row["stored"]), row["vs_copy"], row["vs_zipnn"], row["commit_s"],
                     row["commit_mb_s"], row["checkout_s"], row["checkout_mb_s"]])
    return format_table(HEADERS, rows), data


def run_sequence(tools: list[type[Tool]], folders: list[Path], work: Path) -> list:
    runs = []
    for cls in tools:
        tool_dir = work / cls.slug()
        tool = cls(tool_dir)
        run = run_tool(tool, folders, tool_dir / "checkouts", checkout_rounds=CHECKOUT_ROUNDS)
        if isinstance(tool, AdapterHubTool):
            run.cold_checkout_s = cold_checkout_s(tool, folders[-1], tool_dir / "cold")
            run.aggressive_gc_s, run.stored_after_aggressive = aggressive_gc(tool)
            run.cold_after_aggressive_s = cold_checkout_s(tool, folders[-1], tool_dir / "cold-after-gc")
        runs.append(run)
        shutil.rmtree(tool_dir)
    return runs


def aggressive_gc(tool: AdapterHubTool) -> tuple[float, int]:
    """(seconds, stored bytes after) of `ah gc --aggressive`: deltas recomputed newest-first."""
    from adapterhub.gc import collect_garbage
    from adapterhub.registry import Registry

    reg = Registry.open(tool.registry.root)
    with stopwatch() as t:
        collect_garbage(reg.ah_dir, reg.store, reg.refs, aggressive=True)
    return t.seconds, tool.stored_bytes()


def cold_checkout_s(tool: AdapterHubTool, folder: Path, out: Path) -> float:
    """Seconds to check out the newest revision with nothing cached (a new Registry, as a
    new `ah` process would be): its whole delta chain is decoded. The in-order checkouts
    of run_tool find each base in the store's cache; this is the worst case for one."""
    from adapterhub.registry import Registry

    reg = Registry.open(tool.registry.root)
    with stopwatch() as t:
        reg.checkout("HEAD", out)
    verify_checkout(tool, tree_sha256(folder), out, f"cold checkout of {folder.name}")
    return t.seconds


# --- part 2 ----------------------------------------------------------------------------------------
def make_small_adapters(root: Path, n: int, *, shared_pool: int = 64, seed: int = 0) -> list[Path]:
    """`n` PEFT-shaped LoRA r=4 folders of a few kB on a 64-wide model (q and v projections).

    Each adapter's lora_A matrices come from a pool of `shared_pool` (as when many users
    start from a few common initialisations); its lora_B matrices are its own.
    """
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    pool = [(rng.standard_normal((4, 64)) * 0.05).astype(np.float32) for _ in range(shared_pool)]
    config = json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "base_model_name_or_path": "tiny/llama-64",
                         "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"})
    folders = []
    for i in range(n):
        d = root / f"user{i:07d}"
        d.mkdir(parents=True)
        b = rng.standard_normal((2, 64, 4)).astype(np.float32) * 0.01
        save_file({
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": pool[i % shared_pool],
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": b[0],
            "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight": pool[(i * 7 + 3) % shared_pool],
            "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight": b[1],
        }, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
        (d / "adapter_config.json").write_text(config)
        folders.append(d)
    return folders


def run_scale(work: Path, n: int) -> tuple[str, dict]:
    import zstandard

    from adapterhub.importer import import_folders
    from adapterhub.registry import Registry

    with stopwatch() as gen:
        folders = make_small_adapters(work / "adapters", n)
    files = [p for f in folders for p in sorted(f.iterdir())]
    payload_raw = sum(p.stat().st_size for p in files)
    cctx = zstandard.ZstdCompressor(level=3)
    payload_zstd = sum(len(cctx.compress(p.read_bytes())) for p in files)
    reg = Registry.init(work / "registry")
    with stopwatch() as imp:
        result = import_folders(reg.ah_dir, reg.store, reg.refs, folders, prefix="users/")
    stored = dir_size(reg.ah_dir / "objects") + (reg.ah_dir / "packed-refs").stat().st_size
    # Per-adapter metadata: its commit and snapshot records, the pack indexes (every
    # object's entry, tensors' included, plus each index's fixed header and fan-out) and
    # its packed-ref line. Records of encodings 1 and 2 are tensors by construction; the
    # others are decoded to learn their type.
    meta = 0
    store = Registry.open(reg.root).store
    for pack in store.packs():
        meta += pack.idx_path.stat().st_size
        for i in range(pack.count):
            offset, length = pack.location(i)
            if pack.record_at("", offset, min(length, 5))[4] in (1, 2):
                continue
            if store.read(pack._id(i).hex())[0] in ("commit", "snapshot"):
                meta += length
    meta += (reg.ah_dir / "packed-refs").stat().st_size
    # Resolve + checkout one adapter in a fresh process-like state (a new Registry each time).
    picks = random.Random(1).sample(range(n), min(20, n))
    resolve_s, checkout_s = [], []
    for i in picks:
        with stopwatch() as t_open_resolve:
            r = Registry.open(reg.root)
            cid = r.resolve(f"users/user{i:07d}")
        with stopwatch() as t_co:
            r.checkout(cid, work / "co" / str(i))
        resolve_s.append(t_open_resolve.seconds)
        checkout_s.append(t_co.seconds)
    data = dict(
        adapters=n, generate_s=gen.seconds, import_s=imp.seconds, rate_per_s=n / imp.seconds,
        payload_raw_per_adapter=payload_raw / n, payload_zstd3_per_adapter=payload_zstd / n,
        stored_per_adapter=stored / n, metadata_per_adapter=meta / n,
        metadata_vs_payload=meta / payload_zstd, packs=result.packs, objects=result.objects_written,
        resolve_ms_median=1000 * statistics.median(resolve_s), checkout_ms_median=1000 * statistics.median(checkout_s),
        projected_1m_minutes=1_000_000 / (n / imp.seconds) / 60,
    )
    rows = [
        ["adapters imported", f"{n}"],
        ["import time", f"{imp.seconds:.1f} s  ({data['rate_per_s']:.0f} adapters/s, both cores)"],
        ["projected 1,000,000", f"{data['projected_1m_minutes']:.1f} min at this rate"],
        ["payload per adapter", f"{data['payload_raw_per_adapter']:.0f} B raw, {data['payload_zstd3_per_adapter']:.0f} B as zstd-3 per file"],
        ["stored per adapter", f"{data['stored_per_adapter']:.0f} B (objects + packs + packed-refs, shared tensors once)"],
        ["metadata per adapter", f"{data['metadata_per_adapter']:.0f} B = {100 * data['metadata_vs_payload']:.1f}% of the zstd-3 payload"
                                 " (commit + snapshot records, pack indexes, packed-ref line)"],
        ["resolve one branch", f"{data['resolve_ms_median']:.1f} ms median (open registry + resolve)"],
        ["check out one adapter", f"{data['checkout_ms_median']:.1f} ms median"],
    ]
    return format_table(("scale", "result"), rows), data


# --- main ------------------------------------------------------------------------------------------
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes for a smoke test")
    p.add_argument("--revisions", type=int, help="checkpoints (default 12; --quick 4)")
    p.add_argument("--train-size-mb", type=float, help="fp32 adapter size (default 5; --quick 1)")
    p.add_argument("--steps-per-revision", type=int, default=3)
    p.add_argument("--scale-adapters", type=int, help="small adapters to import (default 20000; --quick 500)")
    p.add_argument("--json", type=Path, default=RESULTS_DIR / "storage.json")
    p.add_argument("--workdir", type=Path)
    args = p.parse_args(argv)
    if args.revisions is None:
        args.revisions = 4 if args.quick else 12
    if args.train_size_mb is None:
        args.train_size_mb = 1 if args.quick else 5
    if args.scale_adapters is None:
        args.scale_adapters = 500 if args.quick else 20000
    return args


def check(label: str, ok: bool, detail: str) -> str:
    return f"  [{'PASS' if ok else 'FAIL'}] {label}: {detail}"


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ah-bench-storage-"))
    work.mkdir(parents=True, exist_ok=True)
    tools: list[type[Tool]] = [GitLfsTool, PlainCopyTool, Zstd3Tool] + ([ZipNNTool] if zipnn_available() else []) + [AdapterHubTool]
    results: dict = {"machine": machine_info(), "args": {k: str(v) for k, v in vars(args).items()}}
    try:
        with stopwatch() as t_train:
            spec, fp32 = train_revisions(work / "fp32", args.revisions, int(args.train_size_mb * MB), rank=16,
                                         steps_per_revision=args.steps_per_revision)
            bf16 = to_bf16(fp32, work / "bf16")
        print(f"inputs: {args.revisions} checkpoints of a LoRA r=16 adapter on all linear layers of a "
              f"{spec.layers}-layer, {spec.hidden}-wide Llama ({spec.adapter_params:,} parameters), "
              f"{args.steps_per_revision} AdamW steps apart; built in {t_train.seconds:.0f} s (untimed)")
        if not zipnn_available():
            print("zipnn is not installed (pip install zipnn): its column is skipped")
        verdicts = []
        for label, folders in (("fp32", fp32), ("bf16", bf16)):
            logical = sum(dir_size(f) for f in folders)
            runs = run_sequence(tools, folders, work / f"run-{label}")
            table, data = sequence_table(runs, logical)
            single = run_sequence([t for t in tools if t.name in ("zipnn", "adapterhub", "zstd-3", "plain copy")],
                                  folders[:1], work / f"single-{label}")
            single_table, single_data = sequence_table(single, dir_size(folders[0]))
            results[label] = dict(sequence=data, single=single_data, logical_bytes=logical)
            print(f"\n{label}: {len(folders)} checkpoints, {human_bytes(logical)} in all")
            print(table)
            ah_run = next(r for r in runs if r.tool == "adapterhub")
            newest = dir_size(folders[-1])
            data["adapterhub"].update(cold_checkout_newest_s=ah_run.cold_checkout_s,
                                      aggressive_gc_s=ah_run.aggressive_gc_s,
                                      stored_after_aggressive_gc=ah_run.stored_after_aggressive,
                                      cold_checkout_newest_after_aggressive_gc_s=ah_run.cold_after_aggressive_s)
            print(f"adapterhub, newest revision checked out cold (new Registry, whole delta chain decoded): "
                  f"{ah_run.cold_checkout_s:.3f} s = {newest / MB / ah_run.cold_checkout_s:.1f} MB/s")
            print(f"adapterhub after `ah gc --aggressive` ({ah_run.aggressive_gc_s:.2f} s; stored "
                  f"{human_bytes(ah_run.stored_after_aggressive)}): newest revision cold "
                  f"{ah_run.cold_after_aggressive_s:.3f} s = {newest / MB / ah_run.cold_after_aggressive_s:.1f} MB/s")
            print(f"\n{label}: single adapter (the first checkpoint alone)")
            print(single_table)
            if "zipnn" in data:
                target = 0.75 if label == "bf16" else 0.90
                ah, zn = data["adapterhub"], data["zipnn"]
                verdicts.append(check(f"{label} sequence bytes <= {target} x ZipNN", ah["vs_zipnn"] <= target,
                                      f"{ah['vs_zipnn']:.3f} x"))
                verdicts.append(check(f"{label} single adapter bytes <= ZipNN", single_data["adapterhub"]["vs_zipnn"] <= 1.0,
                                      f"{single_data['adapterhub']['vs_zipnn']:.3f} x"))
                verdicts.append(check(f"{label} commit throughput >= ZipNN compression", ah["commit_mb_s"] >= zn["commit_mb_s"],
                                      f"{ah['commit_mb_s']:.0f} vs {zn['commit_mb_s']:.0f} MB/s"))
            if "zstd-3" in data:  # "at least the speed of a plain copy from a compressed archive"
                ah, zs = data["adapterhub"], data["zstd-3"]
                verdicts.append(check(f"{label} in-order checkout >= zstd-3 per file", ah["checkout_mb_s"] >= zs["checkout_mb_s"],
                                      f"{ah['checkout_mb_s']:.0f} vs {zs['checkout_mb_s']:.0f} MB/s"))
        scale_table, scale = run_scale(work / "scale", args.scale_adapters)
        results["scale"] = scale
        print(f"\nscale: {args.scale_adapters} small adapters imported with `ah import` (both cores)")
        print(scale_table)
        verdicts.append(check("scale: 1,000,000 in < 30 min (projected)", scale["projected_1m_minutes"] < 30,
                              f"{scale['projected_1m_minutes']:.1f} min"))
        verdicts.append(check("scale: metadata < 10% of the payload", scale["metadata_vs_payload"] < 0.10,
                              f"{100 * scale['metadata_vs_payload']:.1f}%"))
        verdicts.append(check("scale: resolve + checkout < 100 ms", scale["resolve_ms_median"] + scale["checkout_ms_median"] < 100,
                              f"{scale['resolve_ms_median'] + scale['checkout_ms_median']:.1f} ms"))
        print("\ntargets (issue 4):")
        print("\n".join(verdicts))
        results["verdicts"] = verdicts
        write_json(args.json, results)
        print(f"\nresults: {args.json}")
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
