"""Property: any tensor set and extra files -> commit -> checkout -> identical bytes.

Hypothesis draws safetensors files the way real writers make them (safetensors' own
torch and numpy writers: random names, F32/F16/BF16/I64/U8, shapes including zero-size
ones, random `__metadata__`) plus small extra files in nested folders, and checks that
checkout gives back every file byte for byte, that committing the same folder again adds
nothing, and that a run of revisions in one registry each come back exactly.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

torch = pytest.importorskip("torch")
from safetensors.numpy import save_file as save_numpy  # noqa: E402
from safetensors.torch import save_file as save_torch  # noqa: E402

from adapterhub.registry import Registry  # noqa: E402
from adapterhub.snapshot import PICKLE_SUFFIXES, SAFETENSORS_SUFFIX  # noqa: E402

DTYPES = {
    "F32": (torch.float32, np.float32),
    "F16": (torch.float16, np.float16),
    "BF16": (torch.bfloat16, None),  # numpy has no bfloat16: only the torch writer
    "I64": (torch.int64, np.int64),
    "U8": (torch.uint8, np.uint8),
}
ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "U8": 1}

SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)

tensor_names = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=24).filter(
    lambda s: s != "__metadata__"
)
shapes = st.lists(st.integers(min_value=0, max_value=6), min_size=0, max_size=3)
tensor_specs = st.tuples(st.sampled_from(sorted(DTYPES)), shapes, st.integers(0, 2**32 - 1))
metadata = st.none() | st.dictionaries(
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=12), st.text(max_size=40), max_size=4
)


@st.composite
def safetensors_files(draw):
    """(tensors spec, metadata, writer) for one safetensors file."""
    specs = draw(st.dictionaries(tensor_names, tensor_specs, max_size=6))
    numpy_ok = all(DTYPES[d][1] is not None for d, _, _ in specs.values())
    writer = draw(st.sampled_from(["torch", "numpy"] if numpy_ok else ["torch"]))
    meta = draw(metadata)
    if not specs and meta == {}:
        # safetensors 0.8 writes `{},"__metadata__":{}}` for this case: invalid JSON that it
        # cannot load back itself, so a commit rightly refuses it. Not a file users can have.
        meta = None
    return specs, meta, writer


# File name parts: letters, digits, punctuation users put in names, non-ASCII.
name_part = st.text(st.sampled_from("abcXYZ019_-. é+~"), min_size=1, max_size=10).filter(
    lambda p: p not in (".", "..") and p.lower() not in (".ah", ".git")
)
rel_paths = st.lists(name_part, min_size=1, max_size=3).map("/".join).filter(
    lambda p: not p.lower().endswith(PICKLE_SUFFIXES + (SAFETENSORS_SUFFIX,))
)
# Content that does not open like a pickle stream (which a commit refuses by content).
file_bytes = st.binary(max_size=300).filter(lambda b: not (len(b) >= 2 and b[0] == 0x80 and 2 <= b[1] <= 5))


def _no_file_dir_clash(paths) -> bool:
    return not any(q.startswith(p + "/") for p in paths for q in paths)


@st.composite
def adapter_folders(draw):
    """{relative path: safetensors spec or bytes}: one adapter_model.safetensors, maybe a
    second safetensors file in a subfolder, and a few small extra files."""
    files: dict[str, object] = {"adapter_model.safetensors": draw(safetensors_files())}
    if draw(st.booleans()):
        files["sub/extra weights.safetensors"] = draw(safetensors_files())
    extras = draw(st.dictionaries(rel_paths, file_bytes, max_size=4))
    for path, data in extras.items():
        if path not in files:
            files[path] = data
    if not _no_file_dir_clash(list(files)):
        # "a" as a file and "a/b" below it cannot both exist: drop the deeper ones.
        keep = {}
        for path in sorted(files, key=len):
            if not any(path.startswith(k + "/") for k in keep):
                keep[path] = files[path]
        files = keep
    return files


def _make_tensor(dtype: str, shape: list[int], seed: int, writer: str):
    n = math.prod(shape)
    raw = np.random.default_rng(seed).bytes(n * ITEMSIZE[dtype])
    torch_dtype, np_dtype = DTYPES[dtype]
    if writer == "numpy":
        return np.frombuffer(raw, dtype=np_dtype).reshape(shape).copy()
    if n == 0:
        return torch.empty(shape, dtype=torch_dtype)
    return torch.frombuffer(bytearray(raw), dtype=torch_dtype).reshape(shape).clone()


def write_folder(root: Path, files: dict) -> Path:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
            continue
        specs, meta, writer = content
        tensors = {name: _make_tensor(d, shape, seed, writer) for name, (d, shape, seed) in specs.items()}
        (save_numpy if writer == "numpy" else save_torch)(tensors, str(path), metadata=meta)
    return root


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@SETTINGS
@given(files=adapter_folders())
def test_commit_checkout_identical_bytes(files):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = write_folder(tmp / "adapter", files)
        reg = Registry.init(tmp / "reg")
        res = reg.commit(src, "random adapter")
        assert res.files == len(files)
        out = tmp / "out"
        reg.checkout(res.id, out)
        assert tree_bytes(out) == tree_bytes(src)
        # The snapshot is a pure function of the folder: committing it again stores nothing.
        again = reg.commit(src, "same adapter again")
        assert again.new_objects == 0
        assert reg.show(again.id).info.commit.snapshot == reg.show(res.id).info.commit.snapshot


@settings(SETTINGS, max_examples=15)
@given(revisions=st.lists(adapter_folders(), min_size=2, max_size=4))
def test_revision_history_roundtrip(revisions):
    """Several revisions in one registry (sharing whatever they share) each come back exactly."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        reg = Registry.init(tmp / "reg")
        ids, trees = [], []
        for i, files in enumerate(revisions):
            src = write_folder(tmp / f"rev{i}", files)
            trees.append(tree_bytes(src))
            ids.append(reg.commit(src, f"revision {i}").id)
        assert [c.id for c in reg.log()] == ids[::-1]
        for i, oid in enumerate(ids):
            out = tmp / f"out{i}"
            reg.checkout(f"HEAD~{len(ids) - 1 - i}", out)
            assert tree_bytes(out) == trees[i]


@pytest.mark.parametrize("header_len", [640, 896, 1152, 1408])
def test_header_length_that_opens_like_a_pickle(tmp_path, header_len):
    """A header length of 0x0280/0x0380/0x0480/0x0580 makes a safetensors file start with
    0x80 0x02..0x05, the opening of a pickle stream: still a valid adapter (regression)."""
    tensors = {"base_model.model.layers.0.q_proj.lora_A.weight": torch.ones(4, 8)}
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    path.parent.mkdir()
    for pad in range(header_len):
        save_torch(tensors, str(path), metadata={"format": "pt", "pad": "x" * pad})
        if int.from_bytes(path.read_bytes()[:8], "little") == header_len:
            break
    data = path.read_bytes()
    assert data[0] == 0x80 and 2 <= data[1] <= 5
    reg = Registry.init(tmp_path / "reg")
    reg.checkout(reg.commit(path.parent, "odd header length").id, tmp_path / "out")
    assert tree_bytes(tmp_path / "out") == tree_bytes(path.parent)
