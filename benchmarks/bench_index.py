"""Index benchmark: a registry of N commits over many branches, each with two eval records.

    python3 benchmarks/bench_index.py                      # the issue's target: 1,000,000 commits
    python3 benchmarks/bench_index.py --commits 100000     # what fits in a few minutes on 2 cores
    python3 benchmarks/bench_index.py --commits 20000 --arrow-rows 1000000

What it builds (say it with the numbers):

1. A *real* registry: N commit objects, N snapshot objects, 2N eval objects, written into
   one pack through the store's PackWriter (not `Registry.commit`, which would spend its
   time on snapshotting folders, not on what is measured here), per-commit eval lists
   and the eval journal in their documented formats (without a per-file fsync), and one
   branch per synthetic adapter (`adapters/aNNNNN`, each a linear history forked from one
   root commit on main). Snapshots are small synthetic LoRA adapters: two 256-byte
   tensors drawn from a pool of 2x1000 tensor objects and one shared header blob, so each
   snapshot is distinct but the pack stays small.
2. The index is then built by the real `ah reindex` code path (`index.build.rebuild`),
   which reads and re-verifies every commit, snapshot and eval object.
3. Latencies: in-process (warm, median of --repeat runs) through the Python API, and as a
   whole `ah` command (median of --cmd-repeat runs, interpreter start included).
4. Optionally (--arrow-rows), the bulk-load step alone at a larger scale: index rows made
   directly as Arrow arrays (numpy), loaded with `index.build.write_index`, and the same
   SQL shapes timed on that file.

It prints one table and writes benchmarks/results/index.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from common import RESULTS_DIR, format_table, machine_info, stopwatch, write_json  # noqa: E402

from adapterhub import codec  # noqa: E402
from adapterhub.evals import EVALS_DIR, JOURNAL, LIST_HEADER, EvalRecord  # noqa: E402
from adapterhub.objects import (  # noqa: E402
    BLOB, COMMIT, EVAL, SNAPSHOT, TENSOR, Commit, FileEntry, Snapshot, TensorEntry, hash_object, header,
)
from adapterhub.refs import HEADS  # noqa: E402
from adapterhub.registry import Registry  # noqa: E402

T0 = 1_700_000_000
POOL = 1000
NAME_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
NAME_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


class _Packer:
    """Objects straight into one pack (the store's own writer and record encoding)."""

    def __init__(self, store):
        self.store = store
        self.writer = store.writer()

    def put(self, obj_type: str, body: bytes) -> str:
        oid = hash_object(obj_type, body)
        head = header(obj_type, len(body))
        self.writer.add(oid, codec.encode([head, body]), len(head) + len(body))
        return oid

    def finish(self) -> None:
        self.writer.finish()
        self.store.add_pack_written()


def build_registry(root: Path, n: int, branches: int, seed: int = 0) -> tuple[Registry, list[str], dict]:
    """The synthetic registry described in the module doc; returns (registry, branch names, tips)."""
    from safetensors.numpy import save_file

    reg = Registry.init(root)
    rng = np.random.default_rng(seed)
    packer = _Packer(reg.store)
    pool_a = [packer.put(TENSOR, rng.standard_normal((4, 16)).astype(np.float32).tobytes()) for _ in range(POOL)]
    pool_b = [packer.put(TENSOR, rng.standard_normal((16, 4)).astype(np.float32).tobytes()) for _ in range(POOL)]
    with tempfile.TemporaryDirectory() as tmp:
        st = Path(tmp) / "a.safetensors"
        save_file({NAME_A: np.zeros((4, 16), np.float32), NAME_B: np.zeros((16, 4), np.float32)}, str(st))
        raw = st.read_bytes()
    hlen = int.from_bytes(raw[:8], "little")
    header_blob = packer.put(BLOB, raw[8 : 8 + hlen])
    cfg = json.dumps({"peft_type": "LORA", "r": 4, "base_model_name_or_path": "org/base"}).encode()
    cfg_blob = packer.put(BLOB, cfg)

    def snapshot(k: int) -> str:
        st_entry = FileEntry("adapter_model.safetensors", "safetensors", len(raw), header_blob, (
            TensorEntry(NAME_A, "F32", (4, 16), pool_a[k % POOL]),
            TensorEntry(NAME_B, "F32", (16, 4), pool_b[(k // POOL) % POOL]),
        ))
        return packer.put(SNAPSHOT, Snapshot((FileEntry("adapter_config.json", "file", len(cfg), cfg_blob), st_entry)).serialize())

    def commit(k: int, parents: tuple, b: int, msg: str) -> str:
        prov = {
            "version": 1,
            "base_model": {"name": f"org/base-{b % 10}", "revision": "main"},
            "adapter": {"peft_type": "LORA", "r": 4},
            "dataset": {"uri": f"datasets/d{b % 20}"},
            "environment": {"python": "3.11", "torch": "2.13.0", "peft": "0.21"},
        }
        c = Commit(snapshot(k), parents, f"user{b % 50} <user{b % 50}@example.com>", T0 + k, msg, prov)
        return packer.put(COMMIT, c.serialize())

    root_id = commit(0, (), 0, "root")
    tips = [root_id] * branches
    lists_root = reg.ah_dir / EVALS_DIR
    journal = []
    values = rng.random((n, 2))
    for k in range(n):
        b = k % branches
        cid = commit(k + 1, (tips[b],), b, f"adapter {b} step {k // branches}")
        tips[b] = cid
        eids = []
        for j, (metric, value) in enumerate((("acc", float(values[k, 0])), ("loss", float(1 + values[k, 1])))):
            rec = EvalRecord(cid, metric, round(value, 6), "bench", "ci", T0 + k + 1, "heldout", {})
            eids.append(packer.put(EVAL, rec.serialize()))
        d = lists_root / cid[:2]
        d.mkdir(parents=True, exist_ok=True)
        (d / cid[2:]).write_text("\n".join([LIST_HEADER, *eids]) + "\n")
        journal.append(f"\n{cid}\n")
    packer.finish()
    (lists_root / JOURNAL).write_text("".join(journal))
    names = [f"adapters/a{b:05d}" for b in range(branches)]
    reg.refs.update(HEADS + "main", root_id, expected=None, who="bench", message="bench: root")
    for name, tip in zip(names, tips):
        reg.refs.update(HEADS + name, tip, expected=None, who="bench", message="bench")
    return reg, names, dict(zip(names, tips))


def timed(fn, repeat: int) -> tuple[float, float, object]:
    """(first run ms, median of the next `repeat` runs ms, last result)."""
    t = time.perf_counter()
    out = fn()
    first = (time.perf_counter() - t) * 1000
    runs = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        runs.append((time.perf_counter() - t) * 1000)
    return first, statistics.median(runs), out


def cmd_ms(root: Path, args: list[str], repeat: int) -> float:
    runs = []
    for _ in range(repeat):
        t = time.perf_counter()
        p = subprocess.run(["ah", "--registry", str(root), *args], capture_output=True, text=True)
        runs.append((time.perf_counter() - t) * 1000)
        if p.returncode != 0:
            raise SystemExit(f"ah {' '.join(args)} failed: {p.stderr}")
    return statistics.median(runs)


def arrow_phase(rows: int, branches: int, out: Path, repeat: int) -> list[list]:
    """Bulk-load `rows` synthetic commits (+2 evals each) as Arrow, then time the query SQL."""
    import duckdb
    import pyarrow as pa

    from adapterhub.index.build import LOAD_ORDER, write_index
    from adapterhub.index.queries import best_sql, log_sql, parse_where
    from adapterhub.index.schema import TABLES, arrow_type, to_arrow

    rng = np.random.default_rng(1)
    k = np.arange(rows, dtype=np.int64)
    ids = np.char.add("c", np.char.zfill(k.astype(str), 63))
    b = k % branches
    first = k < branches
    parent_idx = np.where(first, -1, k - branches)
    chain = np.where(first, ids, ids[np.maximum(b, 0)])  # branch b's chain starts at its first commit
    pos = k // branches
    prov_str = lambda a: pa.array(a.astype(str))  # noqa: E731
    tables = {
        "commits": pa.table({"id": ids, "snapshot": np.char.replace(ids, "c", "s"), "author": prov_str(np.char.add("user", (b % 50).astype(str))),
                             "timestamp": T0 + k, "message": prov_str(np.char.add("step ", pos.astype(str))),
                             "n_parents": (~first).astype(np.int32), "chain": chain, "pos": pos}),
        "parents": pa.table({"commit": ids[~first], "parent": ids[parent_idx[~first]], "position": np.zeros((~first).sum(), np.int32)}),
        "provenance": pa.table({"commit": ids, "base_model": np.char.add("org/base-", (b % 10).astype(str))}),
        "evals": pa.table({"id": np.concatenate([np.char.add("e", ids), np.char.add("f", ids)]), "commit": np.concatenate([ids, ids]),
                           "seq": np.concatenate([np.zeros(rows, np.int32), np.ones(rows, np.int32)]),
                           "metric": np.array(["acc"] * rows + ["loss"] * rows), "value": rng.random(2 * rows),
                           "suite": np.array(["bench"] * (2 * rows)), "timestamp": np.concatenate([T0 + k, T0 + k]),
                           "chain": np.concatenate([chain, chain]), "pos": np.concatenate([pos, pos])}),
    }
    full = {}
    for name in TABLES:
        if name == "meta":
            continue
        t = tables.get(name)
        cols = {}
        for col, typ in TABLES[name].items():
            typ = arrow_type(typ)
            cols[col] = t[col].cast(typ) if t is not None and col in t.column_names else pa.nulls(t.num_rows if t is not None else 0, typ)
        full[name] = pa.table(cols) if t is not None else to_arrow(name, {c: [] for c in TABLES[name]})
    for name, keys in LOAD_ORDER.items():  # the row order a real rebuild loads in
        full[name] = full[name].sort_by([(key, "ascending") for key in keys])
    path = out / f"arrow-{rows}.duckdb"
    with stopwatch() as load:
        write_index(path, full, "bench", 0)
    con = duckdb.connect(str(path), read_only=True)
    tip = str(ids[rows - 1])
    # The very statements adapterhub.index.queries runs.
    rows_out = [[f"arrow bulk load, {rows:,} commits + {2 * rows:,} evals", load.seconds * 1000, None, None]]
    for label, (sql, params) in (
        ("  SQL best acc (all)", best_sql("acc")),
        ("  SQL log BRANCH -n 20", log_sql(tip, [], 20)),
        ("  SQL log BRANCH -n 20 --where metric:acc>=0.5", log_sql(tip, [parse_where("metric:acc>=0.5")], 20)),
        ("  SQL log BRANCH -n 20 --where base_model=org/base-3", log_sql(tip, [parse_where("base_model=org/base-3")], 20)),
        ("  SQL best acc --branch", best_sql("acc", tip=tip)),
    ):
        f, m, _ = timed(lambda: con.execute(sql, params).fetchall(), repeat)
        rows_out.append([label, f, m, None])
    con.close()
    return rows_out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--commits", type=int, default=1_000_000)
    ap.add_argument("--branches", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=20, help="warm in-process runs per query (median)")
    ap.add_argument("--cmd-repeat", type=int, default=5, help="runs per whole `ah` command (median)")
    ap.add_argument("--arrow-rows", type=int, default=0, help="also bulk-load this many synthetic rows via Arrow")
    ap.add_argument("--workdir", type=Path, help="keep the registry here (default: a temp folder)")
    ap.add_argument("--json", type=Path, default=RESULTS_DIR / "index.json")
    args = ap.parse_args()
    os.environ["AH_INDEX"] = "off"  # building: no per-write sync; the index is built once, below
    os.environ.setdefault("AH_AUTHOR", "bench <bench@example.com>")

    from adapterhub.index import queries
    from adapterhub.index.build import rebuild

    work = args.workdir or Path(tempfile.mkdtemp(prefix="ah-bench-index-"))
    rows: list[list] = []
    with stopwatch() as built:
        reg, names, tips = build_registry(work / "reg", args.commits, args.branches)
    rows.append([f"build objects: {args.commits:,} commits, {2 * args.commits:,} evals, {args.branches} branches",
                 built.seconds * 1000, None, None])
    with stopwatch() as idx:
        stats = rebuild(reg)
    rows.append([f"index build (reindex: read+verify all objects, Arrow load)", idx.seconds * 1000, None, None])
    os.environ.pop("AH_INDEX")
    branch = names[len(names) // 2]
    tip = tips[branch]
    r = args.repeat
    cases = [
        ("log BRANCH -n 20 (objects)", lambda: reg.log(branch, 20), ["log", branch, "-n", "20", "--oneline"]),
        ("log BRANCH -n 20 --where metric:acc>=0.5 (index)",
         lambda: queries.log_where(reg, branch, [queries.parse_where("metric:acc>=0.5")], 20),
         ["log", branch, "-n", "20", "--oneline", "--where", "metric:acc>=0.5"]),
        ("log BRANCH -n 20 --where base_model=org/base-3 (index)",
         lambda: queries.log_where(reg, branch, [queries.parse_where("base_model=org/base-3")], 20),
         ["log", branch, "-n", "20", "--oneline", "--where", "base_model=org/base-3"]),
        ("best acc (whole registry)", lambda: queries.best(reg, "acc"), ["best", "acc"]),
        ("best loss --min --branch BRANCH", lambda: queries.best(reg, "loss", rev=branch, minimize=True),
         ["best", "loss", "--min", "--branch", branch]),
        ("show TIP", lambda: reg.show(tip), ["show", tip]),
    ]
    for label, fn, cmd in cases:
        first, med, _ = timed(fn, r)
        rows.append([label, first, med, cmd_ms(reg.root, cmd, args.cmd_repeat)])
    if args.arrow_rows:
        rows.extend(arrow_phase(args.arrow_rows, args.branches, work, r))
    headers = ["step", "first/total ms", "in-process median ms", "`ah` command median ms"]
    print(f"adapterhub index benchmark: {args.commits:,} commits x 2 evals, {args.branches} branches "
          f"(index: {stats.commits:,} commits, {stats.evals:,} evals, {stats.tensors:,} tensor rows)")
    print(format_table(headers, rows))
    write_json(args.json, {"args": {k: str(v) for k, v in vars(args).items()}, "machine": machine_info(),
                           "headers": headers, "rows": rows})


if __name__ == "__main__":
    main()
