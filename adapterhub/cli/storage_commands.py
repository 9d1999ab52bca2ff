"""`ah gc`, `ah fsck`, `ah stats`, `ah pack-refs`, `ah import`: the storage engine's commands.

Registered on the main group by cli/main.py. Each parses options, makes one library call
(adapterhub.gc, .fsck, .stats, .refs, .importer) and renders the result.
"""

from __future__ import annotations

from pathlib import Path

import click

from . import render

FORMATS = click.Choice(["text", "json"])


def _open(ctx: click.Context, *, read_only: bool = False):
    # Imported here, not at module level: cli/main.py imports this module at its bottom.
    from .main import _open as open_registry

    return open_registry(ctx, read_only=read_only)


def _packed_store(reg):
    from ..errors import AhError
    from ..packstore import PackedObjectStore

    if not isinstance(reg.store, PackedObjectStore):
        raise AhError("this registry's object store does not support packs")
    return reg.store


def _duration(text: str) -> float:
    """Seconds from `90`, `30s`, `15m`, `12h`, `14d` or `now`."""
    from ..errors import UsageError

    text = text.strip().lower()
    if text == "now":
        return 0.0
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
    scale = units.get(text[-1:], None)
    number = text[:-1] if scale else text
    try:
        value = float(number) * (scale or 1)
    except ValueError:
        raise UsageError(f"--prune expects a duration like 14d, 12h, 30m, 90s or now; got {text!r}") from None
    if value < 0:
        raise UsageError("--prune cannot be negative")
    return value


@click.command("gc")
@click.option(
    "--prune", "prune", default="14d", show_default=True, metavar="AGE",
    help="Remove unreachable objects older than AGE (e.g. 14d, 12h, 30m, now); never younger than 1 minute.",
)
@click.option(
    "--aggressive", is_flag=True,
    help="Also recompute tensor deltas newest-first, so branch tips are stored whole and check out fastest (slower gc).",
)
@click.option("--format", "fmt", type=FORMATS, default="text", show_default=True)
@click.pass_context
def gc_command(ctx, prune: str, aggressive: bool, fmt: str):
    """Repack reachable objects into one pack; prune unreachable ones past a grace period."""
    from ..gc import collect_garbage

    reg = _open(ctx)
    result = collect_garbage(reg.ah_dir, _packed_store(reg), reg.refs, grace_s=_duration(prune), aggressive=aggressive)
    if fmt == "json":
        render.emit_json(result.__dict__)
        return
    click.echo(
        f"{result.reachable} reachable objects, {result.packed} packed"
        f"{' into ' + result.pack if result.pack else ''}; {result.pruned} pruned, "
        f"{result.kept_recent} unreachable kept (younger than {prune}); "
        f"{render.human_bytes(result.stored_before)} -> {render.human_bytes(result.stored_after)}"
    )
    if result.missing:
        click.echo(f"warning: {len(result.missing)} reachable objects are missing or damaged; nothing was pruned "
                   f"(run `ah fsck`), e.g. {result.missing[0]}", err=True)
    if result.refs_not_packed:
        click.echo(f"warning: refs were left loose: {result.refs_not_packed}", err=True)


