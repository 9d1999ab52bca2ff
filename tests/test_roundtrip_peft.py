"""Real PEFT adapters survive commit -> checkout bit for bit and load to the same model.

Every adapter kind peft can put on the two tiny model families (tests/adapters.py), in
fp32 and bf16, is committed and checked out; every file must keep its sha256 (so the
safetensors header, its __metadata__ and the tensor order are untouched) and
`PeftModel.from_pretrained` on the checkout must compute exactly what the original does.
Then the storage promise: a tensor that did not change is stored once, across revisions
and across adapters, and history resolves the way revision expressions say.
"""

from __future__ import annotations

import json
import shutil
import struct

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

import adapters  # noqa: E402
from adapters import COMBOS, sha256_tree  # noqa: E402

from adapterhub.objects import BLOB, COMMIT, SNAPSHOT, TENSOR  # noqa: E402


def _safetensors_header(path) -> dict:
    data = path.read_bytes()
    (n,) = struct.unpack_from("<Q", data)
    return json.loads(data[8 : 8 + n])


def _objects_by_type(store, ids) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for oid in ids:
        out.setdefault(store.object_type(oid), set()).add(oid)
    return out


def _tensor_blobs(registry, rev: str) -> dict[str, str]:
    """{tensor name: tensor object id} of the adapter_model.safetensors of `rev`."""
    snap = registry.show(rev).snapshot
    (entry,) = [f for f in snap.files if f.path == "adapter_model.safetensors"]
    return {t.name: t.blob for t in entry.tensors}


@pytest.mark.parametrize("family,kind,dtype", COMBOS, ids=["-".join(c) for c in COMBOS])
def test_peft_adapter_roundtrip(registry, base_model, adapter_factory, tmp_path, family, kind, dtype):
    base = base_model(family)
    src = adapter_factory(family, kind, dtype)
    header = _safetensors_header(src / "adapter_model.safetensors")
    # The adapter is what peft wrote: its metadata, the asked-for dtype, no all-zero tensor.
    assert header.get("__metadata__", {}).get("format") == "pt"
    want = {"fp32": "F32", "bf16": "BF16"}[dtype]
    # peft also saves the base weight of a targeted tied lm_head (GPT-2 LoHa/LoKr) in the
    # base's dtype; the adapter's own tensors are in the asked-for one.
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__" and "base_layer" not in k} == {want}
    from safetensors.torch import load_file

    assert all(t.abs().sum() > 0 for t in load_file(src / "adapter_model.safetensors").values())

    result = registry.commit(src, f"{family} {kind} {dtype}")
    assert result.tensors == len(header) - 1
    out = tmp_path / "checkout"
    co = registry.checkout(result.id, out)
    assert co.id == result.id

    assert sha256_tree(out) == sha256_tree(src)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in src.iterdir())

    original = adapters.peft_outputs(base, src)
    restored = adapters.peft_outputs(base, out)
    assert torch.equal(original, restored)
    # The comparison means something only if the adapter changes the model.
    with torch.no_grad():
        plain = base(adapters.fixed_input()).logits
    assert not torch.equal(original, plain)


def test_cli_commit_and_checkout_roundtrip(ah, adapter_factory, tmp_path):
    """The same promise through the real `ah` command."""
    src = adapter_factory("llama", "lora", "bf16")
    (src / "tokenizer").mkdir()
    (src / "tokenizer" / "special_tokens_map.json").write_text('{"eos_token": "</s>"}\n')
    reg = tmp_path / "reg"
    rc, _, err = ah("init", reg)
    assert rc == 0, err
    rc, out, err = ah("--registry", reg, "commit", src, "-m", "first")
    assert rc == 0, err
    commit_id = out.strip().splitlines()[-1]
    assert len(commit_id) == 64
    rc, _, err = ah("--registry", reg, "checkout", commit_id[:10], "-o", tmp_path / "co")
    assert rc == 0, err
    assert sha256_tree(tmp_path / "co") == sha256_tree(src)


# --- storage: unchanged tensors are stored once ------------------------------------------


def test_unchanged_tensors_stored_once_across_revisions(registry, base_model, tmp_path):
    base = base_model("llama")
    model = adapters.make_peft_model(base, "llama", "lora", "fp32", seed=1)
    revs = [adapters.save_adapter(model, tmp_path / "r1")]
    # Revision 2 retrains layer 1's lora_B only; revision 3 retrains all of layer 0.
    changed2 = adapters.perturb(model, lambda n: "layers.1." in n and "lora_B" in n, seed=2)
    revs.append(adapters.save_adapter(model, tmp_path / "r2"))
    changed3 = adapters.perturb(model, lambda n: "layers.0." in n, seed=3)
    revs.append(adapters.save_adapter(model, tmp_path / "r3"))
    assert len(changed2) == 2 and len(changed3) == 4  # q_proj and v_proj in each layer

    store = registry.store
    results = []
    before = set(store.iter_ids())
    assert before == set()
    new_by_rev = []
    for i, folder in enumerate(revs):
        res = registry.commit(folder, f"rev {i + 1}")
        after = set(store.iter_ids())
        new = _objects_by_type(store, after - before)
        new_by_rev.append(new)
        # new_objects counts what the snapshot brought; the commit object is the one more.
        assert res.new_objects == len(after - before) - 1
        assert len(new[COMMIT]) == 1 and len(new[SNAPSHOT]) == 1
        results.append(res)
        before = after

    n_tensors = results[0].tensors
    assert n_tensors == 8
    assert len(new_by_rev[0][TENSOR]) == n_tensors
    # adapter_config.json, README.md and the safetensors header never change after rev 1.
    assert len(new_by_rev[0][BLOB]) == 3
    assert BLOB not in new_by_rev[1] and BLOB not in new_by_rev[2]
    assert len(new_by_rev[1][TENSOR]) == len(changed2)
    assert len(new_by_rev[2][TENSOR]) == len(changed3)
    assert results[1].new_objects == len(changed2) + 1
    assert results[2].new_objects == len(changed3) + 1
    total_tensors = sum(1 for oid in store.iter_ids() if store.object_type(oid) == TENSOR)
    assert total_tensors == n_tensors + len(changed2) + len(changed3)

    # The stored ids say exactly which tensors changed between revisions.
    t1, t2, t3 = (_tensor_blobs(registry, r.id) for r in results)
    differ12 = {n for n in t1 if t1[n] != t2[n]}
    differ23 = {n for n in t2 if t2[n] != t3[n]}
    assert differ12 == {n.replace(".default", "") for n in changed2}
    assert differ23 == {n.replace(".default", "") for n in changed3}

    for res, folder in zip(results, revs):
        out = tmp_path / f"co-{res.id[:8]}"
        registry.checkout(res.id, out)
        assert sha256_tree(out) == sha256_tree(folder)


