"""What a commit records about where an adapter came from (docs/provenance.md).

Collected at commit time from the adapter's own `adapter_config.json`, the user's
options, the working directory's git repo and the installed packages. Nothing here
imports torch, peft or transformers: versions come from package metadata.
"""

from __future__ import annotations

import functools
import json
import operator
import os
import re
import stat
import subprocess
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
    HEAD's commit). A git process costs ~3 ms of CPU and this runs on every commit, so the
    answer is kept while everything it depends on is provably unchanged (`_GitWatch`):
    a training loop committing every few seconds then runs git once, not every time.
    """
    where = _folder(cwd)
    watch = _GitWatch(where) if where is not None else None
    key = watch.worktree_key() if watch is not None else None
    kept = _code_answers.get(where)
    if key is not None and kept is not None and kept[0] == key:
        return dict(kept[1]) if kept[1] is not None else None
    try:
        status = subprocess.run(
            ["git", "--no-optional-locks", "status", "--porcelain=v2", "--branch", "--untracked-files=no"],
            cwd=cwd, capture_output=True, text=True, timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if status.returncode != 0:
        if key is not None and watch is not None and watch.top is None:  # no repo, as the key says
            _code_answers[where] = (key, None)
        return None
    commit, dirty = None, False
    for line in status.stdout.splitlines():
        if line.startswith("# branch.oid "):
            commit = line[len("# branch.oid "):].strip()
        elif line and not line.startswith("#"):
            dirty = True
    answer = None if not commit or commit == "(initial)" else {"git_commit": commit, "dirty": dirty}  # no commit yet
    if key is not None and watch is not None and (watch.top is not None or answer is None):
        _code_answers[where] = (key, answer)
    return dict(answer) if answer is not None else None


NOT_KEPT = object()  # kept_git_answers: git has to run for this one


def kept_git_answers() -> tuple:
    """(code_version(), default_author()) for the current folder where each is kept and
    provably current, NOT_KEPT where git has to run; starts no process.

    A commit asks this on its own thread before anything else: the stat calls behind the
    proof then run back to back (~0.5 ms for a 100-file repo), where on a side thread,
    each one handing the GIL back and forth with the commit's own work, they cost the
    commit several times that on two busy cores.
    """
    where = _folder(None)
    if where is None:
        return NOT_KEPT, NOT_KEPT
    watch = _GitWatch(where)
    config = watch.config_key()
    kept = _identity_answers.get(where)
    if os.environ.get("AH_AUTHOR"):
        author = os.environ["AH_AUTHOR"]
    elif config is not None and kept is not None and kept[0] == config:
        author = _author(*kept[1])
    else:
        author = NOT_KEPT
    code = NOT_KEPT
    # A new index is listed, and a big work tree statted, on the side thread instead.
    key = watch.worktree_key(config, may_list=False, max_files=MAX_TRACKED_HERE)
    kept = _code_answers.get(where)
    if key is not None and kept is not None and kept[0] == key:
        code = dict(kept[1]) if kept[1] is not None else None
    return code, author


def _folder(cwd: Path | None) -> str | None:
    """The folder git would run in, absolute; None when the current folder was removed
    (git then answers for itself, and nothing is kept)."""
    try:
        return os.path.abspath(cwd if cwd is not None else os.getcwd())
    except OSError:
        return None


def environment() -> dict:
    """Python, platform and the versions of ENV_PACKAGES (a fresh dict each call)."""
    return dict(_environment())


@functools.lru_cache(maxsize=1)
def _environment() -> dict:
    # Read once per process: package metadata parsing cost ~15 ms per commit, and the
    # interpreter's installed packages do not change under a running process. Imported
    # here: importlib.metadata alone took ~20 ms of every `ah` command's start-up.
    import platform
    from importlib import metadata

    env = {"python": platform.python_version(), "platform": platform.platform(terse=True)}
    for pkg in ENV_PACKAGES:
        try:
            env[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return env


def default_author() -> str:
    """`$AH_AUTHOR`, else git's user.name/user.email, else user@host."""
    if os.environ.get("AH_AUTHOR"):
        return os.environ["AH_AUTHOR"]
    return _author(*_git_identity())


def _author(name: str, email: str) -> str:
    """The author line from git's identity; the user and host stand in for what is unset."""
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


