"""What a commit records about where an adapter came from (docs/provenance.md).

Collected at commit time from the adapter's own `adapter_config.json`, the user's
options, the working directory's git repo and the installed packages. Nothing here
imports torch, peft or transformers: versions come from package metadata.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from .errors import BadAdapter, UsageError

PROVENANCE_VERSION = 1
ENV_PACKAGES = ("torch", "peft", "transformers", "safetensors", "adapterhub")


def read_adapter_config(folder: Path) -> dict:
    path = Path(folder) / "adapter_config.json"
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadAdapter(f"{path.name} is not valid JSON: {exc}") from None
    return value if isinstance(value, dict) else {}


def parse_params(items: list[str] | tuple[str, ...]) -> dict:
    """`KEY=VALUE` strings to a dict; values that parse as JSON keep their type."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--param expects KEY=VALUE, got {item!r}")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        out[key.strip()] = value
    return out


def load_train_config(path: Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read training config {path}: {exc.strerror}") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml  # only when a YAML config is given

            value = yaml.safe_load(text)
        else:
            value = json.loads(text)
    except Exception as exc:
        raise UsageError(f"training config {path} does not parse: {exc}") from None
    if not isinstance(value, dict):
        raise UsageError(f"training config {path} must hold a mapping")
    return value


def code_version(cwd: Path | None = None) -> dict | None:
    """Git commit and dirty flag of the repo around `cwd`, if there is one (and it has a
    commit): changes to tracked files make it dirty, untracked files do not.

    One `git status --porcelain=v2 --branch` answers both (its `# branch.oid` line names
    HEAD's commit): a git process costs ~5-10 ms, and this runs on every commit.
    """
    try:
        status = subprocess.run(
            # --no-optional-locks: a status must not rewrite the user's index as it goes.
            ["git", "--no-optional-locks", "status", "--porcelain=v2", "--branch", "--untracked-files=no"],
            cwd=cwd, capture_output=True, text=True, timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if status.returncode != 0:
        return None
    commit, dirty = None, False
    for line in status.stdout.splitlines():
        if line.startswith("# branch.oid "):
            commit = line[len("# branch.oid "):].strip()
        elif line and not line.startswith("#"):
            dirty = True
    if not commit or commit == "(initial)":
        return None  # no commit yet
    return {"git_commit": commit, "dirty": dirty}


def environment() -> dict:
    """Python, platform and the versions of ENV_PACKAGES (a fresh dict each call)."""
    return dict(_environment())


@functools.lru_cache(maxsize=1)
def _environment() -> dict:
    # Read once per process: the interpreter's installed packages do not change under a
    # running process.
    import platform

    env = {"python": platform.python_version(), "platform": platform.platform(terse=True)}
    env.update(installed_versions(ENV_PACKAGES))
    return env


# A distribution's metadata folder on sys.path: `<name>-<version>.dist-info` (the name's
# `-` escaped as `_`) or `<name>-<version>[-pyX.Y].egg-info`.
_DIST_FOLDER = re.compile(r"^([A-Za-z0-9_.]+?)-([^-]+?)(?:-py[0-9.]+)?\.(?:dist-info|egg-info)$")


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503


def installed_versions(names) -> dict[str, str]:
    """{name: version} of the installed distributions among `names`, as
    `importlib.metadata.version` says, from their metadata folders' names on sys.path
    (first entry wins, as there). importlib.metadata's import and its parse of each
    METADATA file cost 28-50 ms of every `ah commit` process; a listing per path entry
    costs ~1 ms. A name found only without a version in its folder's name (a
    development install) is asked of importlib.metadata, as are all of them if sys.path
    cannot be listed."""
    wanted = {_normalized(n): n for n in names}
    found: dict[str, str] = {}
    unsure: list[str] = []
    for entry in sys.path:
        try:
            listing = os.listdir(entry or ".")
        except OSError:
            continue
        for folder in listing:
            if not folder.endswith(("-info", ".egg-link")):
                continue
            match = _DIST_FOLDER.match(folder)
            if match:
                name = wanted.get(_normalized(match[1]))
                if name is not None and name not in found:
                    found[name] = match[2]
            else:  # `name.egg-info` of a source tree, or an .egg-link: no version in the name
                name = wanted.get(_normalized(folder.rsplit(".", 1)[0]))
                if name is not None and name not in found:
                    unsure.append(name)
    unsure = [n for n in dict.fromkeys(unsure) if n not in found]
    if unsure:
        from importlib import metadata

        for name in unsure:
            try:
                found[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                pass
    return {n: found[n] for n in names if n in found}


def default_author() -> str:
    """`$AH_AUTHOR`, else git's user.name/user.email, else user@host."""
    if os.environ.get("AH_AUTHOR"):
        return os.environ["AH_AUTHOR"]
    name = email = ""
    try:
        # Both keys from one git process (each costs a few ms on every commit); where a key
        # is set at several levels the last line wins, as `git config user.name` would.
        out = subprocess.run(
            ["git", "config", "--get-regexp", r"^user\.(name|email)$"], capture_output=True, text=True, timeout=5
        ).stdout
        for line in out.splitlines():
            key, _, value = line.partition(" ")
            if key == "user.name":
                name = value.strip()
            elif key == "user.email":
                email = value.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    if not name:
        import getpass

        try:
            name = getpass.getuser()
        except Exception:
            name = "unknown"
    if not email:
        import socket

        email = f"{name}@{socket.gethostname()}"
    return f"{name} <{email}>"


def now() -> int:
    """Commit time; `$AH_COMMIT_TIME` (epoch seconds) pins it for reproducible ids."""
    pinned = os.environ.get("AH_COMMIT_TIME")
    if pinned:
        try:
            return int(pinned)
        except ValueError:
            raise UsageError(f"AH_COMMIT_TIME must be epoch seconds, got {pinned!r}") from None
    return int(time.time())


def _local_dir(value: str | None) -> Path | None:
    """`value` as a local folder, when it names one (a hub id like "org/model" usually won't)."""
    if not value:
        return None
    path = Path(os.path.expanduser(str(value)))
    return path if path.is_dir() else None


def base_model_record(cfg: dict, base_model: str | None, revision: str | None) -> dict:
    """Name, revision and, for a local folder, path and weight fingerprint of the base model.

    `base_model` (the --base-model option) wins over adapter_config.json's
    `base_model_name_or_path`. When the chosen value is a local folder, its safetensors
    weights are fingerprinted (adapterhub.fingerprint); the recorded name is then the
    adapter config's name when it has one (the hub id the adapter was trained against),
    else the folder as given.
    """
    from .fingerprint import choose_mode, fingerprint_model

    cfg_name = cfg.get("base_model_name_or_path")
    given = base_model or cfg_name
    base: dict = {}
    local = _local_dir(given)
    if local is not None:
        base["name"] = str(cfg_name if (base_model and cfg_name and not _local_dir(cfg_name)) else given)
        base["path"] = str(local.resolve())
        base["fingerprint"] = fingerprint_model(local, choose_mode(local)).to_json()
    elif given:
        base["name"] = str(given)
    rev = revision or cfg.get("revision")
    if rev:
        base["revision"] = str(rev)
    return base


def dataset_record(dataset: str) -> dict:
    """URI as given; for a local file or folder also its absolute path and content hash."""
    from .fingerprint import hash_dataset

    record: dict = {"uri": dataset}
    path = Path(os.path.expanduser(dataset))
    if path.is_file() or path.is_dir():
        record["path"] = str(path.resolve())
        record["content"] = hash_dataset(path)
    return record


def collect(
    folder: Path,
    *,
    base_model: str | None = None,
    base_model_revision: str | None = None,
    dataset: str | None = None,
    train_config: Path | None = None,
    params: dict | None = None,
    cwd: Path | None = None,
    shared: dict | None = None,
) -> dict:
    """The provenance record for a commit of `folder`.

    `shared` (from `shared_context`) supplies the code version and environment, the same
    for every adapter of a bulk import (`ah import`), where a git call per adapter would
    cost more than storing the adapter.
    """
    cfg = read_adapter_config(folder)
    prov: dict = {"version": PROVENANCE_VERSION}
    prov["base_model"] = base_model_record(cfg, base_model, base_model_revision)
    adapter = {k: cfg[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "target_modules") if cfg.get(k) is not None}
    if isinstance(adapter.get("target_modules"), (set, tuple)):
        adapter["target_modules"] = sorted(adapter["target_modules"])
    prov["adapter"] = adapter
    if dataset:
        prov["dataset"] = dataset_record(dataset)
    if train_config is not None:
        prov["train_config"] = load_train_config(train_config)
    if params:
        prov["params"] = params
    code = shared.get("code") if shared is not None else code_version(cwd)
    if code:
        prov["code"] = code
    prov["environment"] = shared["environment"] if shared is not None else environment()
    return prov


def shared_context(cwd: Path | None = None) -> dict:
    """The parts of a provenance record that do not depend on the adapter (for `collect`)."""
    return {"code": code_version(cwd), "environment": environment()}
