"""The `ah` CLI contract of DESIGN.md, run as a user runs it (a subprocess per command):
outputs, JSON shapes, registry discovery, one-line errors with exit codes, and start-up
that never imports torch, peft, transformers, numpy or duckdb."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from ah_testkit import assert_cli_error, write_adapter
from conftest import TEST_AUTHOR, sha256_tree
from test_revisions import _colliding_bodies

from adapterhub.objects import BLOB

OID = re.compile(r"^[0-9a-f]{64}$")


def ok(result: tuple[int, str, str]) -> str:
    rc, out, err = result
    assert rc == 0, (rc, out, err)
    return out




@pytest.fixture
def repo(ah, tmp_path):
    """`ah init` in tmp_path/reg; returns a runner bound to that registry with --registry."""
    ok(ah("init", tmp_path / "reg"))
    root = tmp_path / "reg"

    def run(*args, **kwargs):
        return ah("--registry", root, *args, **kwargs)

    run.root = root
    return run


def commit(repo, folder: Path, message: str, *extra) -> str:
    out = ok(repo("commit", folder, "-m", message, *extra))
    last = out.strip().splitlines()[-1]
    assert OID.match(last), out
    return last


# --- init ----------------------------------------------------------------------------------


def test_init(ah, tmp_path):
    out = ok(ah("init", tmp_path / "r"))
    assert "Initialized empty adapterhub registry" in out
    ah_dir = tmp_path / "r" / ".ah"
    assert json.loads((ah_dir / "config.json").read_text())["format_version"] == 2
    assert (ah_dir / "HEAD").read_text() == "ref: refs/heads/main\n"
    assert_cli_error(ah("init", tmp_path / "r"), 2, "already holds a registry")


def test_init_in_cwd_and_initial_branch(ah, tmp_path):
    (tmp_path / "here").mkdir()
    ok(ah("init", "-b", "users/alice/main", cwd=tmp_path / "here"))
    assert (tmp_path / "here/.ah/HEAD").read_text() == "ref: refs/heads/users/alice/main\n"
    assert_cli_error(ah("init", tmp_path / "x", "-b", "bad..name"), 2, "invalid branch name")
    assert not (tmp_path / "x" / ".ah").exists()


# --- commit / log / show / checkout -------------------------------------------------------


def test_commit_prints_id_last(repo, tmp_path):
    cid = commit(repo, write_adapter(tmp_path / "a"), "first")
    out = ok(repo("commit", write_adapter(tmp_path / "b", seed=1), "-m", "second"))
    lines = out.strip().splitlines()
    assert lines[0].startswith("[main ") and "second" in lines[0]
    log = json.loads(ok(repo("log", "--format", "json")))
    assert log[0]["id"] == lines[-1] and log[1]["id"] == cid
    assert log[0]["parents"] == [cid]


def test_commit_on_branch_option(repo, tmp_path):
    main = commit(repo, write_adapter(tmp_path / "a"), "on main")
    other = commit(repo, write_adapter(tmp_path / "b", seed=1), "on alice", "-b", "users/alice/main")
    assert json.loads(ok(repo("log", "users/alice/main", "--format", "json")))[0]["id"] == other
    assert json.loads(ok(repo("log", "--format", "json")))[0]["id"] == main  # HEAD's branch did not move


def test_commit_needs_message(repo, tmp_path):
    assert_cli_error(repo("commit", write_adapter(tmp_path / "a")), 2, "-m")
    assert_cli_error(repo("commit", write_adapter(tmp_path / "a"), "-m", "  "), 2, "commit message is required")
    assert_cli_error(repo("commit", tmp_path / "missing", "-m", "x"), 2, "is not a folder")


def test_log_json(repo, tmp_path):
    ids = [commit(repo, write_adapter(tmp_path / f"a{i}", seed=i), f"commit {i}",
                  "--dataset", "hf://d", "--param", "lr=0.001") for i in range(3)]
    out = ok(repo("log", "--format", "json"))
    log = json.loads(out)  # one JSON document
    assert isinstance(log, list)
    assert [c["id"] for c in log] == ids[::-1]  # newest first
    for entry, parent in zip(log, [ids[1], ids[0], None]):
        assert {"id", "parents", "message", "author", "timestamp", "provenance"} <= set(entry)
        assert entry["parents"] == ([parent] if parent else [])
        assert entry["author"] == TEST_AUTHOR
        assert isinstance(entry["timestamp"], int)
        assert entry["provenance"]["dataset"]["uri"] == "hf://d"
        assert entry["provenance"]["params"] == {"lr": 0.001}
    assert [c["message"] for c in log] == ["commit 2", "commit 1", "commit 0"]
    assert [c["id"] for c in json.loads(ok(repo("log", "-n", "2", "--format", "json")))] == ids[:0:-1]
    assert [c["id"] for c in json.loads(ok(repo("log", "HEAD~1", "--format", "json")))] == ids[1::-1]
    assert json.loads(ok(repo("log", "-n", "0", "--format", "json"))) == []


def test_log_text(repo, tmp_path):
    cid = commit(repo, write_adapter(tmp_path / "a"), "hello world")
    ok(repo("tag", "v1"))
    out = ok(repo("log"))
    assert f"commit {cid} (HEAD -> main, tag: v1)" in out
    assert "    hello world" in out and f"Author: {TEST_AUTHOR}" in out
    assert ok(repo("log", "--oneline")).strip() == f"{cid[:12]} (HEAD -> main, tag: v1) hello world"


def test_log_prints_what_it_can_read_before_an_unreadable_commit(repo, tmp_path):
    ids = [commit(repo, write_adapter(tmp_path / f"a{i}", seed=i), f"step {i}") for i in range(3)]
    path = repo.root / ".ah" / "objects" / ids[0][:2] / ids[0][2:]
    path.chmod(0o644)
    path.write_bytes(path.read_bytes()[:-3])  # the root commit, damaged
    rc, out, err = repo("log", "--oneline")
    assert rc == 1 and [line.split()[0] for line in out.splitlines()] == [ids[2][:12], ids[1][:12]]
    assert err.startswith("error: corrupt object " + ids[0])
    rc, out, err = repo("log", "-n", "2")
    assert rc == 0 and out.count("commit ") == 2


def test_show_json(repo, tmp_path):
    folder = write_adapter(tmp_path / "a")
    (folder / "README.md").write_text("# adapter\n")
    cid = commit(repo, folder, "first", "--base-model", "tiny/base")
    ok(repo("branch", "dev"))
    show = json.loads(ok(repo("show", cid[:8], "--format", "json")))
    assert show["id"] == cid and show["parents"] == [] and show["message"] == "first"
    assert show["provenance"]["base_model"]["name"] == "tiny/base"
    assert sorted(show["refs"]) == ["dev", "main"]
    files = {f["path"]: f for f in show["files"]}
    assert sorted(files) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    st = files["adapter_model.safetensors"]
    assert st["kind"] == "safetensors" and st["size"] == (folder / "adapter_model.safetensors").stat().st_size
    assert {t["name"] for t in st["tensors"]} == {
        "base_model.model.layers.0.q_proj.lora_A.weight", "base_model.model.layers.0.q_proj.lora_B.weight"}
    assert all(t["dtype"] == "F32" and OID.match(t["blob"]) for t in st["tensors"])
    text = ok(repo("show"))
    assert cid in text and "adapter_model.safetensors" in text and "2 tensors" in text


def test_checkout_roundtrip(repo, tmp_path):
    a = write_adapter(tmp_path / "a")
    (a / "sub").mkdir()
    (a / "sub" / "tokenizer.json").write_text('{"v": 1}')
    first = commit(repo, a, "first")
    b = write_adapter(tmp_path / "b", seed=5)
    commit(repo, b, "second")
    out = ok(repo("checkout", "main~1", "-o", tmp_path / "out1"))
    assert f"Checked out {first[:12]}" in out
    assert sha256_tree(tmp_path / "out1") == sha256_tree(a)
    ok(repo("checkout", "HEAD", "-o", tmp_path / "out2"))
    assert sha256_tree(tmp_path / "out2") == sha256_tree(b)
    # Not into a non-empty folder without --force; with it, files are replaced.
    assert_cli_error(repo("checkout", "main", "-o", tmp_path / "out1"), 1, "not empty")
    ok(repo("checkout", "main", "-o", tmp_path / "out1", "--force"))
    assert sha256_tree(tmp_path / "out1")["adapter_model.safetensors"] == sha256_tree(b)["adapter_model.safetensors"]
    assert "sub/tokenizer.json" in sha256_tree(tmp_path / "out1")  # other files stay


# --- branch / tag / switch -----------------------------------------------------------------


def test_branch_tag_switch(repo, tmp_path):
    c1 = commit(repo, write_adapter(tmp_path / "a"), "first")
    assert ok(repo("branch", "dev")).startswith("Created branch dev at " + c1[:12])
    assert ok(repo("branch")).splitlines() == [f"  dev  {c1[:12]}", f"* main  {c1[:12]}"]
    assert json.loads(ok(repo("branch", "--format", "json"))) == [
        {"name": "dev", "commit": c1, "current": False}, {"name": "main", "commit": c1, "current": True}]
    assert_cli_error(repo("branch", "dev"), 2, "already exists")

    assert "Switched to branch dev" in ok(repo("switch", "dev"))
    c2 = commit(repo, write_adapter(tmp_path / "b", seed=1), "on dev")
    assert json.loads(ok(repo("log", "main", "--format", "json")))[0]["id"] == c1
    assert json.loads(ok(repo("log", "--format", "json")))[0]["id"] == c2
    assert "a new branch" in ok(repo("switch", "-c", "users/bob/x", "main"))
    assert json.loads(ok(repo("log", "--format", "json")))[0]["id"] == c1
    assert_cli_error(repo("switch", "nope"), 2, "branch 'nope' not found")

    ok(repo("tag", "v1", "dev"))
    ok(repo("tag", "v0", "main", "-m", "annotated"))
    assert ok(repo("tag")).splitlines() == [f"v0  {c1[:12]}", f"v1  {c2[:12]}"]
    assert {t["name"]: t["commit"] for t in json.loads(ok(repo("tag", "--format", "json")))} == {"v0": c1, "v1": c2}
    assert json.loads(ok(repo("show", "v0", "--format", "json")))["id"] == c1
    assert_cli_error(repo("tag", "v1"), 2, "already exists")
    ok(repo("tag", "-d", "v1"))
    assert_cli_error(repo("show", "v1"), 2, "unknown revision 'v1'")

    assert_cli_error(repo("branch", "-d", "users/bob/x"), 2, "HEAD points at it")
    ok(repo("switch", "main"))
    assert ok(repo("branch", "-d", "users/bob/x")).startswith("Deleted branch users/bob/x")
    assert_cli_error(repo("branch", "-d", "users/bob/x"), 2, "not found")


def test_reflog(repo, tmp_path):
    c1 = commit(repo, write_adapter(tmp_path / "a"), "first")
    c2 = commit(repo, write_adapter(tmp_path / "b", seed=1), "second")
    lines = ok(repo("reflog")).splitlines()
    assert [line.split()[0] for line in lines] == [c2[:12], c1[:12]]
    assert lines[0].endswith("commit: second") and lines[1].endswith("commit (initial): first")


def test_cat_file(repo, tmp_path):
    cid = commit(repo, write_adapter(tmp_path / "a"), "first")
    assert ok(repo("cat-file", "-t", cid)).strip() == "commit"
    body = json.loads(ok(repo("cat-file", "-p", "main")))
    assert body["message"] == "first" and body["parents"] == []
    snap = body["snapshot"]
    assert ok(repo("cat-file", "-t", snap[:10])).strip() == "snapshot"
    tensor = json.loads(ok(repo("cat-file", snap)))["files"][1]["tensors"][0]["blob"]
    assert ok(repo("cat-file", "-t", tensor)).strip() == "tensor"
    assert ok(repo("cat-file", "-s", tensor)).strip() == str(4 * 16 * 4)
    assert ok(repo("cat-file", tensor)).strip() == "<tensor: 256 bytes>"
    assert_cli_error(repo("cat-file", "abcdef0123"), 2, "unknown revision")


# --- registry discovery ------------------------------------------------------------------


def test_discovery(ah, tmp_path):
    ok(ah("init", tmp_path / "r1"))
    ok(ah("init", tmp_path / "r2"))
    c1 = commit(lambda *a: ah("--registry", tmp_path / "r1", *a), write_adapter(tmp_path / "a"), "in r1")
    c2 = commit(lambda *a: ah("--registry", tmp_path / "r2", *a), write_adapter(tmp_path / "b", seed=1), "in r2")

    def head(*args, **kwargs) -> str:
        return json.loads(ok(ah(*args, "log", "--format", "json", **kwargs)))[0]["id"]

    sub = tmp_path / "r1" / "deep" / "er"
    sub.mkdir(parents=True)
    assert head(cwd=tmp_path / "r1") == c1
    assert head(cwd=sub) == c1  # nearest .ah/ upward
    assert head(cwd=tmp_path, env={"AH_REGISTRY": tmp_path / "r2"}) == c2
    assert head(cwd=sub, env={"AH_REGISTRY": tmp_path / "r2"}) == c2  # $AH_REGISTRY beats the cwd
    assert head("--registry", tmp_path / "r1", cwd=tmp_path, env={"AH_REGISTRY": tmp_path / "r2"}) == c1
    # The nearest wins when registries are nested.
    ok(ah("init", sub))
    (sub / "x").mkdir()
    assert_cli_error(ah("log", cwd=sub / "x"), 2, "has no commits yet")
    assert head(cwd=tmp_path / "r1" / "deep") == c1


def test_no_registry(ah, tmp_path):
    (tmp_path / "empty").mkdir()
    assert_cli_error(ah("log", cwd=tmp_path / "empty"), 2, "not inside an adapterhub registry", "ah init")
    assert_cli_error(ah("--registry", tmp_path / "empty", "log"), 2, "is not an adapterhub registry")
    assert_cli_error(ah("log", cwd=tmp_path / "empty", env={"AH_REGISTRY": tmp_path / "nowhere"}), 2, "not an adapterhub registry")


# --- error contract ------------------------------------------------------------------------


def test_usage_errors(repo, tmp_path):
    cid = commit(repo, write_adapter(tmp_path / "a"), "first")
    assert_cli_error(repo("show", "nope"), 2, "unknown revision 'nope'")
    assert_cli_error(repo("log", "main~5"), 2, "has no parent")
    assert_cli_error(repo("checkout", "deadbeef00", "-o", tmp_path / "o"), 2, "unknown revision")
    assert not (tmp_path / "o").exists()
    assert_cli_error(repo("show", cid[:5]), 2, "unknown revision")
    assert_cli_error(repo("branch", "bad..name"), 2, "invalid branch name 'bad..name'")
    assert_cli_error(repo("tag", "a b"), 2, "invalid tag name")
    assert_cli_error(repo("switch", "-c", "x.lock"), 2, "invalid branch name")
    assert_cli_error(repo("log", "-n", "-1"), 2, "-n")
    assert_cli_error(repo("nosuchcommand"), 2, "No such command")
    assert_cli_error(repo("log", "--format", "xml"), 2, "xml")
    assert_cli_error(repo("commit", tmp_path / "a", "-m", "x", "--param", "novalue"), 2, "KEY=VALUE")


def test_ambiguous_short_id(repo, tmp_path):
    from adapterhub.registry import Registry

    commit(repo, write_adapter(tmp_path / "a"), "first")
    store = Registry.open(repo.root).store
    a, b = _colliding_bodies(lambda i: b"cli %d" % i)
    ida, idb = store.put(BLOB, a), store.put(BLOB, b)
    line = assert_cli_error(repo("show", ida[:6]), 2, f"short id {ida[:6]} is ambiguous")
    assert ida[:12] in line and idb[:12] in line
    assert_cli_error(repo("checkout", ida[:6], "-o", tmp_path / "o"), 2, "ambiguous")
    assert_cli_error(repo("cat-file", "-t", ida[:6]), 2, "ambiguous")
    assert ok(repo("cat-file", "-t", ida)).strip() == "blob"


# --- start-up imports ----------------------------------------------------------------------

_PROBE = """
import json, sys
from adapterhub.cli.main import main
sys.argv = ["ah"] + sys.argv[1:]
try:
    main()
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in ("torch", "peft", "transformers", "safetensors.torch", "numpy", "duckdb") if m in sys.modules)
with open(PROBE_OUT, "w") as fh:
    json.dump({"code": code, "heavy": heavy}, fh)