def _git_identity() -> tuple[str, str]:
    """git's user.name and user.email ("" when unset), kept while git's config files are
    provably unchanged (`_GitWatch.config_key`)."""
    where = _folder(None)
    key = _GitWatch(where).config_key() if where is not None else None
    kept = _identity_answers.get(where)
    if key is not None and kept is not None and kept[0] == key:
        return kept[1]
    name = email = ""
    try:
        # Both keys from one git process (each costs a few ms on every commit); where a key
        # is set at several levels the last line wins, as `git config user.name` would.
        run = subprocess.run(
            ["git", "config", "--get-regexp", r"^user\.(name|email)$"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return name, email
    for line in run.stdout.splitlines():
        k, _, value = line.partition(" ")
        if k == "user.name":
            name = value.strip()
        elif k == "user.email":
            email = value.strip()
    if key is not None and run.returncode in (0, 1):  # 1: neither key is set
        _identity_answers[where] = (key, (name, email))
    return name, email


# --- git answers kept between commits ---------------------------------------------------
# A file changed less than this long ago may change again within the same tick of the file
# system's clock (ext4 stamps times from a clock of a few ms; FAT, 2 s) without its stat
# data changing: a key holding one is not kept (git's own "racily clean" rule).
RACY_NS = 2_000_000_000
# More tracked files than this: statting them all costs about what git status does.
MAX_TRACKED = 2000
# At most this many are statted on a commit's own thread (~1 ms; kept_git_answers), more
# on the side thread where git would run.
MAX_TRACKED_HERE = 256
# GIT_* variables that say nothing about which repo, config or index git reads. Any other
# (GIT_DIR, GIT_INDEX_FILE, GIT_CONFIG_PARAMETERS, ...) turns the keeping off.
_GIT_ENV_IGNORED = (
    "GIT_SSL_", "GIT_SSH", "GIT_ASKPASS", "GIT_TERMINAL_PROMPT", "GIT_TRACE", "GIT_PAGER", "GIT_EDITOR",
    "GIT_SEQUENCE_EDITOR", "GIT_AUTHOR_", "GIT_COMMITTER_", "GIT_HTTP_", "GIT_CURL_", "GIT_PROXY_",
    "GIT_PROTOCOL", "GIT_ALLOW_PROTOCOL", "GIT_REDACT_COOKIES", "GIT_LFS_",
)
_GIT_ENV_CONFIG = ("GIT_CONFIG_GLOBAL", "GIT_CONFIG_SYSTEM", "GIT_CONFIG_NOSYSTEM")  # their files are watched
_INCLUDE = re.compile(rb"^\s*\[\s*include", re.IGNORECASE | re.MULTILINE)
_code_answers: dict[str, tuple[tuple, dict | None]] = {}  # cwd -> (key, code_version's answer)
_identity_answers: dict[str, tuple[tuple, tuple[str, str]]] = {}  # cwd -> (key, (name, email))
_tracked_lists: dict[str, tuple[tuple | None, tuple[list[str], list[str]] | None]] = {}  # top -> (index stat, _tracked)


_SIG = operator.attrgetter("st_mode", "st_ino", "st_dev", "st_size", "st_mtime_ns", "st_ctime_ns")


def _stat(path: str, follow: bool = True) -> tuple | None:
    """What changes when a file does (its change time moves on every write, and no
    program can set it back); None when there is no file."""
    try:
        return _SIG(os.stat(path) if follow else os.lstat(path))
    except (OSError, ValueError):
        return None


class _GitWatch:
    """Everything a git answer about `where` depends on, as stat data taken before git
    runs: an answer is reused only while a fresh key equals the one it was given with.

    Config (`config_key`): the GIT_* and path variables, where git's executable is,
    every `.git` between `where` and the repo found (none may appear), and each config file
    git reads (system, global, the repo's); a config that includes others is not followed,
    so it is not kept. Work tree (`worktree_key`): that, plus HEAD, the ref it names,
    packed-refs, replace refs and grafts, the index, every tracked file (from `git
    ls-files`, again only when the index changed) and every `.gitattributes` that could
    apply to them. Not kept: a file changed within RACY_NS, a submodule, a `.git` file (a
    linked worktree), more than MAX_TRACKED files. Any change to those files moves their
    change time (ctime), which no program can set back.
    """

    def __init__(self, where: str):
        self.where = os.path.realpath(where)  # git walks up from the real folder, not a symlink's
        self.t0 = time.time_ns()  # before any stat: a change after it shows in the next key
        self.top: str | None = None  # the work tree's root, when there is a repo
        self.ok = True
        self.parts: list = []

    def _add(self, path: str, follow: bool = True) -> None:
        st = _stat(path, follow)
        if st is not None and max(st[4], st[5]) > self.t0 - RACY_NS:
            self.ok = False
        self.parts.append((path, st))

    def config_key(self) -> tuple | None:
        env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("GIT_")))
        if any(k not in _GIT_ENV_CONFIG and not k.startswith(_GIT_ENV_IGNORED) for k, _ in env):
            return None
        environ = os.environ
        self.parts += [env, self.where, environ.get("HOME"), environ.get("XDG_CONFIG_HOME")]
        git = _git_executable()
        self.parts.append(git)
        folder = self.where
        while True:  # git's discovery: the nearest folder holding .git
            dot_git = os.path.join(folder, ".git")
            st = _stat(dot_git)
            self.parts.append((dot_git, st and st[0]))
            if st is not None:
                if not stat.S_ISDIR(st[0]) or not os.path.isfile(os.path.join(dot_git, "HEAD")):
                    return None  # a linked worktree or submodule (.git file), or not a repo git accepts
                if any(os.path.exists(os.path.join(dot_git, name)) for name in ("commondir", "reftable")):
                    return None  # a worktree's shared repo, or refs git keeps in another format
                self.top = folder
                break
            up = os.path.dirname(folder)
            if up == folder:
                break
            folder = up
        home = environ.get("HOME") or ""
        # Every file git may read, whatever GIT_CONFIG_* say (one too many only costs a stat);
        # a git built with another prefix reads <prefix>/etc/gitconfig.
        xdg = environ.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")
        configs = [environ.get("GIT_CONFIG_SYSTEM"), "/etc/gitconfig", environ.get("GIT_CONFIG_GLOBAL"),
                   os.path.join(home, ".gitconfig"), os.path.join(xdg, "git", "config")]
        if git[0]:
            configs.append(os.path.join(os.path.dirname(os.path.dirname(git[0])), "etc", "gitconfig"))
        if self.top is not None:
            git_dir = os.path.join(self.top, ".git")
            configs += [os.path.join(git_dir, "config"), os.path.join(git_dir, "config.worktree")]
        for path in configs:
            if not path:
                continue
            self._add(path)
            try:
                with open(path, "rb") as fh:
                    if _INCLUDE.search(fh.read()):
                        return None
            except FileNotFoundError:
                pass
            except OSError:
                return None
        return tuple(self.parts) if self.ok else None

    def worktree_key(
        self, config: tuple | None | bool = False, *, may_list: bool = True, max_files: int | None = None
    ) -> tuple | None:
        """The key for code_version (`config`: config_key's answer, when already asked);
        None, not a `git ls-files`, where the index changed and may_list is false, and
        None for more than max_files tracked files."""
        if (self.config_key() if config is False else config) is None:
            return None
        if self.top is None:
            return tuple(self.parts)  # no repo: the answer is None until a .git appears
        git_dir = os.path.join(self.top, ".git")
        head = os.path.join(git_dir, "HEAD")
        self._add(head)
        try:
            with open(head, encoding="utf-8", errors="replace") as fh:
                text = fh.read().strip()
        except OSError:
            return None
        if text.startswith("ref: "):
            ref = text[5:].strip()
            if not ref.startswith("refs/") or ".." in ref.split("/"):
                return None
            self._add(os.path.join(git_dir, ref))
        for name in ("packed-refs", "refs/replace", "info/grafts", "info/attributes"):
            self._add(os.path.join(git_dir, name))
        xdg = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.environ.get("HOME") or "", ".config")
        self._add(os.path.join(xdg, "git", "attributes"))
        index = os.path.join(git_dir, "index")
        self._add(index)
        tracked = self._tracked(self.parts[-1][1], may_list)
        if tracked is None or not self.ok:
            return None
        files, attributes = tracked
        if max_files is not None and len(files) > max_files:
            return None
        try:  # the usual case, all tracked files there, without a Python step per field
            stats = [_SIG(st) for st in map(os.lstat, files)]
        except OSError:
            stats = [_stat(path, follow=False) for path in files]
        stats += [_stat(path) for path in attributes]
        recent = self.t0 - RACY_NS
        if any(st is not None and (st[4] > recent or st[5] > recent) for st in stats):
            return None
        self.parts.append(tuple(stats))
        return tuple(self.parts)

    def _tracked(self, index_stat: tuple | None, may_list: bool = True) -> tuple[list[str], list[str]] | None:
        """(tracked files, the .gitattributes that could apply to them), as full paths;
        from `git ls-files` only when the index changed since last time."""
        kept = _tracked_lists.get(self.top)
        if kept is not None and (kept[0] == index_stat or kept[1] is None):
            return kept[1]  # a repo once too big or holding a submodule is not listed again
        if not may_list:
            return None
        try:
            run = subprocess.run(
                ["git", "--no-optional-locks", "ls-files", "-z", "--stage"],
                cwd=self.top, capture_output=True, timeout=30,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        if run.returncode != 0:
            return None
        files: list[str] = []
        folders = {""}
        tracked: tuple[list[str], list[str]] | None = None
        for entry in run.stdout.split(b"\0"):
            if not entry:
                continue
            meta, _, raw = entry.partition(b"\t")
            if meta.startswith(b"160000") or len(files) >= MAX_TRACKED:  # a submodule, or too many to stat
                break
            path = os.fsdecode(raw)
            files.append(os.path.join(self.top, path))
            cut = path.rfind("/")
            while cut > 0 and path[:cut] not in folders:
                folders.add(path[:cut])
                cut = path.rfind("/", 0, cut)
        else:
            tracked = (files, [os.path.join(self.top, f, ".gitattributes") for f in sorted(folders)])
        _tracked_lists[self.top] = (index_stat, tracked)
        return tracked


def _git_executable() -> tuple[str | None, tuple | None]:
    """(path, stat) of the `git` that $PATH finds (another git, or one upgraded under a
    running process, may answer otherwise)."""
    import shutil

    found = shutil.which("git")
    path = os.path.realpath(found) if found else None
    return path, _stat(path) if path else None


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
