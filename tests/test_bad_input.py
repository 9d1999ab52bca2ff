"""Attack tests: hostile or broken input is refused with the exact typed error, and the
registry (and the checkout target) is left exactly as it was.

Covers pickle weights (never unpickled), malformed safetensors headers, unsafe file names
in folders and in stored snapshots, symlinks planted in a checkout target, flipped bytes
in stored objects, and registries of an unknown format version.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import pytest
from ah_testkit import assert_cli_error, write_adapter
from conftest import run_ah

from adapterhub import codec
from adapterhub.errors import (
    BadAdapter,
    CheckoutError,
    CorruptObject,
    MalformedSafetensors,
    PickleRefused,
    UnsafePath,
    UnsupportedFormat,
)
from adapterhub.objects import BLOB, COMMIT, SNAPSHOT, Commit, FileEntry, Snapshot
from adapterhub.registry import Registry
from adapterhub.safetensors_file import MAX_HEADER_LEN, parse_layout


# --- helpers ------------------------------------------------------------------------------


def _bad_folder(tmp_path: Path) -> Path:
    """A valid adapter unlike the registry's (new tensors, and a README that sorts first):
    if a refused commit stored anything before refusing, `_state` would see new objects."""
    folder = write_adapter(tmp_path / "bad", seed=1)
    (folder / "README.md").write_text("this folder is refused\n")
    return folder


def _raw_safetensors(header: dict | bytes, data: bytes, *, length: int | None = None) -> bytes:
    """Hand-built safetensors bytes: lets a test write any header, valid or not."""
    hbytes = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(hbytes) if length is None else length) + hbytes + data


def _f32(offsets, shape=(4,)) -> dict:
    return {"dtype": "F32", "shape": list(shape), "data_offsets": list(offsets)}


def _state(reg: Registry) -> dict:
    """Everything a refused operation must leave unchanged: HEAD, refs, reflogs and the
    set of stored objects (a refused commit stores nothing, not even orphan blobs)."""
    ah = reg.ah_dir
    refs = {p.relative_to(ah).as_posix(): p.read_bytes() for p in (ah / "refs").rglob("*") if p.is_file()}
    logs = {p.relative_to(ah).as_posix(): p.read_bytes() for p in (ah / "logs").rglob("*") if p.is_file()}
    objects = sorted(reg.store.iter_ids())
    return {"head": (ah / "HEAD").read_bytes(), "refs": refs, "logs": logs, "objects": objects}


@pytest.fixture
def reg(registry, tmp_path) -> Registry:
    """A registry with one good commit on main, so we can check nothing is lost."""
    r = registry
    r.commit(write_adapter(tmp_path / "good"), "good adapter")
    return r


def _assert_refused_cleanly(reg: Registry, before: dict) -> None:
    assert _state(reg) == before
    # The earlier commit is intact and still reads back.
    assert reg.log("main")[0].message == "good adapter"
    for oid in reg.store.iter_ids():
        reg.store.read(oid)




# --- pickle weights: refused, never unpickled -------------------------------------------


class _Evil:
    """Unpickling this creates `marker`: the proof that someone ran pickle.load."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil_pickle(marker: Path) -> bytes:
    return pickle.dumps({"lora_A": _Evil(marker)}, protocol=4)


def test_evil_pickle_really_creates_marker_when_loaded(tmp_path):
    # Control: the payload used below does run code when unpickled, so a missing
    # marker in the other tests means "never unpickled", not "payload was inert".
    marker = tmp_path / "control-marker"
    pickle.loads(_evil_pickle(marker))
    assert marker.exists()


@pytest.mark.parametrize("name", ["adapter_model.bin", "model.pt", "weights.pth", "sub/model.ckpt", "x.pkl"])
def test_pickle_suffix_refused(reg, tmp_path, name):
    marker = tmp_path / "pwned"
    folder = _bad_folder(tmp_path)
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(_evil_pickle(marker))
    before = _state(reg)
    with pytest.raises(PickleRefused) as exc:
        reg.commit(folder, "with pickle")
    assert name in str(exc.value)
    assert "safetensors" in str(exc.value)
    assert not marker.exists()
    _assert_refused_cleanly(reg, before)


