"""Text and JSON renderings of API results. Commands hand results here and nothing else prints."""

from __future__ import annotations

import json
import sys

import click

from ..objects import Snapshot
from ..results import CommitInfo, RefInfo, ShowResult, iso_time


def emit_json(value) -> None:
    click.echo(json.dumps(value, indent=2, ensure_ascii=False, sort_keys=False))


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _decoration(names: list[str]) -> str:
    return f" ({', '.join(names)})" if names else ""


def commit_text(info: CommitInfo, decorations: list[str] | None = None) -> str:
    c = info.commit
    lines = [click.style(f"commit {info.id}", fg="yellow") + _decoration(decorations or [])]
    if len(c.parents) > 1:
        lines.append("Merge: " + " ".join(p[:12] for p in c.parents))
    lines.append(f"Author: {c.author}")
    lines.append(f"Date:   {iso_time(c.timestamp)}")
    lines.append("")
    lines.extend("    " + line for line in (c.message.splitlines() or [""]))
    return "\n".join(lines)


def oneline(info: CommitInfo, decorations: list[str] | None = None) -> str:
    first = info.message.splitlines()[0] if info.message else ""
    return f"{click.style(info.id[:12], fg='yellow')}{_decoration(decorations or [])} {first}"


def _prov_lines(prov: dict, indent: str = "    ") -> list[str]:
    out = []
    for key in sorted(prov):
        value = prov[key]
        if isinstance(value, dict):
            if not value:
                continue
            out.append(f"{indent}{key}:")
            out.extend(_prov_lines(value, indent + "  "))
        else:
            text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value
            out.append(f"{indent}{key}: {text}")
    return out


def snapshot_lines(snap: Snapshot) -> list[str]:
    lines = []
    for f in snap.files:
        if f.kind == "safetensors":
            lines.append(f"    {f.path}  {human_bytes(f.size)}  {len(f.tensors)} tensors")
        else:
            lines.append(f"    {f.path}  {human_bytes(f.size)}")
    return lines


def show_text(result: ShowResult) -> str:
    parts = [commit_text(result.info, result.refs), ""]
    if result.info.parents:
        parts.append("Parents: " + " ".join(p[:12] for p in result.info.parents))
    parts.append(f"Snapshot: {result.info.commit.snapshot}")
    parts.append("Files:")
    parts.extend(snapshot_lines(result.snapshot))
    prov = result.info.commit.provenance
    if prov:
        parts.append("Provenance:")
        parts.extend(_prov_lines(prov))
    return "\n".join(parts)


def refs_text(refs: list[RefInfo]) -> str:
    return "\n".join(f"{'*' if r.current else ' '} {r.name}  {r.commit[:12]}" for r in refs)


def error(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.stderr.flush()
