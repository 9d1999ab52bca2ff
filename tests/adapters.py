"""Real PEFT adapters on tiny, locally built base models, and the `ah` subprocess helper.

Tests need adapters exactly as `peft` writes them (config JSON, safetensors with peft's
own metadata and tensor order, README) rather than hand-made look-alikes, but must never
download anything. So the base models are built here from a config with random weights
(a 2-layer Llama and a 2-layer GPT-2, hidden size 64, vocabulary 128) and adapters are
made with `peft.get_peft_model(...).save_pretrained(...)`.

torch, transformers and peft are imported inside the functions that need them, so that a
test module that only wants `run_ah` (imported via conftest) does not pay their ~5 s import.
"""

from __future__ import annotations

import copy
import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

# --- the `ah` CLI in a subprocess ------------------------------------------------------------

AH_TIMEOUT_S = 120


def run_ah(*args, cwd: Path | str | None = None, env: dict | None = None, input: str | None = None,
           timeout: float = AH_TIMEOUT_S) -> tuple[int, str, str]:
    """Run the real `ah` CLI (`python -m adapterhub.cli.main ARGS`) and return (rc, stdout, stderr).

    A subprocess, not click's CliRunner, so exit codes, stderr, start-up imports and
    environment handling are exactly what a user gets. `env` entries are added to (or, with
    value None, removed from) the current environment.
    """
    full_env = dict(os.environ)
    for key, value in (env or {}).items():
        if value is None:
            full_env.pop(key, None)
        else:
            full_env[key] = str(value)
    proc = subprocess.run(
        [sys.executable, "-m", "adapterhub.cli.main", *[str(a) for a in args]],
        cwd=None if cwd is None else str(cwd),
        env=full_env,
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc.returncode, proc.stdout, proc.stderr


# --- folder comparison -----------------------------------------------------------------------


def sha256_tree(folder: Path | str) -> dict[str, str]:
    """{relative POSIX path: sha256 hex} of every file under `folder`."""
    folder = Path(folder)
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            out[path.relative_to(folder).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


# --- tiny base models ------------------------------------------------------------------------

FAMILIES = ("llama", "gpt2")
DTYPES = ("fp32", "bf16")
ADAPTER_KINDS = ("lora", "dora", "ia3", "loha", "lokr", "adalora", "prefix")
VOCAB = 128


def build_base(family: str):
    """A tiny causal LM with fixed random weights (seed 0), in eval mode."""
    import torch

    torch.manual_seed(0)
    if family == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
        )
        return LlamaForCausalLM(config).eval()
    if family == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        # bos/eos default to 50256, outside a 128-token vocabulary: pin them inside it.
        config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
                            bos_token_id=0, eos_token_id=0)
        return GPT2LMHeadModel(config).eval()
    raise ValueError(f"unknown model family {family!r}")


def torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def fixed_input():
    """The input every output comparison runs: one sequence of 12 token ids."""
    import torch

    return torch.arange(12, dtype=torch.long).remainder(VOCAB).unsqueeze(0)


# --- adapter configs ------------------------------------------------------------------------

# Which modules each adapter kind can wrap. GPT-2's attention and MLP projections are
# transformers' Conv1D: LoRA, DoRA, IA3 and AdaLoRA support it (fan_in_fan_out), LoHa and
# LoKr only support nn.Linear/Conv1d/Conv2d, so on GPT-2 they wrap the (Linear) lm_head.
CONV1D_UNSUPPORTED = ("loha", "lokr")


def target_modules(family: str, kind: str) -> list[str]:
    if family == "llama":
        return ["q_proj", "v_proj"]
    if kind in CONV1D_UNSUPPORTED:
        return ["lm_head"]  # peft then also saves the tied lm_head's base weight
    return ["c_attn", "c_proj"]


# Every (family, kind, dtype) peft 0.21 can build here: with target_modules above, all of them.
COMBOS = tuple((f, k, d) for f in FAMILIES for k in ADAPTER_KINDS for d in DTYPES)


def peft_config(family: str, kind: str, **overrides):
    """A peft config with non-default init, so no saved tensor is all zeros or all ones."""
    from peft import (
        AdaLoraConfig, IA3Config, LoHaConfig, LoKrConfig, LoraConfig, PrefixTuningConfig, TaskType,
    )

    targets = target_modules(family, kind)
    if kind == "lora":
        cfg = dict(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
        cls = LoraConfig
    elif kind == "dora":
        cfg = dict(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, use_dora=True)
        cls = LoraConfig
    elif kind == "ia3":
        cfg = dict(target_modules=targets, feedforward_modules=[], init_ia3_weights=False)
        cls = IA3Config
    elif kind == "loha":
        cfg = dict(r=4, alpha=8, target_modules=targets, init_weights=False)
        cls = LoHaConfig
    elif kind == "lokr":
        cfg = dict(r=4, alpha=8, target_modules=targets, init_weights=False)
        cls = LoKrConfig
    elif kind == "adalora":
        # AdaLoRA's rank schedule needs the training length up front.
        cfg = dict(init_r=4, target_r=2, target_modules=targets, total_step=10, init_lora_weights=False)
        cls = AdaLoraConfig
    elif kind == "prefix":
        cfg = dict(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4)
        cls = PrefixTuningConfig
    else:
        raise ValueError(f"unknown adapter kind {kind!r}")
    cfg.update(overrides)
    return cls(**cfg)


def make_peft_model(base, family: str, kind: str, dtype: str = "fp32", seed: int = 0, **config_overrides):
    """Wrap a private copy of `base` in a fresh adapter; adapter weights cast to `dtype`.

    The seed fixes the adapter's random init, so the same arguments give the same tensors.
    """
    import torch
    from peft import get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), peft_config(family, kind, **config_overrides))
    want = torch_dtype(dtype)
    for _, param in model.named_parameters():
        if param.requires_grad and param.dtype != want:
            # Only the adapter's own (trainable) weights: that is what save_pretrained writes.
            param.data = param.data.to(want)
    return model.eval()


def perturb(model, name_filter: Callable[[str], bool], seed: int) -> list[str]:
    """Add seeded noise to the trainable parameters whose name passes `name_filter`.

    Stands in for a training step that touched only some tensors; returns the names changed.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    changed = []
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and name_filter(name):
                noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
                param.add_(noise.to(param.dtype))
                changed.append(name)
    return changed


def save_adapter(model, out: Path | str) -> Path:
    """`save_pretrained` as users call it: safetensors, peft's metadata and README included."""
    out = Path(out)
    model.save_pretrained(str(out))
    return out


def make_adapter(base, family: str, kind: str, out: Path | str, dtype: str = "fp32", seed: int = 0) -> Path:
    """Build and save one adapter folder; see make_peft_model."""
    return save_adapter(make_peft_model(base, family, kind, dtype, seed), out)


def peft_outputs(base, folder: Path | str):
    """Logits of `PeftModel.from_pretrained(copy of base, folder)` on the fixed input."""
    import torch
    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
    with torch.no_grad():
        return model(fixed_input()).logits