def test_same_tensor_in_two_adapters_stored_once(registry, base_model, tmp_path):
    """Two users' adapters sharing a tensor (same init, different config) share its object."""
    base = base_model("llama")
    model = adapters.make_peft_model(base, "llama", "lora", "fp32", seed=4)
    alice = adapters.save_adapter(model, tmp_path / "alice")
    adapters.perturb(model, lambda n: "lora_B" in n, seed=5)
    model.peft_config["default"].lora_alpha = 16
    bob = adapters.save_adapter(model, tmp_path / "bob")

    ra = registry.commit(alice, "alice's adapter", branch="users/alice/main")
    before = set(registry.store.iter_ids())
    rb = registry.commit(bob, "bob's adapter", branch="users/bob/main")
    new = _objects_by_type(registry.store, set(registry.store.iter_ids()) - before)

    ta, tb = _tensor_blobs(registry, ra.id), _tensor_blobs(registry, rb.id)
    shared = {n for n in ta if ta[n] == tb[n]}
    assert shared == {n for n in ta if "lora_A" in n} and len(shared) == 4
    assert len(new[TENSOR]) == 4  # only bob's lora_B tensors are new
    assert len(new[BLOB]) == 1  # bob's adapter_config.json (lora_alpha differs)
    assert rb.parents == ()  # a new branch starts a new history
    for rev, folder in (("users/alice/main", alice), ("users/bob/main", bob)):
        registry.checkout(rev, tmp_path / rev.replace("/", "_"))
        assert sha256_tree(tmp_path / rev.replace("/", "_")) == sha256_tree(folder)


# --- history and revision expressions ------------------------------------------------------


@pytest.fixture
def history(registry, base_model, tmp_path):
    """Three LoRA revisions on main (saved folders kept), a tag on the first, a branch on the second."""
    base = base_model("gpt2")
    model = adapters.make_peft_model(base, "gpt2", "lora", "bf16", seed=6)
    folders, ids = [], []
    for i in range(3):
        if i:
            adapters.perturb(model, lambda n, i=i: f"h.{i - 1}." in n, seed=10 + i)
        folder = adapters.save_adapter(model, tmp_path / f"rev{i}")
        folders.append(folder)
        ids.append(registry.commit(folder, f"revision {i}").id)
    registry.create_tag("v1", ids[0])
    registry.create_branch("exp", ids[1])
    return registry, ids, folders


def test_log_order_newest_first(history, ah):
    registry, ids, _ = history
    log = registry.log()
    assert [c.id for c in log] == ids[::-1]
    assert [c.message for c in log] == ["revision 2", "revision 1", "revision 0"]
    assert log[0].parents == (ids[1],) and log[1].parents == (ids[0],) and log[2].parents == ()
    assert [c.id for c in registry.log("HEAD", n=2)] == ids[:0:-1]
    assert [c.id for c in registry.log("exp")] == ids[1::-1]

    rc, out, err = ah("--registry", registry.root, "log", "--format", "json")
    assert rc == 0, err
    entries = json.loads(out)
    assert [e["id"] for e in entries] == ids[::-1]
    assert entries[0]["parents"] == [ids[1]]
    assert all(e["author"] == "Test Author <test@example.com>" for e in entries)


@pytest.mark.parametrize(
    "rev,index",
    [
        ("HEAD", 2), ("HEAD~1", 1), ("HEAD~2", 0), ("HEAD^", 1), ("HEAD^^", 0), ("main~2", 0),
        ("v1", 0), ("exp", 1), ("exp~1", 0), ("main", 2), ("short:0", 0), ("short:1", 1), ("full:2", 2),
    ],
)
def test_checkout_by_revision_expression(history, tmp_path, rev, index):
    registry, ids, folders = history
    if rev.startswith("short:"):
        rev = ids[int(rev[6:])][:7]
    elif rev.startswith("full:"):
        rev = ids[int(rev[5:])]
    out = tmp_path / "co"
    result = registry.checkout(rev, out)
    assert result.id == ids[index]
    assert sha256_tree(out) == sha256_tree(folders[index])
    # The revisions really differ, so checking out the wrong one would be caught.
    others = [sha256_tree(f) for j, f in enumerate(folders) if j != index]
    assert all(sha256_tree(out) != o for o in others)


def test_checkout_refuses_non_empty_target(history, tmp_path):
    from adapterhub.errors import CheckoutError

    registry, ids, folders = history
    target = tmp_path / "busy"
    shutil.copytree(folders[0], target)
    with pytest.raises(CheckoutError):
        registry.checkout("HEAD", target)
    # The files that were there are untouched.
    assert sha256_tree(target) == sha256_tree(folders[0])
