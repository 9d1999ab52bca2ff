"""Two threads committing through one Registry object at once (a training loop that saves
from two workers, a notebook with a background thread).

A store's write batch belongs to the thread that opened it: before, the second thread's
commit joined the first one's batch, the first flushed while the second still added
records, and commits were lost or a pack was published that did not match its index
(found by a review; every later commit and gc then failed on it).
"""

from __future__ import annotations

import threading

import numpy as np
from safetensors.numpy import save_file

from adapterhub.gc import collect_garbage
from adapterhub.registry import Registry


def _checkpoint(folder, thread: int, step: int, tensors: int):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1000 * thread + step)
    save_file({f"layer{k}.lora_A.weight": rng.standard_normal((32, 64)).astype(np.float32) for k in range(tensors)},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 32}')
    return folder


def test_two_threads_commit_through_one_registry_and_lose_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("AH_AUTHOR", "t <t@example.invalid>")
    rounds = 6
    # 24 tensors make a commit a pack; 3 keep it a few loose objects: both paths at once.
    folders = {(t, s): _checkpoint(tmp_path / f"ck{t}-{s}", t, s, 24 if (s + t) % 3 else 3)
               for t in range(2) for s in range(rounds)}
    Registry.init(tmp_path / "reg")
    shared = Registry.open(tmp_path / "reg")
    barrier = threading.Barrier(2)
    done: dict[int, list[tuple[str, int]]] = {0: [], 1: []}
    errors: list[BaseException] = []

    def work(t: int) -> None:
        for s in range(rounds):
            barrier.wait()
            try:
                done[t].append((shared.commit(folders[(t, s)], f"t{t} s{s}", branch=f"b{t}").id, s))
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    fresh = Registry.open(tmp_path / "reg")
    for t in range(2):
        assert len(done[t]) == rounds
        for oid, s in done[t]:
            out = tmp_path / f"out{t}-{s}"
            fresh.checkout(oid, out)
            for name in ("adapter_model.safetensors", "adapter_config.json"):
                assert (out / name).read_bytes() == (folders[(t, s)] / name).read_bytes()
        assert fresh.resolve(f"b{t}") == done[t][-1][0]
    # Every pack is whole: a commit after them, and gc over them, go through.
    fresh.commit(_checkpoint(tmp_path / "after", 5, 0, 24), "after")
    collect_garbage(fresh.ah_dir, fresh.store, fresh.refs)