def test_pickle_renamed_to_safetensors_refused(reg, tmp_path):
    marker = tmp_path / "pwned"
    folder = _bad_folder(tmp_path)
    (folder / "adapter_model.safetensors").write_bytes(_evil_pickle(marker))
    before = _state(reg)
    with pytest.raises(PickleRefused, match="adapter_model.safetensors.*pickle"):
        reg.commit(folder, "renamed pickle")
    assert not marker.exists()
    _assert_refused_cleanly(reg, before)


def test_torch_save_renamed_to_safetensors_refused(reg, tmp_path):
    torch = pytest.importorskip("torch")
    marker = tmp_path / "pwned"
    folder = _bad_folder(tmp_path)
    target = folder / "adapter_model.safetensors"
    torch.save({"w": torch.zeros(3), "evil": _Evil(marker)}, str(target))
    assert target.read_bytes()[:4] == b"PK\x03\x04"  # really a torch.save zip archive
    before = _state(reg)
    with pytest.raises(PickleRefused, match="torch.save"):
        reg.commit(folder, "renamed torch.save")
    assert not marker.exists()
    _assert_refused_cleanly(reg, before)


def test_cli_pickle_refused(reg, tmp_path):
    marker = tmp_path / "pwned"
    folder = _bad_folder(tmp_path)
    (folder / "adapter_model.bin").write_bytes(_evil_pickle(marker))
    before = _state(reg)
    proc = run_ah("--registry", str(reg.root), "commit", str(folder), "-m", "x")
    assert_cli_error(proc, 2, "adapter_model.bin", "safetensors")
    assert not marker.exists()
    assert _state(reg) == before


# --- malformed safetensors --------------------------------------------------------------

_DATA16 = bytes(range(16))

