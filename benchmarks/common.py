"""Shared helpers for the benchmark scripts in this folder.

Every benchmark here compares adapterhub with the tools people use today (git + git-lfs,
plain folder copies) on *real* PEFT adapters built locally, so the numbers mean something
and no run ever needs a download. This module holds what any such script needs:

- measuring: `stopwatch`, `dir_size`, `tree_sha256`, `machine_info`;
- reporting: `format_table`, `human_bytes`, `ratio`, `write_json`;
- inputs: `plan_lora_llama` / `save_random_adapter` (one adapter of a chosen size) and
  `train_revisions` (a short real training run on CPU that saves N checkpoints);
- the tools compared, behind one small interface (`Tool`): `AdapterHubTool`, `GitLfsTool`,
  `PlainCopyTool`, and `verify_checkout` that fails loudly on any byte difference.

torch, peft and transformers are imported only by the functions that build adapters, so a
benchmark that works on existing folders starts fast.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shutil
import stat
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence
import warnings

# Models are built locally from a config: never let a library reach the network. Set on
# import, before any benchmark imports transformers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# peft calls a transformers method that transformers marks deprecated: not ours to fix.
warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
MB = 1_000_000


class BenchmarkError(Exception):
    """A benchmark found a wrong result (a checkout that differs, a tool that failed)."""


# --- measuring ----------------------------------------------------------------------------
@dataclass
class Elapsed:
    """Wall-clock seconds of a `stopwatch` block (set when the block ends)."""

    seconds: float = 0.0


@contextmanager
def stopwatch() -> Iterator[Elapsed]:
    """Time a block with `time.perf_counter` (wall clock: what a user waits for)."""
    elapsed = Elapsed()
    start = time.perf_counter()
    try:
        yield elapsed
    finally:
        elapsed.seconds = time.perf_counter() - start


def dir_size(path: Path | str, exclude: Sequence[str] = ()) -> int:
    """Apparent size (sum of `st_size`) of every regular file under `path`.

    Apparent bytes, not allocated blocks: what a user would have to upload or back up,
    independent of the file system's block size. Names in `exclude` (at any depth) are
    skipped with everything under them.
    """
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = [d for d in dirnames if d not in exclude]
        for name in filenames:
            if name in exclude:
                continue
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_sha256(path: Path | str, exclude: Sequence[str] = ()) -> dict[str, str]:
    """{relative POSIX path: sha256} of every file under `path` (names in `exclude` skipped)."""
    root = Path(path)
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in exclude)
        for name in sorted(filenames):
            if name in exclude:
                continue
            full = Path(dirpath) / name
            out[full.relative_to(root).as_posix()] = file_sha256(full)
    return out


def machine_info() -> dict:
    """What the numbers depend on: cores, load when the run started, versions."""
    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
    }
    for tool in (["git", "--version"], ["git", "lfs", "version"]):
        try:
            info[" ".join(tool[:-1])] = subprocess.run(tool, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            info[" ".join(tool[:-1])] = None
    return info


def code_version() -> dict:
    """The adapterhub commit measured (its storage code changes what the numbers mean)."""
    try:
        head = run_cmd(["git", "rev-parse", "HEAD"], REPO_ROOT).strip()
        dirty = bool(run_cmd(["git", "status", "--porcelain", "--untracked-files=no", "adapterhub"], REPO_ROOT).strip())
    except (OSError, BenchmarkError):
        return {"commit": None, "adapterhub_modified": None}
    return {"commit": head, "adapterhub_modified": dirty}


# --- reporting ----------------------------------------------------------------------------
def human_bytes(n: float) -> str:
    """Decimal units (MB = 10^6 bytes), matching how adapter sizes are usually quoted."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def ratio(a: float, b: float) -> float | None:
    """a / b, or None when b is zero (printed as '-')."""
    return a / b if b else None


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned.

    Floats print with 3 significant decimals, None as '-', so tables paste cleanly into
    a README or an issue.
    """

    def cell(v: object) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
        return str(v)

    text = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text)) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths))).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in text)])


def write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# --- inputs: real PEFT LoRA adapters on tiny Llama models built locally --------------------
@dataclass(frozen=True)
class LoraLlamaSpec:
    """A tiny Llama shape plus a LoRA on all its linear layers (lm_head excluded).

    Attributes:
        hidden / intermediate / layers: the Llama shape (head dim 64, no GQA, vocab 128).
        rank: LoRA rank r; alpha is 2r.
        adapter_params: LoRA parameters in total (what `adapter_model.safetensors` holds).
    """

    hidden: int
    intermediate: int
    layers: int
    rank: int
    vocab: int = 128

    @property
    def params_per_layer(self) -> int:
        # q,k,v,o: r*(H+H) each; gate, up: r*(H+I) each; down: r*(I+H).
        return self.rank * (11 * self.hidden + 3 * self.intermediate)

    @property
    def adapter_params(self) -> int:
        return self.params_per_layer * self.layers

    @property
    def adapter_bytes(self) -> int:
        """fp32 tensor bytes (the safetensors header adds a few kB)."""
        return 4 * self.adapter_params


def plan_lora_llama(target_bytes: int, rank: int = 64, hidden: int | None = None) -> LoraLlamaSpec:
    """Shape whose fp32 LoRA adapter is about `target_bytes`.

    Without `hidden`, takes the widest of 2048/1024/512/256/128 that still gives at least
    4 layers, so a 100 MB adapter is a 10-layer, 2048-wide model (Llama-like proportions,
    intermediate = 2.75 x hidden) and a 1 MB one is still several layers deep.
    """

    def spec(h: int, layers: int) -> LoraLlamaSpec:
        return LoraLlamaSpec(hidden=h, intermediate=64 * round(2.75 * h / 64), layers=layers, rank=rank)

    if hidden is None:
        candidates = (2048, 1024, 512, 256, 128)
        hidden = next((h for h in candidates if 4 * spec(h, 1).adapter_bytes <= target_bytes), candidates[-1])
    per_layer = spec(hidden, 1).adapter_bytes
    return spec(hidden, max(1, round(target_bytes / per_layer)))


def _lora_model(spec: LoraLlamaSpec, *, on_meta: bool, seed: int):
    """A PeftModel (LoRA r=spec.rank on all linear layers) around a tiny LlamaForCausalLM."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=spec.vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.hidden // 64,
        num_key_value_heads=spec.hidden // 64,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    lora = LoraConfig(r=spec.rank, lora_alpha=2 * spec.rank, target_modules="all-linear", lora_dropout=0.0)
    if not on_meta:
        return get_peft_model(LlamaForCausalLM(config), lora)
    # The base is never run here, so build it on the meta device and allocate it without
    # initialising it: a 2048-wide base is ~2 GB of fp32 that would take longer to fill
    # with random numbers than the whole benchmark. Only LoRA tensors get real values.
    with torch.device("meta"):
        model = get_peft_model(LlamaForCausalLM(config), lora)
    model.to_empty(device="cpu")
    return model


