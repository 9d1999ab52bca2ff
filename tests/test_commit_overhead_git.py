"""code_version and default_author keep git's answer only while nothing it depends on
changed: each change below must show in the very next answer, and an unchanged repo must
not run git again."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from adapterhub import provenance as prov

_real_run = subprocess.run
SETTLE_S = 0.35  # longer than the test's racy window: files written before it may be kept


@pytest.fixture
def gits(monkeypatch, tmp_path):
    """Counts the git processes provenance starts; a fresh cache and a short racy window."""
    calls = []

    def counting_run(args, *a, **k):
        calls.append(list(args))
        return _real_run(args, *a, **k)

    monkeypatch.setattr(prov.subprocess, "run", counting_run)
    monkeypatch.setattr(prov, "RACY_NS", 300_000_000)
    for name in ("_code_answers", "_identity_answers", "_tracked_lists"):
        monkeypatch.setattr(prov, name, {})
    monkeypatch.delenv("AH_AUTHOR", raising=False)
    glob = tmp_path / "global.gitconfig"
    glob.write_text("[user]\n\tname = Global Name\n\temail = global@example.com\n")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(glob))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    return calls


def _git(repo, *args):
    return _real_run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


def _repo(tmp_path):
    repo = tmp_path / "repo"
    (repo / "src").mkdir(parents=True)
    _git(repo, "init", "-q", "-b", "main")
    (repo / "train.py").write_text("print(1)\n")
    (repo / "src" / "model.py").write_text("x = 1\n")
    _git(repo, "add", ".")
    _git(repo, "-c", "user.name=T", "-c", "user.email=t@e", "commit", "-q", "-m", "one")
    return repo


def _head(repo):
    return _git(repo, "rev-parse", "HEAD").strip()


def _settled():
    time.sleep(SETTLE_S)


def _answer_without_git(gits, fn, *args):
    before = len(gits)
    answer = fn(*args)
    assert len(gits) == before, f"git ran again: {gits[before:]}"
    return answer


def test_an_unchanged_repo_runs_git_once(gits, tmp_path):
    repo = _repo(tmp_path)
    _settled()
    first = prov.code_version(repo)
    assert first == {"git_commit": _head(repo), "dirty": False}
    for _ in range(3):
        assert _answer_without_git(gits, prov.code_version, repo) == first
    first["dirty"] = True  # a caller's change to its answer is its own
    assert prov.code_version(repo)["dirty"] is False


@pytest.mark.parametrize("change", ["edit", "edit_in_subfolder", "delete", "stage", "commit", "switch", "attributes"])
def test_every_change_shows_in_the_next_answer(gits, tmp_path, change):
    repo = _repo(tmp_path)
    _settled()
    clean = prov.code_version(repo)
    assert _answer_without_git(gits, prov.code_version, repo) == clean
    head = clean["git_commit"]
    if change == "edit":
        (repo / "train.py").write_text("print(2)\n")  # same size
        expected = {"git_commit": head, "dirty": True}
    elif change == "edit_in_subfolder":
        (repo / "src" / "model.py").write_text("x = 2\n")
        expected = {"git_commit": head, "dirty": True}
    elif change == "delete":
        (repo / "src" / "model.py").unlink()
        expected = {"git_commit": head, "dirty": True}
    elif change == "stage":
        (repo / "new.py").write_text("y = 1\n")
        _settled()
        assert _answer_without_git(gits, prov.code_version, repo) == clean  # untracked: not dirty
        _git(repo, "add", "new.py")
        expected = {"git_commit": head, "dirty": True}
    elif change == "commit":
        _git(repo, "-c", "user.name=T", "-c", "user.email=t@e", "commit", "-q", "--allow-empty", "-m", "two")
        expected = {"git_commit": _head(repo), "dirty": False}
    elif change == "switch":
        _git(repo, "-c", "user.name=T", "-c", "user.email=t@e", "commit", "-q", "--allow-empty", "-m", "two")
        _settled()
        assert prov.code_version(repo)["git_commit"] != head
        _git(repo, "switch", "-q", "--detach", head)
        expected = clean
    else:  # a new attribute on a file whose stat no longer matches the index changes its hash
        (repo / "train.py").write_text("print(1)\r\n")
        _git(repo, "add", "train.py")
        _git(repo, "-c", "user.name=T", "-c", "user.email=t@e", "commit", "-q", "-m", "crlf")
        os.utime(repo / "train.py")  # touched, content as committed
        _settled()
        clean = prov.code_version(repo)
        assert clean == {"git_commit": _head(repo), "dirty": False}
        (repo / ".gitattributes").write_text("*.py text\n")  # untracked; CRLF would now be normalized
        expected = {"git_commit": clean["git_commit"], "dirty": True}
    assert prov.code_version(repo) == expected
    assert expected == _real_answer(repo)
    _settled()
    prov.code_version(repo)
    assert _answer_without_git(gits, prov.code_version, repo) == expected


def _real_answer(repo):
    # --no-optional-locks: a plain status may rewrite the index, which would hide a stale answer
    out = _git(repo, "--no-optional-locks", "status", "--porcelain=v2", "--branch", "--untracked-files=no")
    oid = next(line.split()[2] for line in out.splitlines() if line.startswith("# branch.oid "))
    return {"git_commit": oid, "dirty": any(line and not line.startswith("#") for line in out.splitlines())}


@pytest.fixture
def coarse_clock(monkeypatch):
    """Stat times cut to whole seconds, as on a file system with a coarse clock: two
    writes of the same size within a second then leave the same stat data."""
    real = prov._stat

    def coarse(path, follow=True):
        st = real(path, follow)
        return st and st[:4] + (st[4] // 10**9 * 10**9, st[5] // 10**9 * 10**9)

    monkeypatch.setattr(prov, "_stat", coarse)
    monkeypatch.setattr(prov, "RACY_NS", 2_000_000_000)


def test_a_tracked_file_changed_within_the_racy_window_is_never_kept(gits, coarse_clock, tmp_path):
    repo = _repo(tmp_path)
    time.sleep(2.1)  # the repo itself (index, HEAD) settled: only the file is new
    for i in range(6):  # same size each time, faster than the file system's clock ticks
        (repo / "train.py").write_text(f"print({i % 2 + 1})\n")
        assert prov.code_version(repo)["dirty"] is (i % 2 == 1)


def test_a_config_changed_within_the_racy_window_is_never_kept(gits, coarse_clock, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    glob = tmp_path / "global.gitconfig"
    for name in ("Ann", "Bob", "Ann", "Bob"):
        glob.write_text(f"[user]\n\tname = {name}\n\temail = x@example.com\n")
        assert prov.default_author() == f"{name} <x@example.com>"


def test_no_repo_is_kept_until_one_appears(gits, tmp_path):
    plain = tmp_path / "plain" / "sub"
    plain.mkdir(parents=True)
    if any((p / ".git").exists() for p in plain.parents):
        pytest.skip("tmp_path lies inside a git repo")
    _settled()
    assert prov.code_version(plain) is None
    assert _answer_without_git(gits, prov.code_version, plain) is None
    repo = plain.parent
    _git(repo, "init", "-q")
    (repo / "a.txt").write_text("a\n")
    _git(repo, "add", "a.txt")
    _git(repo, "-c", "user.name=T", "-c", "user.email=t@e", "commit", "-q", "-m", "one")
    assert prov.code_version(plain) == {"git_commit": _head(repo), "dirty": False}


def test_git_dir_in_the_environment_turns_keeping_off(gits, tmp_path, monkeypatch):
    repo = _repo(tmp_path)
    monkeypatch.setenv("GIT_DIR", str(repo / ".git"))
    _settled()
    prov.code_version(repo)
    before = len(gits)
    prov.code_version(repo)
    assert len(gits) > before


def test_author_follows_global_and_local_config(gits, tmp_path, monkeypatch):
    repo = _repo(tmp_path)
    monkeypatch.chdir(repo)
    _settled()
    assert prov.default_author() == "Global Name <global@example.com>"
    assert _answer_without_git(gits, prov.default_author) == "Global Name <global@example.com>"
    _git(repo, "config", "user.name", "Local Name")
    assert prov.default_author() == "Local Name <global@example.com>"
    _settled()
    prov.default_author()
    assert _answer_without_git(gits, prov.default_author) == "Local Name <global@example.com>"
    glob = tmp_path / "global.gitconfig"
    glob.write_text("[user]\n\tname = Global Name\n\temail = other@example.com\n")
    assert prov.default_author() == "Local Name <other@example.com>"


def test_a_config_that_includes_another_is_never_kept(gits, tmp_path, monkeypatch):
    inner = tmp_path / "inner.gitconfig"
    inner.write_text("[user]\n\tname = Inner\n\temail = inner@example.com\n")
    (tmp_path / "global.gitconfig").write_text(f"[include]\n\tpath = {inner}\n")
    monkeypatch.chdir(tmp_path)
    _settled()
    assert prov.default_author() == "Inner <inner@example.com>"
    before = len(gits)
    assert prov.default_author() == "Inner <inner@example.com>"
    assert len(gits) > before


def test_a_repo_too_big_to_watch_runs_status_every_time_and_is_listed_once(gits, tmp_path, monkeypatch):
    repo = _repo(tmp_path)
    monkeypatch.setattr(prov, "MAX_TRACKED", 1)  # the repo tracks two files
    _settled()
    for _ in range(3):
        assert prov.code_version(repo) == {"git_commit": _head(repo), "dirty": False}
    assert sum("status" in c for c in gits) == 3
    assert sum("ls-files" in c for c in gits) == 1
    _git(repo, "rm", "-q", "--cached", "src/model.py")  # a new index: still not listed again
    assert prov.code_version(repo)["dirty"] is True
    assert sum("ls-files" in c for c in gits) == 1


def test_kept_answers_are_those_git_gives_and_a_kept_commit_starts_no_git(gits, tmp_path, monkeypatch):
    from adapterhub.registry import Registry
    from ah_testkit import write_adapter

    repo = _repo(tmp_path)
    monkeypatch.chdir(repo)
    assert prov.kept_git_answers() == (prov.NOT_KEPT, prov.NOT_KEPT)  # nothing asked yet
    _settled()
    reg = Registry.init(tmp_path / "reg")
    first = reg.commit(write_adapter(tmp_path / "a0", seed=0), "one")
    assert prov.kept_git_answers() == (prov.code_version(), prov.default_author())
    before = len(gits)
    second = reg.commit(write_adapter(tmp_path / "a1", seed=1), "two")
    assert gits[before:] == []
    one, two = reg.store.get_commit(first.id), reg.store.get_commit(second.id)
    assert two.author == one.author == "Global Name <global@example.com>"
    assert two.provenance == one.provenance and two.provenance["code"] == {"git_commit": _head(repo), "dirty": False}
    (repo / "train.py").write_text("print(9)\n")
    assert prov.kept_git_answers()[0] is prov.NOT_KEPT
    third = reg.commit(write_adapter(tmp_path / "a2", seed=2), "three")
    assert reg.store.get_commit(third.id).provenance["code"]["dirty"] is True


def test_a_commit_from_a_removed_folder_still_works(gits, tmp_path, monkeypatch):
    from adapterhub.registry import Registry
    from ah_testkit import write_adapter

    reg = Registry.init(tmp_path / "reg")
    ad = write_adapter(tmp_path / "a0")
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    for i in range(2):
        assert prov.kept_git_answers() == (prov.NOT_KEPT, prov.NOT_KEPT)
        assert "code" not in reg.store.get_commit(reg.commit(ad, f"from nowhere {i}").id).provenance


def test_kept_answers_start_no_git_process(gits, tmp_path, monkeypatch):
    repo = _repo(tmp_path)
    monkeypatch.chdir(repo)
    _settled()
    assert prov.kept_git_answers() == (prov.NOT_KEPT, prov.NOT_KEPT) and gits == []
    prov.code_version(), prov.default_author()
    _git(repo, "rm", "-q", "--cached", "src/model.py")  # a new index: the tracked files are listed again...
    before = len(gits)
    assert prov.kept_git_answers()[0] is prov.NOT_KEPT and len(gits) == before  # ...but not here


def test_a_big_work_tree_is_proven_on_the_side_thread(gits, tmp_path, monkeypatch):
    repo = _repo(tmp_path)
    monkeypatch.chdir(repo)
    monkeypatch.setattr(prov, "MAX_TRACKED_HERE", 1)  # the repo tracks two files
    _settled()
    first = prov.code_version()
    assert prov.kept_git_answers()[0] is prov.NOT_KEPT  # not statted here...
    assert _answer_without_git(gits, prov.code_version) == first  # ...but still kept