"""


def _heavy_imports(registry, tmp_path, args) -> list[str]:
    """The heavy modules `ah ARGS` imported (run in a fresh interpreter), after it succeeded."""
    result = tmp_path / "probe.json"
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE.replace("PROBE_OUT", repr(str(result))), "--registry", str(registry.root), *args],
        capture_output=True, text=True, timeout=120,
    )
    probe = json.loads(result.read_text())
    assert probe["code"] in (0, None), proc.stderr
    return probe["heavy"]


@pytest.mark.parametrize(
    "args",
    [["--help"], ["log"], ["log", "--format", "json"], ["show", "--format", "json"], ["branch"], ["commit", "--help"]],
)
def test_cli_never_imports_torch(registry, tmp_path, args):
    registry.commit(write_adapter(tmp_path / "a"), "first")
    assert _heavy_imports(registry, tmp_path, args) == [], f"`ah {' '.join(args)}` imported heavy modules"


def test_probe_sees_heavy_imports(tmp_path):
    # Control: the probe does notice an import of torch, so the test above can fail.
    pytest.importorskip("torch")
    result = tmp_path / "probe.json"
    code = "import torch\n" + _PROBE.replace("PROBE_OUT", repr(str(result)))
    subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, timeout=120)
    assert "torch" in json.loads(result.read_text())["heavy"]


def test_checkout_with_the_native_codec_never_imports_numpy(registry, tmp_path):
    """numpy is the codec's fallback: with the C whole-record calls a checkout (delta
    chains included) runs without importing it (~115 ms of every `ah checkout`)."""
    from adapterhub.encoding import kernels

    if kernels.decode_sections is None:
        pytest.skip("the native codec or libzstd is not available")
    registry.commit(write_adapter(tmp_path / "a"), "first")
    registry.commit(write_adapter(tmp_path / "b", seed=1), "second")
    assert _heavy_imports(registry, tmp_path, ["checkout", "HEAD", "-o", str(tmp_path / "out")]) == []
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_version_is_the_installed_distributions(ah):
    """`ah --version` prints adapterhub.__version__ without asking the package metadata
    (its import cost ~20 ms): that must be the version pip installed (pyproject.toml)."""
    from importlib import metadata

    import adapterhub

    out = ok(ah("--version"))
    assert out.strip() == f"ah, version {adapterhub.__version__}"
    assert adapterhub.__version__ == metadata.version("adapterhub")