def save_random_adapter(out: Path, target_bytes: int, *, rank: int = 64, seed: int = 0) -> LoraLlamaSpec:
    """Write one PEFT LoRA adapter folder of about `target_bytes` into `out`.

    Values look like a trained adapter rather than a fresh one (PEFT starts B at zero,
    which compresses to nothing and would flatter any compressing store): A is
    Kaiming-uniform as PEFT initialises it, B is small Gaussian noise.
    """
    import torch

    spec = plan_lora_llama(target_bytes, rank=rank)
    model = _lora_model(spec, on_meta=True, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name:
                bound = 1 / math.sqrt(p.shape[1])
                p.uniform_(-bound, bound, generator=gen)
            elif ".lora_B." in name:
                p.normal_(0.0, 0.01, generator=gen)
    model.save_pretrained(out)
    return spec


def train_revisions(
    out_root: Path,
    revisions: int,
    target_bytes: int,
    *,
    steps_per_revision: int = 3,
    rank: int = 64,
    batch: int = 2,
    seq_len: int = 32,
    seed: int = 0,
) -> tuple[LoraLlamaSpec, list[Path]]:
    """Train a LoRA adapter on CPU and save a checkpoint every `steps_per_revision` steps.

    Real optimizer steps (AdamW, causal-LM loss on random tokens) on a real base model, so
    consecutive checkpoints differ the way a training run's do: every LoRA tensor moves a
    little at each step. The batches are small on purpose: what is measured is storing the
    checkpoints, and a 2-core machine should not spend minutes producing them. Returns the spec and the checkpoint folders, oldest first.
    """
    import torch

    spec = plan_lora_llama(target_bytes, rank=rank)
    model = _lora_model(spec, on_meta=False, seed=seed)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    folders = []
    for rev in range(revisions):
        for _ in range(steps_per_revision):
            tokens = torch.randint(0, spec.vocab, (batch, seq_len), generator=gen)
            loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
            optim.step()
            optim.zero_grad(set_to_none=True)
        folder = out_root / f"rev{rev:02d}"
        model.save_pretrained(folder)
        folders.append(folder)
    return spec, folders


# --- the tools compared -------------------------------------------------------------------
def run_cmd(args: Sequence[str], cwd: Path, env: dict | None = None) -> str:
    """Run a command; a failure raises BenchmarkError with its stderr (never ignored)."""
    proc = subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BenchmarkError(f"{' '.join(args)} failed ({proc.returncode}) in {cwd}: {proc.stderr.strip()}")
    return proc.stdout


class Tool:
    """One way of keeping adapter revisions: commit folders in order, check any one out.

    `commit` gets the i-th revision's folder and returns a handle for `checkout`;
    `stored_bytes` is what the tool keeps on disk for all revisions committed so far;
    `checkout_exclude` names tool files a checkout folder holds besides the adapter's.
    """

    name = "tool"
    checkout_exclude: tuple[str, ...] = ()

    def __init__(self, workdir: Path):
        self.workdir = workdir
        workdir.mkdir(parents=True)

    @classmethod
    def slug(cls) -> str:
        """The name as a file-name part ("plain copy" -> "plain-copy")."""
        return cls.name.replace(" ", "-")

    def prepare(self, folder: Path) -> None:
        """Untimed set-up before committing `folder` (default: nothing)."""

    def commit(self, folder: Path, index: int) -> str:
        raise NotImplementedError

    def checkout(self, handle: str, out: Path) -> None:
        raise NotImplementedError

    def stored_bytes(self) -> int:
        raise NotImplementedError


class AdapterHubTool(Tool):
    """adapterhub through its Python API (`Registry.commit` / `Registry.checkout`)."""

    name = "adapterhub"

    def __init__(self, workdir: Path):
        super().__init__(workdir)
        from adapterhub.registry import Registry

        self.registry = Registry.init(workdir / "registry")

    def commit(self, folder: Path, index: int) -> str:
        return self.registry.commit(folder, f"revision {index}").id

    def checkout(self, handle: str, out: Path) -> None:
        self.registry.checkout(handle, out)

    def stored_bytes(self) -> int:
        return dir_size(self.registry.ah_dir / "objects")


class GitLfsTool(Tool):
    """git with git-lfs tracking `*.safetensors`, the usual way adapters are versioned.

    The repository's work tree plays the training output folder: copying a revision into
    it stands for the trainer writing there and is not timed; `git add` + `git commit` is.
    A checkout is `git worktree add --detach` of the revision (the lfs smudge filter writes
    the weights from `.git/lfs/objects`), i.e. a fresh folder, like `ah checkout -o`.
    """

    name = "git-lfs"
    checkout_exclude = (".git", ".gitattributes")

    def __init__(self, workdir: Path):
        super().__init__(workdir)
        self.repo = workdir / "repo"
        self.repo.mkdir()
        # Isolated from the user's git config so identity, hooks or signing can't interfere.
        self.env = {
            **os.environ,
            "GIT_CONFIG_GLOBAL": os.devnull,
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_AUTHOR_NAME": "bench",
            "GIT_AUTHOR_EMAIL": "bench@example.invalid",
            "GIT_COMMITTER_NAME": "bench",
            "GIT_COMMITTER_EMAIL": "bench@example.invalid",
        }
        self.env.pop("GIT_LFS_SKIP_SMUDGE", None)
        self.git("init", "-q", "-b", "main")
        self.git("config", "gc.auto", "0")
        self.git("lfs", "install", "--local")
        self.git("lfs", "track", "*.safetensors")
        self.git("add", ".gitattributes")
        self.git("commit", "-q", "-m", "track safetensors with lfs")

    def git(self, *args: str) -> str:
        return run_cmd(["git", *args], self.repo, self.env)

    def prepare(self, folder: Path) -> None:
        """Make the work tree hold exactly `folder`'s files (untimed: the trainer's write)."""
        for entry in self.repo.iterdir():
            if entry.name not in (".git", ".gitattributes"):
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        # Plain copies with fresh mtimes, as a trainer writing files would leave them:
        # copy2 would carry the source's mtime and, with an inode reused, git's stat
        # check could take a changed file for unchanged.
        shutil.copytree(folder, self.repo, dirs_exist_ok=True, copy_function=shutil.copyfile)

    def commit(self, folder: Path, index: int) -> str:
        self.git("add", "-A")
        self.git("commit", "-q", "-m", f"revision {index}")
        return self.git("rev-parse", "HEAD").strip()

    def checkout(self, handle: str, out: Path) -> None:
        self.git("worktree", "add", "-q", "--detach", str(out), handle)

    def stored_bytes(self) -> int:
        return dir_size(self.repo / ".git")


class PlainCopyTool(Tool):
    """A full copy of the folder per revision (`cp -r`), the no-tool baseline."""

    name = "plain copy"

    def commit(self, folder: Path, index: int) -> str:
        dest = self.workdir / "copies" / f"rev{index:02d}"
        dest.parent.mkdir(exist_ok=True)
        run_cmd(["cp", "-r", str(folder), str(dest)], self.workdir)
        return str(dest)

    def checkout(self, handle: str, out: Path) -> None:
        run_cmd(["cp", "-r", handle, str(out)], self.workdir)

    def stored_bytes(self) -> int:
        return dir_size(self.workdir / "copies")


ALL_TOOLS: tuple[type[Tool], ...] = (AdapterHubTool, GitLfsTool, PlainCopyTool)


def verify_checkout(tool: Tool, expected: dict[str, str], out: Path, what: str) -> None:
    """Raise BenchmarkError unless `out` holds exactly the files of `expected`, byte for byte."""
    got = tree_sha256(out, exclude=tool.checkout_exclude)
    if got != expected:
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        differ = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
        raise BenchmarkError(
            f"{tool.name}: checkout of {what} is not byte-identical to what was committed "
            f"(missing {missing}, extra {extra}, sha256 differs {differ})"
        )


@dataclass
class ToolRun:
    """Timings and size for one tool over one scenario (seconds, bytes)."""

    tool: str
    revisions: int
    commit_s: list[float] = field(default_factory=list)
    checkout_s: list[float] = field(default_factory=list)
    stored_bytes: int = 0

    @property
    def commit_total(self) -> float:
        return sum(self.commit_s)

    @property
    def checkout_total(self) -> float:
        return sum(self.checkout_s)


def run_tool(tool: Tool, folders: Sequence[Path], scratch: Path, checkout_rounds: int = 1) -> ToolRun:
    """Commit every folder in order, measure storage, then check out and verify each one.

    Storage is measured before any checkout so tool metadata written by checkouts (git
    worktree records) never counts. Every checkout is compared by sha256 with its input.
    With `checkout_rounds` > 1 the in-order checkouts are repeated and each revision keeps
    its fastest time (a few-ms checkout of a small file on a shared machine varies by 1.5x
    from one pass to the next; every tool gets the same rounds).
    """
    run = ToolRun(tool.name, len(folders))
    scratch.mkdir(parents=True, exist_ok=True)
    handles = []
    for i, folder in enumerate(folders):
        tool.prepare(folder)
        with stopwatch() as t:
            handles.append(tool.commit(folder, i))
        run.commit_s.append(t.seconds)
    run.stored_bytes = tool.stored_bytes()
    for r in range(checkout_rounds):
        for i, (folder, handle) in enumerate(zip(folders, handles)):
            out = scratch / f"{tool.slug()}-checkout-{r}-{i:02d}"
            with stopwatch() as t:
                tool.checkout(handle, out)
            if r == 0:
                run.checkout_s.append(t.seconds)
            else:
                run.checkout_s[i] = min(run.checkout_s[i], t.seconds)
            verify_checkout(tool, tree_sha256(folder), out, f"revision {i} ({folder.name})")
    return run
