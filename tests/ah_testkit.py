"""Shared helpers for the eval, provenance and index tests: tiny real adapters and registries.

The adapters are real safetensors files with PEFT-shaped names and an adapter_config.json,
built with numpy (no torch, no downloads): these tests are about metadata, not the model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from adapterhub.registry import Registry


def write_adapter(folder: Path, seed: int = 0, base: str = "tiny/base", rank: int = 4) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    save_file(
        {
            "base_model.model.layers.0.q_proj.lora_A.weight": rng.standard_normal((rank, 16)).astype(np.float32),
            "base_model.model.layers.0.q_proj.lora_B.weight": rng.standard_normal((16, rank)).astype(np.float32),
        },
        str(folder / "adapter_model.safetensors"),
    )
    (folder / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": rank, "base_model_name_or_path": base, "revision": "r1"})
    )
    return folder


def make_registry(tmp_path: Path, commits: int = 3, branch: str | None = None) -> tuple[Registry, list[str]]:
    reg = Registry.init(tmp_path / "reg")
    ids = []
    for i in range(commits):
        ad = write_adapter(tmp_path / f"ad{i}", seed=i)
        ids.append(reg.commit(ad, f"commit {i}", branch=branch).id)
    return reg, ids


def ah(reg_root: Path, *args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real `ah` command as a user would."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "adapterhub.cli.main", "--registry", str(reg_root), *args],
        capture_output=True, text=True, env=full_env, timeout=120,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"ah {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return proc


def index_rows(reg) -> dict[str, list]:
    """Every data table of the registry's index, rows sorted: for exact comparisons."""
    import duckdb

    from adapterhub.index.schema import DATA_TABLES

    con = duckdb.connect(str(reg.ah_dir / "index.duckdb"), read_only=True)
    try:
        return {t: sorted(con.execute(f"SELECT * FROM {t}").fetchall(), key=repr) for t in DATA_TABLES}
    finally:
        con.close()


def rebuilt_rows(reg, tmp_path: Path) -> dict[str, list]:
    """Rows of a from-scratch rebuild of a copy of `reg` (the original index is untouched)."""
    import shutil

    from adapterhub.index.build import rebuild

    copy = Path(tmp_path) / f"copy-{os.urandom(4).hex()}"
    shutil.copytree(reg.root, copy, ignore=shutil.ignore_patterns("index.duckdb*"))
    other = Registry(copy)
    rebuild(other)
    return index_rows(other)


def assert_cli_error(result: tuple[int, str, str], code: int, *fragments: str) -> str:
    """`ah` failed as the contract says: exit `code`, one `error:` line, no traceback."""
    rc, out, err = result
    assert rc == code, (rc, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])
    return lines[0]