MALFORMED = {
    "header_past_end": (_raw_safetensors({"a": _f32([0, 16])}, _DATA16, length=10_000), "runs past the end"),
    "header_over_limit": (
        _raw_safetensors({"a": _f32([0, 16])}, _DATA16, length=MAX_HEADER_LEN + 1),
        f"over the {MAX_HEADER_LEN} byte limit",
    ),
    "too_short": (b"\x01\x00\x00", "too short"),
    "offsets_out_of_range": (_raw_safetensors({"a": _f32([0, 1_000_000], (250_000,))}, _DATA16), "out of range"),
    "offsets_reversed": (_raw_safetensors({"a": _f32([16, 0])}, _DATA16), "out of range"),
    "offsets_negative": (_raw_safetensors({"a": _f32([-16, 0])}, _DATA16), "out of range"),
    "overlapping": (
        _raw_safetensors({"a": _f32([0, 16]), "b": _f32([8, 24])}, bytes(24)),
        "overlaps",
    ),
    "duplicate_names": (
        _raw_safetensors(b'{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},'
                         b'"a":{"dtype":"F32","shape":[4],"data_offsets":[16,32]}}', bytes(32)),
        "duplicate tensor name 'a'",
    ),
    "size_not_shape_times_dtype": (_raw_safetensors({"a": _f32([0, 12])}, bytes(12)), "needs 16"),
    "hole_in_data": (
        _raw_safetensors({"a": _f32([0, 16]), "b": _f32([20, 36])}, bytes(36)),
        "hole before tensor 'b'",
    ),
    "trailing_bytes": (_raw_safetensors({"a": _f32([0, 16])}, bytes(20)), "4 trailing bytes"),
    "non_json_header": (_raw_safetensors(b"{not json at all", _DATA16), "not valid JSON"),
    "non_utf8_header": (_raw_safetensors(b'{"\xff":1}', _DATA16), "not valid JSON"),
    "header_not_object": (_raw_safetensors(b"[1, 2, 3]", b""), "not a JSON object"),
    "unknown_dtype": (
        _raw_safetensors({"a": {"dtype": "F31", "shape": [4], "data_offsets": [0, 16]}}, _DATA16),
        "unknown dtype",
    ),
    "bad_shape": (
        _raw_safetensors({"a": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, _DATA16),
        "bad shape",
    ),
    "bad_metadata": (_raw_safetensors({"__metadata__": {"k": 1}, "a": _f32([0, 16])}, _DATA16), "__metadata__"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_parse_layout_refuses(case):
    data, fragment = MALFORMED[case]
    with pytest.raises(MalformedSafetensors) as exc:
        parse_layout(data, "adapter_model.safetensors")
    assert fragment in str(exc.value)
    assert str(exc.value).startswith("adapter_model.safetensors: ")


def test_parse_layout_accepts_real_file(tmp_path):
    # The hand-built and the library-built forms of a good file both pass.
    parse_layout(_raw_safetensors({"a": _f32([0, 16]), "b": _f32([16, 32])}, bytes(32)))
    path = write_adapter(tmp_path / "ok") / "adapter_model.safetensors"
    layout = parse_layout(path.read_bytes())
    assert len(layout.tensors) == 2 and all(t.name.endswith(".weight") for t in layout.tensors)


def test_parse_layout_reuses_a_checked_header_only_for_the_same_file_size():
    # Layouts are remembered by (header, file size): a good header seen before must not
    # let a file with trailing bytes or a cut-off data region through.
    header = {"a": _f32([0, 16]), "b": _f32([16, 32])}
    good = _raw_safetensors(header, bytes(32))
    first = parse_layout(good)
    assert parse_layout(bytearray(good)) is first  # remembered
    with pytest.raises(MalformedSafetensors, match="trailing bytes"):
        parse_layout(good + b"\0")
    with pytest.raises(MalformedSafetensors, match="out of range"):
        parse_layout(good[:-4])
    assert [(t.name, t.start, t.end) for t in parse_layout(good).tensors] == [
        ("a", len(good) - 32, len(good) - 16), ("b", len(good) - 16, len(good))]


def test_parse_layout_names_a_duplicate_inner_key():
    # A key given twice inside a tensor's entry is refused like a duplicate tensor name.
    dup = _raw_safetensors(b'{"a": {"dtype": "F32", "dtype": "F16", "shape": [4], "data_offsets": [0, 16]}}', _DATA16)
    with pytest.raises(MalformedSafetensors, match="duplicate tensor name 'dtype'"):
        parse_layout(dup)


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_commit_refuses_malformed_safetensors(reg, tmp_path, case):
    data, fragment = MALFORMED[case]
    folder = _bad_folder(tmp_path)
    (folder / "adapter_model.safetensors").write_bytes(data)
    before = _state(reg)
    with pytest.raises(MalformedSafetensors) as exc:
        reg.commit(folder, "malformed")
    assert fragment in str(exc.value)
    _assert_refused_cleanly(reg, before)


def test_cli_malformed_safetensors(reg, tmp_path):
    folder = _bad_folder(tmp_path)
    (folder / "adapter_model.safetensors").write_bytes(MALFORMED["overlapping"][0])
    before = _state(reg)
    proc = run_ah("--registry", str(reg.root), "commit", str(folder), "-m", "x")
    assert_cli_error(proc, 2, "adapter_model.safetensors", "overlaps")
    assert _state(reg) == before


# --- unsafe names in a real folder at commit --------------------------------------------


@pytest.mark.parametrize(
    "rel, error, fragment",
    [
        (".ah/config.json", UnsafePath, "repository folder"),
        ("sub/.ah/HEAD", UnsafePath, "repository folder"),
        (".git/config", UnsafePath, "repository folder"),
        ("back\\slash.txt", UnsafePath, "backslash"),
        ("tab\there.txt", UnsafePath, "control character"),
    ],
)
def test_commit_refuses_unsafe_names(reg, tmp_path, rel, error, fragment):
    folder = _bad_folder(tmp_path)
    (folder / rel).parent.mkdir(parents=True, exist_ok=True)
    (folder / rel).write_text("x")
    before = _state(reg)
    with pytest.raises(error, match=fragment):
        reg.commit(folder, "unsafe")
    _assert_refused_cleanly(reg, before)


def test_commit_refuses_non_utf8_name(reg, tmp_path):
    # Linux allows any bytes in a name; a snapshot path must be UTF-8 to be stored and
    # written back identically. Refused up front: no traceback, no orphan objects.
    folder = _bad_folder(tmp_path)
    with open(os.fsencode(folder) + b"/\xff\xfe.txt", "wb") as fh:
        fh.write(b"x")
    before = _state(reg)
    with pytest.raises(UnsafePath, match="not valid UTF-8"):
        reg.commit(folder, "non-utf8")
    _assert_refused_cleanly(reg, before)
    assert_cli_error(run_ah("--registry", reg.root, "commit", folder, "-m", "x"), 2, "not valid UTF-8")


def test_commit_refuses_empty_ah_folder(reg, tmp_path):
    # Even an empty `.ah/` folder inside an adapter is a registry-looking name.
    folder = _bad_folder(tmp_path)
    (folder / ".ah").mkdir()
    before = _state(reg)
    with pytest.raises(UnsafePath):
        reg.commit(folder, "unsafe")
    _assert_refused_cleanly(reg, before)


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_commit_refuses_symlinks(reg, tmp_path, kind):
    folder = _bad_folder(tmp_path)
    outside = tmp_path / "outside"
    if kind == "file":
        outside.write_text("secret")
    else:
        outside.mkdir()
        (outside / "secret.txt").write_text("secret")
    (folder / "link").symlink_to(outside)
    before = _state(reg)
    with pytest.raises(BadAdapter, match="symlink"):
        reg.commit(folder, "symlink")
    _assert_refused_cleanly(reg, before)


def test_commit_refuses_fifo_without_blocking(reg, tmp_path):
    # A named pipe would block a reader forever: refused from its lstat, never opened.
    folder = _bad_folder(tmp_path)
    os.mkfifo(folder / "pipe")
    before = _state(reg)
    with pytest.raises(BadAdapter, match="pipe is not a regular file"):
        reg.commit(folder, "fifo")
    _assert_refused_cleanly(reg, before)


def test_cli_backslash_name(reg, tmp_path):
    folder = _bad_folder(tmp_path)
    (folder / "a\\b.txt").write_text("x")
    proc = run_ah("--registry", str(reg.root), "commit", str(folder), "-m", "x")
    assert_cli_error(proc, 2, "backslash")


# --- unsafe names in a stored snapshot at checkout --------------------------------------


def _plant_snapshot(reg: Registry, paths: list[str], branch: str = "evil") -> str:
    """Store a snapshot whose paths were never checked (as a hostile remote could send)
    and a commit on `branch` pointing at it; return the snapshot id."""
    blob = reg.store.put(BLOB, b"payload\n")
    files = tuple(FileEntry(p, "file", 8, blob) for p in sorted(paths))
    snap_id = reg.store.put(SNAPSHOT, Snapshot(files).serialize())  # serialize() does not check
    commit = Commit(snap_id, (), "Mallory <m@example.com>", 0, "evil", {})
    cid = reg.store.put(COMMIT, commit.serialize())
    reg.refs.update("refs/heads/" + branch, cid, expected=None)
    return snap_id


UNSAFE_STORED = [
    "../escape.txt",
    "sub/../../escape.txt",
    "..",
    "./x",
    "a//b",
    "nul\0byte",
    "back\\..\\escape.txt",
    ".ah/config.json",
    "deep/.AH/HEAD",
    ".git/hooks/post-checkout",
    "ctrl\nname",
    "",
]


@pytest.mark.parametrize("bad", UNSAFE_STORED + ["ABSOLUTE"])
def test_checkout_refuses_unsafe_stored_names(reg, tmp_path, bad):
    if bad == "ABSOLUTE":
        bad = str(tmp_path / "abs-escape.txt")
    snap_id = _plant_snapshot(reg, ["adapter_config.json", bad])
    out = tmp_path / "work" / "out"
    before_tree = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    with pytest.raises(CorruptObject) as exc:
        reg.checkout("evil", out)
    assert exc.value.oid == snap_id
    assert snap_id in str(exc.value)
    # Nothing at all was written: not the target, not a single file anywhere.
    after_tree = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    assert after_tree == before_tree
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "work" / "escape.txt").exists()
    assert not (tmp_path / "abs-escape.txt").exists()


@pytest.mark.parametrize("paths", [["a", "a/b"], ["a", "a-x", "a/b/c"], ["x/y", "x/y/z"]])
def test_checkout_refuses_file_and_folder_of_one_name(reg, tmp_path, paths):
    # No real folder holds both `a` and `a/b`; a snapshot that does is refused before
    # checkout writes `a` (else it would fail half way, leaving a partial folder).
    snap_id = _plant_snapshot(reg, paths)
    out = tmp_path / "out"
    with pytest.raises(CorruptObject, match="is both a file and a folder") as exc:
        reg.checkout("evil", out)
    assert exc.value.oid == snap_id
    assert not out.exists()


def test_checkout_refuses_lone_surrogate_in_stored_name(reg, tmp_path):
    # Valid JSON (a backslash-u escape of a lone surrogate) that no UTF-8 file name can produce: corrupt, no crash.
    blob = reg.store.put(BLOB, b"payload\n")
    body = ('{"files":[{"blob":"%s","kind":"file","path":"x\\udcff","size":8}]}' % blob).encode()
    snap_id = reg.store.put(SNAPSHOT, body)
    cid = reg.store.put(COMMIT, Commit(snap_id, (), "M <m@example.com>", 0, "evil", {}).serialize())
    reg.refs.update("refs/heads/evil", cid, expected=None)
    with pytest.raises(CorruptObject, match="not valid Unicode") as exc:
        reg.checkout("evil", tmp_path / "out")
    assert exc.value.oid == snap_id
    assert not (tmp_path / "out").exists()


def test_materialize_rechecks_each_path(reg, tmp_path):
    # Defence in depth: even past the snapshot check, check_relpath refuses the name.
    from adapterhub.paths import check_relpath

    for bad in UNSAFE_STORED + ["/etc/passwd", "C:/x"]:
        with pytest.raises(UnsafePath):
            check_relpath(bad)


def test_cli_checkout_unsafe_stored_name(reg, tmp_path):
    snap_id = _plant_snapshot(reg, ["../escape.txt"])
    out = tmp_path / "out"
    proc = run_ah("--registry", str(reg.root), "checkout", "evil", "-o", str(out))
    assert_cli_error(proc, 1, f"corrupt object {snap_id}", "..")
    assert not out.exists()
    assert not (tmp_path / "escape.txt").exists()


# --- checkout never writes through a symlink --------------------------------------------


@pytest.fixture
def nested(registry, tmp_path) -> Registry:
    """A registry whose main holds a file at the top and one in a sub-folder."""
    r = registry
    folder = write_adapter(tmp_path / "nested")
    (folder / "extra").mkdir()
    (folder / "extra" / "notes.txt").write_text("from the registry\n")
    r.commit(folder, "nested")
    return r


def test_checkout_force_replaces_file_symlink_without_following(nested, tmp_path):
    outside = tmp_path / "outside.json"
    outside.write_text("ORIGINAL")
    out = tmp_path / "out"
    out.mkdir()
    (out / "adapter_config.json").symlink_to(outside)
    nested.checkout("main", out, force=True)
    assert outside.read_text() == "ORIGINAL"
    assert not (out / "adapter_config.json").is_symlink()
    assert (out / "adapter_config.json").read_bytes() == (tmp_path / "nested" / "adapter_config.json").read_bytes()


def test_checkout_force_refuses_directory_symlink(nested, tmp_path):
    outside = tmp_path / "outside_dir"
    outside.mkdir()
    (outside / "notes.txt").write_text("ORIGINAL")
    out = tmp_path / "out"
    out.mkdir()
    (out / "extra").symlink_to(outside, target_is_directory=True)
    with pytest.raises(CheckoutError, match="symlink"):
        nested.checkout("main", out, force=True)
    assert sorted(os.listdir(outside)) == ["notes.txt"]
    assert (outside / "notes.txt").read_text() == "ORIGINAL"
    assert (out / "extra").is_symlink()


def test_checkout_force_never_writes_through_a_hard_link(nested, tmp_path):
    outside = tmp_path / "outside.json"
    outside.write_text("ORIGINAL")
    out = tmp_path / "out"
    out.mkdir()
    os.link(outside, out / "adapter_config.json")
    nested.checkout("main", out, force=True)
    assert outside.read_text() == "ORIGINAL"  # the rename replaced the link, not its content
    assert (out / "adapter_config.json").read_bytes() == (tmp_path / "nested" / "adapter_config.json").read_bytes()


@pytest.mark.parametrize("where", [".ah", ".ah/objects", ".ah/new/folder", "link-to-ah"])
def test_checkout_refuses_registry_folder_as_target(reg, tmp_path, where):
    # An adapter holding `HEAD` and `config.json`, checked out with --force into `.ah/`,
    # would overwrite the registry itself.
    folder = tmp_path / "looks-like-ah"
    folder.mkdir()
    (folder / "HEAD").write_text("ref: refs/heads/hijacked\n")
    (folder / "config.json").write_text('{"format_version": 7}')
    reg.commit(folder, "registry look-alike", branch="lookalike")
    (reg.root / "link-to-ah").symlink_to(reg.ah_dir, target_is_directory=True)
    before = _state(reg)
    config = (reg.ah_dir / "config.json").read_bytes()
    with pytest.raises(CheckoutError, match="inside a registry's .ah/ folder"):
        reg.checkout("lookalike", reg.root / where, force=True)
    assert _state(reg) == before and (reg.ah_dir / "config.json").read_bytes() == config
    assert not (reg.ah_dir / "new").exists()
    Registry.open(reg.root).log("main")


def test_checkout_refuses_file_as_target(nested, tmp_path):
    target = tmp_path / "out"
    target.write_text("not a folder")
    with pytest.raises(CheckoutError, match="exists and is not a folder"):
        nested.checkout("main", target, force=True)
    assert target.read_text() == "not a folder"


def test_checkout_refuses_symlinked_target_folder(nested, tmp_path):
    outside = tmp_path / "outside_dir"
    outside.mkdir()
    (tmp_path / "out").symlink_to(outside, target_is_directory=True)
    with pytest.raises(CheckoutError, match="symlink"):
        nested.checkout("main", tmp_path / "out", force=True)
    assert os.listdir(outside) == []


def test_cli_checkout_force_symlinks(nested, tmp_path):
    outside_file = tmp_path / "outside.json"
    outside_file.write_text("ORIGINAL")
    outside_dir = tmp_path / "outside_dir"
    outside_dir.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "adapter_config.json").symlink_to(outside_file)
    (out / "extra").symlink_to(outside_dir, target_is_directory=True)
    proc = run_ah("--registry", str(nested.root), "checkout", "main", "-o", str(out), "--force")
    assert_cli_error(proc, 1, "symlink", str(out / "extra"))
    assert outside_file.read_text() == "ORIGINAL"
    assert os.listdir(outside_dir) == []


def test_checkout_without_force_refuses_non_empty(nested, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(CheckoutError, match="not empty"):
        nested.checkout("main", out)
    assert os.listdir(out) == ["mine.txt"]


# --- flipped bytes in stored objects ----------------------------------------------------


def _object_path(reg: Registry, oid: str) -> Path:
    return reg.ah_dir / "objects" / oid[:2] / oid[2:]


def _flip(path: Path, pos: int) -> None:
    data = bytearray(path.read_bytes())
    data[pos % len(data)] ^= 0x01
    os.chmod(path, 0o644)
    path.write_bytes(bytes(data))


def _positions(path: Path) -> list[int]:
    size = path.stat().st_size
    # magic, raw_len, start / middle / end of the zstd payload.
    return [0, 6, codec.RECORD_HEADER.size + 1, (codec.RECORD_HEADER.size + size) // 2, size - 1]


def _every_kind(reg: Registry) -> dict[str, str]:
    cid = reg.resolve("main")
    commit = reg.store.get_commit(cid)
    snap = reg.store.get_snapshot(commit.snapshot)
    st = [f for f in snap.files if f.kind == "safetensors"][0]
    return {"commit": cid, "snapshot": commit.snapshot, "header": st.blob, "tensor": st.tensors[0].blob}


@pytest.mark.parametrize("kind", ["commit", "snapshot", "header", "tensor"])
def test_flipped_byte_detected_on_read(reg, kind):
    oid = _every_kind(reg)[kind]
    path = _object_path(reg, oid)
    original = path.read_bytes()
    for pos in _positions(path):
        _flip(path, pos)
        with pytest.raises(CorruptObject) as exc:
            reg.store.read(oid)
        assert exc.value.oid == oid and oid in str(exc.value)
        path.write_bytes(original)
    reg.store.read(oid)  # restored: reads again


def test_tampered_content_with_valid_record_detected(reg):
    # A record that decodes cleanly but holds other bytes (a swapped file) fails the hash.
    oid = _every_kind(reg)["tensor"]
    obj_type, body = reg.store.read(oid)
    forged = bytearray(body)
    forged[0] ^= 0xFF
    from adapterhub.objects import header

    path = _object_path(reg, oid)
    os.chmod(path, 0o644)
    path.write_bytes(codec.encode([header(obj_type, len(forged)), bytes(forged)]))
    with pytest.raises(CorruptObject, match=f"{oid}: content does not hash to its id"):
        reg.store.read(oid)


def test_cli_show_reports_corrupt_commit(reg):
    oid = _every_kind(reg)["commit"]
    _flip(_object_path(reg, oid), -1)
    proc = run_ah("--registry", str(reg.root), "show", "main")
    assert_cli_error(proc, 1, f"corrupt object {oid}")
    proc = run_ah("--registry", str(reg.root), "log", "--format", "json")
    assert_cli_error(proc, 1, oid)


def test_cli_checkout_reports_corrupt_tensor(reg, tmp_path):
    oid = _every_kind(reg)["tensor"]
    path = _object_path(reg, oid)
    _flip(path, path.stat().st_size // 2)
    out = tmp_path / "out"
    proc = run_ah("--registry", str(reg.root), "checkout", "main", "-o", str(out))
    assert_cli_error(proc, 1, f"corrupt object {oid}")
    # The damaged file never appears under its final name, and no temp file is left.
    assert not (out / "adapter_model.safetensors").exists()
    assert [p.name for p in out.iterdir()] in ([], ["adapter_config.json"])


def test_cli_missing_object_named(reg, tmp_path):
    oid = _every_kind(reg)["tensor"]
    _object_path(reg, oid).unlink()
    out = tmp_path / "out"
    assert_cli_error(run_ah("--registry", reg.root, "checkout", "main", "-o", out), 1, f"object {oid} not found")
    assert not (out / "adapter_model.safetensors").exists()
    assert_cli_error(run_ah("--registry", reg.root, "cat-file", "-p", oid), 2, f"unknown revision '{oid}'")


def test_truncated_object_detected(reg):
    oid = _every_kind(reg)["snapshot"]
    path = _object_path(reg, oid)
    data = path.read_bytes()
    for cut in (0, 5, codec.RECORD_HEADER.size, len(data) - 1):
        os.chmod(path, 0o644)
        path.write_bytes(data[:cut])
        with pytest.raises(CorruptObject) as exc:
            reg.store.read(oid)
        assert exc.value.oid == oid


# --- registry format version -------------------------------------------------------------


@pytest.mark.parametrize("config", [{"format_version": 3}, {"format_version": "1"}, {"format_version": True}, {}, [1]])
def test_unknown_format_version_refused(reg, config):
    (reg.ah_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedFormat, match="format version"):
        Registry.open(reg.root)


def test_version_1_registry_is_read_and_upgraded(reg):
    """A registry made before format version 2 opens, keeps its objects and refs, and is
    marked version 2 so that an older adapterhub refuses it cleanly from now on."""
    head = reg.resolve("HEAD")
    (reg.ah_dir / "config.json").write_text(json.dumps({"format_version": 1, "kept": "yes"}))
    again = Registry.open(reg.root)
    assert json.loads((reg.ah_dir / "config.json").read_text()) == {"format_version": 2, "kept": "yes"}
    assert again.resolve("HEAD") == head and again.log("main")[0].message == "good adapter"


def test_fsck_leaves_a_version_1_registry_as_it_is(reg):
    """`ah fsck` changes nothing, the format marker included (helper-23: it rewrote it)."""
    (reg.ah_dir / "config.json").write_text(json.dumps({"format_version": 1, "kept": "yes"}))
    before = (reg.ah_dir / "config.json").stat().st_mtime_ns
    proc = run_ah("--registry", str(reg.root), "fsck")
    assert proc[0] == 0, proc
    assert json.loads((reg.ah_dir / "config.json").read_text()) == {"format_version": 1, "kept": "yes"}
    assert (reg.ah_dir / "config.json").stat().st_mtime_ns == before
    assert Registry.open(reg.root, read_only=True).config["format_version"] == 1


def test_cli_unknown_format_version(reg):
    (reg.ah_dir / "config.json").write_text(json.dumps({"format_version": 99}))
    proc = run_ah("--registry", str(reg.root), "log")
    assert_cli_error(proc, 1, "format version 99", "upgrade")


def test_config_not_json_refused(reg):
    (reg.ah_dir / "config.json").write_text("{nope")
    with pytest.raises(UnsupportedFormat, match="not valid JSON"):
        Registry.open(reg.root)


def test_a_fifo_where_an_object_or_a_ref_belongs_is_an_error_not_a_hang(reg, tmp_path):
    """A FIFO blocks a plain open forever: every command (fsck too) hung on one put where a
    loose object or a ref file belongs (helper-25). Now each is refused as not a regular file."""
    head = reg.resolve("HEAD")
    snap = reg.store.get_commit(head).snapshot
    loose = reg.ah_dir / "objects" / snap[:2] / snap[2:]
    if not loose.exists():
        pytest.skip("the snapshot is packed in this fixture")
    loose.unlink()
    os.mkfifo(loose)
    os.mkfifo(reg.ah_dir / "refs" / "heads" / "fifo")
    rc, out, err = run_ah("--registry", reg.root, "checkout", "HEAD", "-o", tmp_path / "out", timeout=60)
    assert rc == 1 and "not a regular file" in err
    rc, out, err = run_ah("--registry", reg.root, "fsck", "--format", "json", timeout=60)
    assert rc == 1
    found = {(f["id"], f["object"]) for f in json.loads(out)["findings"]}
    assert ("ref-corrupt", "refs/heads/fifo") in found and any(obj == snap for _, obj in found), found
    with pytest.raises(CorruptObject, match="not a regular file"):
        reg.refs.read("refs/heads/fifo")
    (reg.ah_dir / "refs" / "heads" / "fifo").unlink()
    os.mkfifo(reg.ah_dir / "packed-refs")
    rc, out, err = run_ah("--registry", reg.root, "log", timeout=60)
    assert rc == 1 and "packed-refs is not a regular file" in err