@click.command("fsck")
@click.option("--format", "fmt", type=FORMATS, default="text", show_default=True)
@click.pass_context
def fsck_command(ctx, fmt: str):
    """Re-hash every stored object and check that the refs reach only sound objects.

    Read-only. Exit code 1 when anything of error severity is found (warnings alone: 0).
    """
    import contextlib

    from ..fsck import check_registry
    from .progress import count_progress

    reg = _open(ctx, read_only=True)
    store = _packed_store(reg)
    bars = contextlib.ExitStack()
    update = []

    def total(n: int) -> None:
        update.append(bars.enter_context(count_progress(n, "fsck", unit="copy")))

    def progress(k: int) -> None:
        if update and update[0] is not None:
            update[0](k)

    with bars:
        result = check_registry(reg.ah_dir, store.root, reg.refs, progress_total=total, progress=progress)
    if fmt == "json":
        render.emit_json(result.to_json())
    else:
        for finding in result.findings:
            click.echo(finding.text())
        click.echo(
            f"checked {result.objects_checked} objects ({result.copies_checked} stored copies, "
            f"{render.human_bytes(result.bytes_checked)}, {result.packs} pack{'s' if result.packs != 1 else ''}) and {result.refs} refs "
            f"in {result.seconds:.1f}s; {result.reachable} reachable, {result.unreachable} unreachable; "
            f"{result.errors} errors, {result.warnings} warnings"
        )
    if not result.ok:
        render.error(f"fsck found {result.errors} error{'s' if result.errors != 1 else ''} (listed on stdout)")
        ctx.exit(1)


def stats_text(s) -> str:
    rows = [
        ("objects", f"{s.objects} ({s.loose_objects} loose, {s.packed_objects} packed in {s.packs} packs)"),
        ("revisions", f"{s.revisions}"),
        ("revision bytes", f"{render.human_bytes(s.revision_bytes)}  (every revision as a plain copy)"),
        ("content bytes", f"{render.human_bytes(s.content_bytes)}  (distinct files and tensors)"),
        ("dedup savings", render.human_bytes(s.dedup_savings)),
        ("logical bytes", f"{render.human_bytes(s.logical_bytes)}  (distinct objects, uncompressed)"),
        ("stored bytes", render.human_bytes(s.stored_bytes)),
        ("ratio", f"{s.ratio:.2f}x logical/stored, {s.total_ratio:.2f}x revisions/stored"),
    ]
    return "\n".join(f"{k:>15}: {v}" for k, v in rows)


@click.command("stats")
@click.option("--format", "fmt", type=FORMATS, default="text", show_default=True)
@click.pass_context
def stats_command(ctx, fmt: str):
    """Logical and stored bytes, compression ratio, objects, packs and dedup savings."""
    from ..stats import store_stats

    reg = _open(ctx)
    s = store_stats(reg.ah_dir, _packed_store(reg), reg.refs)
    if fmt == "json":
        render.emit_json(s.to_json())
    else:
        click.echo(stats_text(s))


@click.command("pack-refs")
@click.pass_context
def pack_refs_command(ctx):
    """Fold loose branches and tags into the sorted packed-refs file."""
    reg = _open(ctx)
    click.echo(f"packed {reg.refs.pack_refs()} refs")


@click.command("import")
@click.argument("folders", nargs=-1, required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--prefix", default="", help="Branch name prefix, e.g. users/ (branch = prefix + folder name).")
@click.option("-m", "--message", help="Commit message (default: import <folder name>).")
@click.option("-j", "--jobs", type=click.IntRange(1, 256), help="Worker processes (default: one per core).")
@click.option("--format", "fmt", type=FORMATS, default="text", show_default=True)
@click.pass_context
def import_command(ctx, folders, prefix: str, message: str | None, jobs: int | None, fmt: str):
    """Import many adapter folders at once, each as a commit on a branch named after it."""
    from ..importer import import_folders
    from .progress import count_progress

    reg = _open(ctx)
    with count_progress(len(folders), "import") as progress:
        result = import_folders(
            reg.ah_dir, _packed_store(reg), reg.refs, folders, prefix=prefix, message=message, workers=jobs,
            progress=progress,
        )
    if fmt == "json":
        render.emit_json(dict(result.__dict__, rate=round(result.rate, 1)))
        return
    click.echo(
        f"imported {result.adapters} adapters ({result.created} new branches, {result.updated} updated) "
        f"in {result.seconds:.1f}s, {result.rate:.0f} adapters/s; {result.objects_written} objects into "
        f"{result.packs} pack(s), {render.human_bytes(result.logical_bytes)} read"
    )


COMMANDS = [gc_command, fsck_command, stats_command, pack_refs_command, import_command]
