"""Smoke test: the core benchmark runs end to end at --quick size and prints its tables.

It drives the real tools (adapterhub, git + git-lfs, cp) on real PEFT adapters, and
bench_core itself fails (exit 1) if any checkout is not sha256-identical to its input, so
a pass here also means every tool round-tripped every revision byte for byte.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks" / "bench_core.py"


@pytest.mark.skipif(shutil.which("git-lfs") is None, reason="git-lfs is not installed")
def test_bench_core_quick_prints_table_and_json(tmp_path):
    out_json = tmp_path / "core.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json", str(out_json), "--workdir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for scenario in ("[single]", "[training]"):
        assert scenario in proc.stdout
    header = next(line for line in proc.stdout.splitlines() if line.startswith("tool "))
    for column in ("commit s", "checkout s", "stored", "stored/git-lfs", "stored/copy"):
        assert column in header
    for tool in ("adapterhub", "git-lfs", "plain copy"):
        assert sum(line.startswith(tool) for line in proc.stdout.splitlines()) == 2, tool

    results = json.loads(out_json.read_text())
    training = results["scenarios"]["training"]
    assert [t["tool"] for t in training["tools"]] == ["adapterhub", "git-lfs", "plain copy"]
    for row in training["tools"]:
        assert row["revisions"] == 3 and len(row["commit_s"]) == 3 and len(row["checkout_s"]) == 3
        assert row["stored_bytes"] > 0
    copy = training["tools"][2]
    # A plain copy keeps every revision whole: at least the input, byte for byte.
    assert copy["stored_bytes"] == training["input_bytes_total"]
    # The scratch folder is cleaned up after the run.
    assert [p.name for p in tmp_path.iterdir()] == ["core.json"]


def test_verify_checkout_fails_loudly_on_a_changed_byte(tmp_path):
    """The benchmark's byte-identity check catches a one-byte change (no torch needed)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from common import BenchmarkError, PlainCopyTool, tree_sha256, verify_checkout
    finally:
        sys.path.remove(str(REPO / "benchmarks"))

    src = tmp_path / "adapter"
    src.mkdir()
    (src / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 4)
    (src / "adapter_config.json").write_text("{}")
    tool = PlainCopyTool(tmp_path / "tool")
    handle = tool.commit(src, 0)
    good, bad = tmp_path / "good", tmp_path / "bad"
    tool.checkout(handle, good)
    verify_checkout(tool, tree_sha256(src), good, "revision 0")  # identical: no error
    tool.checkout(handle, bad)
    data = bytearray((bad / "adapter_model.safetensors").read_bytes())
    data[100] ^= 1
    (bad / "adapter_model.safetensors").write_bytes(bytes(data))
    with pytest.raises(BenchmarkError, match=r"not byte-identical.*sha256 differs \['adapter_model.safetensors'\]"):
        verify_checkout(tool, tree_sha256(src), bad, "revision 0")
    (bad / "extra.txt").write_text("x")
    (bad / "adapter_model.safetensors").unlink()
    with pytest.raises(BenchmarkError, match=r"missing \['adapter_model.safetensors'\], extra \['extra.txt'\]"):
        verify_checkout(tool, tree_sha256(src), bad, "revision 0")
