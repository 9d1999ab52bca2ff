"""Evaluation records: objects linked to a commit, and the per-commit list that finds them.

An eval record is an immutable `eval` object (one metric, one finite value, plus the
suite, dataset, evaluator, time and free-form details) whose body names the commit it
measures. Because it is an ordinary object it travels with the commit's objects.

Finding a commit's evals must not scan the store, so each commit that has evals gets a
small list file `.ah/evals/<2 hex>/<62 hex>` (the commit id split like loose objects)
holding the ids of its eval objects, one per line, in the order they were added. The list
is updated like a ref: lock file with O_EXCL, write the whole new list into it, fsync,
rename over the old list. Before a list changes, one line naming the commit is appended
to `.ah/evals/journal`; the DuckDB index reads that journal from its last position to
learn which commits' lists to re-read, without listing the folder. Formats are in
docs/format/evals.md.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .errors import AhError, CorruptObject, RefLocked, UsageError
from .fsutil import fsync_dir
from .objects import EVAL, PARSERS, ObjectId, _need, _need_oid, _parse_json, canonical_json, is_oid

EVAL_FORMAT_VERSION = 1
LIST_HEADER = "ah-eval-list 1"
EVALS_DIR = "evals"
JOURNAL = "journal"
MAX_METRIC_NAME = 128
_BAD_NAME = re.compile(r"[\x00-\x1f\x7f=]")
# How long add() waits for another writer's lock on the same commit's list.
LOCK_WAIT_S = 5.0


class BadEval(UsageError):
    """A metric name or value that cannot be recorded."""


def check_metric_name(name: Any) -> str:
    """Any printable text without '=' (the CLI's NAME=VALUE separator), 1..128 chars.

    Names reach SQL only as bound parameters, so quotes or keywords in a name are just
    characters.
    """
    if not isinstance(name, str) or not name.strip():
        raise BadEval("a metric name must be non-empty text")
    if name != name.strip():
        raise BadEval(f"metric name {name!r} has leading or trailing spaces")
    if len(name) > MAX_METRIC_NAME:
        raise BadEval(f"metric name {name[:40]!r}... is longer than {MAX_METRIC_NAME} characters")
    if _BAD_NAME.search(name):
        raise BadEval(f"metric name {name!r} contains '=' or a control character")
    return name


def check_metric_value(name: str, value: Any) -> float:
    """A finite real number, as a float. Text is parsed; NaN, infinities and bools are refused."""
    if isinstance(value, bool):
        raise BadEval(f"metric {name!r}: {value!r} is not a number")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise BadEval(f"metric {name!r}: {value!r} is not a number") from None
    if not isinstance(value, (int, float)):
        raise BadEval(f"metric {name!r}: {value!r} is not a number")
    try:
        out = float(value)
    except OverflowError:
        raise BadEval(f"metric {name!r}: {value!r} is too large for a float") from None
    if not math.isfinite(out):
        raise BadEval(f"metric {name!r}: value must be finite, got {value!r}")
    return out


def parse_metric_args(items: Iterable[str]) -> dict[str, float]:
    """`NAME=VALUE` strings (the CLI's --metric) to {name: value}; duplicates are refused."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep:
            raise BadEval(f"--metric expects NAME=VALUE, got {item!r}")
        name = check_metric_name(name.strip())
        if name in out:
            raise BadEval(f"metric {name!r} given twice")
        out[name] = check_metric_value(name, raw)
    if not out:
        raise BadEval("give at least one --metric NAME=VALUE")
    return out


@dataclass(frozen=True)
class EvalRecord:
    """One measured metric of one commit.

    Attributes:
        commit: id of the commit evaluated.
        metric: metric name ("acc", "loss", "rougeL").
        value: finite float.
        suite: evaluation suite or benchmark name ("" when not given).
        dataset: evaluation dataset name or URI (None when not given).
        evaluator: who or what ran it ("Name <email>", a CI job id).
        timestamp: seconds since the epoch, UTC.
        details: free-form JSON object (config, sample counts, per-slice numbers).
    """

    commit: ObjectId
    metric: str
    value: float
    suite: str
    evaluator: str
    timestamp: int
    dataset: str | None = None
    details: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d: dict[str, Any] = {
            "version": EVAL_FORMAT_VERSION,
            "commit": self.commit,
            "metric": self.metric,
            "value": self.value,
            "suite": self.suite,
            "evaluator": self.evaluator,
            "timestamp": self.timestamp,
            "details": self.details,
        }
        if self.dataset is not None:
            d["dataset"] = self.dataset
        return d

    def serialize(self) -> bytes:
        self.check()
        return canonical_json(self.to_json())

    def check(self, oid: str = "<new>") -> None:
        """Field rules shared by new records and parsed ones."""
        try:
            check_metric_name(self.metric)
            if not isinstance(self.value, float) or not math.isfinite(self.value):
                raise BadEval(f"metric {self.metric!r}: value must be a finite float")
        except BadEval as exc:
            if oid == "<new>":
                raise
            raise CorruptObject(oid, str(exc)) from None
        if not is_oid(self.commit):
            raise CorruptObject(oid, "eval record does not name a commit id")

    @classmethod
    def parse(cls, oid: str, body: bytes | memoryview) -> "EvalRecord":
        d = _parse_json(oid, body)
        version = d.get("version")
        if version != EVAL_FORMAT_VERSION:
            raise CorruptObject(oid, f"eval record format version {version!r} is not supported")
        dataset = d.get("dataset")
        if dataset is not None and not isinstance(dataset, str):
            raise CorruptObject(oid, "field 'dataset' is not text")
        # Canonical values are floats: an int in the body would be a second encoding.
        value = _need(oid, d, "value", float)
        rec = cls(
            commit=_need_oid(oid, d.get("commit"), "evaluated commit"),
            metric=_need(oid, d, "metric", str),
            value=value,
            suite=_need(oid, d, "suite", str),
            evaluator=_need(oid, d, "evaluator", str),
            timestamp=_need(oid, d, "timestamp", int),
            dataset=dataset,
            details=_need(oid, d, "details", dict),
        )
        rec.check(oid)
        return rec


PARSERS[EVAL] = EvalRecord.parse


@dataclass(frozen=True)
class EvalInfo:
    """A stored eval record with its id.

    Attributes:
        id: the eval object id.
        record: the parsed record.
    """

    id: ObjectId
    record: EvalRecord

    def to_json(self) -> dict:
        from .results import iso_time

        d = self.record.to_json()
        d.pop("version")
        d["id"] = self.id
        d["date"] = iso_time(self.record.timestamp)
        d.setdefault("dataset", None)
        return d


# --- per-commit lists -----------------------------------------------------------------


class EvalLists:
    """The per-commit eval lists and the change journal under `.ah/evals/`."""

    def __init__(self, ah_dir: Path):
        self.root = Path(ah_dir) / EVALS_DIR
        self.journal_path = self.root / JOURNAL

    def _path(self, commit: str) -> Path:
        return self.root / commit[:2] / commit[2:]

    def read(self, commit: str) -> list[ObjectId]:
        """Eval ids recorded for `commit`, oldest first (empty when none)."""
        try:
            text = self._path(commit).read_text(encoding="ascii")
        except (FileNotFoundError, NotADirectoryError):
            return []
        except UnicodeDecodeError:
            raise CorruptObject(commit, "eval list is not ASCII") from None
        # Lines end at "\n" only (as written): splitlines() also split at \v, \f and
        # \x1c-\x1e, so a newline damaged into one of those went unseen.
        lines = text.split("\n")
        if lines[-1] == "":
            lines.pop()
        if not lines or lines[0] != LIST_HEADER:
            raise CorruptObject(commit, f"eval list does not start with {LIST_HEADER!r}")
        ids = lines[1:]
        if not all(is_oid(i) for i in ids):
            raise CorruptObject(commit, "eval list holds a line that is not an object id")
        return [ObjectId(i) for i in ids]

    def append(self, commit: str, eval_ids: list[ObjectId]) -> None:
        """Add ids to a commit's list: journal line first, then lock + rewrite + rename."""
        path = self._path(commit)
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = path.with_name(path.name + ".lock")
        fd = self._take_lock(lock, commit)
        try:
            # Journal first: a list never changes without a journal line saying so, so the
            # index can always find the change (a line for a change that never happened is
            # harmless: the index re-reads the list, which is the truth).
            self._journal(commit)
            current = self.read(commit)
            new = current + [i for i in eval_ids if i not in current]
            with os.fdopen(fd, "w", encoding="ascii") as fh:
                fd = -1
                fh.write("\n".join([LIST_HEADER, *new]) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(lock, path)  # atomic: readers see the old list or the new one
            fsync_dir(path.parent)
        finally:
            if fd >= 0:
                os.close(fd)
            lock.unlink(missing_ok=True)

    def _take_lock(self, lock: Path, commit: str) -> int:
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                return os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if time.monotonic() > deadline:
                    raise RefLocked(
                        f"eval list of {commit[:12]} is locked by another process ({lock} exists); "
                        "if no other ah process is running, remove that file"
                    ) from None
                time.sleep(0.02)

    def _journal(self, commit: str) -> None:
        # One write() under O_APPEND, with a leading newline: a torn line left by a crash
        # stays on a line of its own and never swallows the next entry.
        fd = os.open(self.journal_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, f"\n{commit}\n".encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)

    def journal_size(self) -> int:
        try:
            return self.journal_path.stat().st_size
        except FileNotFoundError:
            return 0

    def journal_since(self, offset: int) -> tuple[set[ObjectId], int]:
        """Commits whose lists changed after byte `offset`, and the new end offset."""
        try:
            with open(self.journal_path, "rb") as fh:
                fh.seek(offset)
                data = fh.read()
        except FileNotFoundError:
            return set(), 0
        # Only whole lines count; a trailing partial line is read again next time.
        end = data.rfind(b"\n") + 1
        commits = {ObjectId(line.decode()) for line in data[:end].split(b"\n") if is_oid(line.decode("ascii", "replace"))}
        return commits, offset + end


def new_record(
    commit: ObjectId,
    metric: str,
    value: Any,
    *,
    suite: str = "",
    dataset: str | None = None,
    evaluator: str,
    timestamp: int,
    details: dict | None = None,
) -> EvalRecord:
    """Validated record; raises BadEval for a bad name, value or details."""
    name = check_metric_name(metric)
    if details is not None and not isinstance(details, dict):
        raise BadEval("eval details must be a mapping")
    try:
        canonical_json(details or {})
    except (TypeError, ValueError) as exc:
        raise BadEval(f"eval details must be JSON with finite numbers: {exc}") from None
    if not isinstance(suite, str) or (dataset is not None and not isinstance(dataset, str)):
        raise BadEval("suite and dataset must be text")
    return EvalRecord(
        commit=commit,
        metric=name,
        value=check_metric_value(name, value),
        suite=suite,
        evaluator=evaluator,
        timestamp=timestamp,
        dataset=dataset,
        details=dict(details or {}),
    )


def parse_detail_args(items: Iterable[str]) -> dict:
    """`KEY=VALUE` strings (the CLI's --detail) to a dict; JSON values keep their type."""
    from .provenance import parse_params

    try:
        return parse_params(list(items))
    except UsageError as exc:
        raise BadEval(str(exc).replace("--param", "--detail")) from None


def store_evals(store, lists: EvalLists, records: list[EvalRecord]) -> list[EvalInfo]:
    """Put the records as objects, then link them from their commit's list."""
    out = [EvalInfo(store.put(EVAL, r.serialize()), r) for r in records]
    by_commit: dict[str, list[ObjectId]] = {}
    for info in out:
        by_commit.setdefault(info.record.commit, []).append(info.id)
    for commit, ids in by_commit.items():
        lists.append(commit, ids)
    return out


def load_evals(store, lists: EvalLists, commit: ObjectId) -> list[EvalInfo]:
    """A commit's eval records, oldest first, each verified and checked to name `commit`."""
    out = []
    for eid in lists.read(commit):
        rec = store.get(eid, EVAL)
        if rec.commit != commit:
            raise AhError(f"eval {eid[:12]} is listed under commit {commit[:12]} but measures {rec.commit[:12]}")
        out.append(EvalInfo(eid, rec))
    return out


def eval_ids_of(lists: EvalLists, commits: Iterable[str]) -> list[ObjectId]:
    """Eval object ids to send along with `commits` (push, clone, bundle)."""
    out: list[ObjectId] = []
    for c in commits:
        out.extend(lists.read(c))
    return out


def link_received(store, lists: EvalLists, eval_ids: Iterable[str]) -> int:
    """After eval objects arrived from elsewhere: list each under the commit it names.

    Each object is read (so re-verified) and its own `commit` field decides the list, so a
    sender cannot attach a record to a commit it does not measure. Returns how many ids
    were new to their lists.
    """
    by_commit: dict[str, list[ObjectId]] = {}
    for eid in eval_ids:
        rec = store.get(eid, EVAL)
        by_commit.setdefault(rec.commit, []).append(ObjectId(eid))
    added = 0
    for commit, ids in sorted(by_commit.items()):
        known = set(lists.read(commit))
        new = [i for i in ids if i not in known]
        if new:
            lists.append(commit, new)
            added += len(new)
    return added
