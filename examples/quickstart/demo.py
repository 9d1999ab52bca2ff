"""adapterhub quickstart: a real LoRA training run, versioned.

Builds a 2-layer Llama-style model from a config (nothing is downloaded), trains a LoRA
adapter for a few steps on CPU, commits three revisions with `ah`, then shows the log,
one revision in detail, and checks out the first revision, proving it loads in PEFT and
gives the same outputs as when it was saved.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402


def ah(*args: str, registry: Path) -> str:
    """Run the real `ah` CLI and echo what it prints."""
    cmd = [sys.executable, "-m", "adapterhub.cli.main", "--registry", str(registry), *args]
    print(f"$ ah {' '.join(args)}")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    print(out.rstrip() + "\n")
    return out


def sha256_tree(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def build_base() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, default=Path("examples/quickstart/work"))
    parser.add_argument("--steps", type=int, default=5, help="training steps between revisions")
    args = parser.parse_args()
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    registry, ckpt = work / "registry", work / "checkpoint"
    os.environ.setdefault("AH_AUTHOR", "Quickstart <quickstart@example.com>")

    base = build_base()
    model = get_peft_model(
        base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    data = torch.randint(0, 256, (8, 32), generator=gen)
    probe = torch.randint(0, 256, (1, 16), generator=gen)

    ah("init", str(registry), registry=registry)
    expected_first = None
    for rev in range(1, 4):
        model.train()
        for _ in range(args.steps):
            loss = model(input_ids=data, labels=data).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
        model.eval()
        shutil.rmtree(ckpt, ignore_errors=True)
        model.save_pretrained(ckpt)
        if rev == 1:
            with torch.no_grad():
                expected_first = model(input_ids=probe).logits
            first_hashes = sha256_tree(ckpt)
        ah(
            "commit", str(ckpt), "-m", f"revision {rev}: {args.steps * rev} steps, loss {loss.item():.3f}",
            "--dataset", "synthetic://random-tokens", "--param", f"steps={args.steps * rev}", "--param", "lr=0.01",
            registry=registry,
        )

    ah("log", "--oneline", registry=registry)
    ah("show", "HEAD~2", registry=registry)
    out = work / "revision-1"
    ah("checkout", "HEAD~2", "-o", str(out), registry=registry)

    assert sha256_tree(out) == first_hashes, "checkout is not byte-identical"
    fresh = PeftModel.from_pretrained(build_base(), out).eval()
    with torch.no_grad():
        got = fresh(input_ids=probe).logits
    assert torch.equal(got, expected_first), "checked-out adapter gives different outputs"
    print("OK: revision 1 checked out byte-identical (sha256 of every file) and gives identical outputs in PEFT.")


if __name__ == "__main__":
    main()
