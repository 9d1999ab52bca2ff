"""`ah`: parse options, make one API call, render the result.

Heavy modules (the store, DuckDB, torch) are imported inside commands, never at start-up,
so `ah --help` and `ah log` start fast. Errors are mapped to one `error:` line and an exit
code in `AhGroup.main`; no command prints a traceback for a user mistake.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import click

from .. import __version__
from . import render

FORMATS = click.Choice(["text", "json"])


class AhGroup(click.Group):
    """Click group that turns library and usage errors into `error:` lines and exit codes."""

    def main(self, args=None, prog_name=None, **extra):
        from ..errors import AhError

        try:
            rv = super().main(args=args, prog_name=prog_name, standalone_mode=False, **extra)
        except click.exceptions.Abort:
            render.error("aborted")
            sys.exit(130)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx else ""
            render.error(f"{exc.format_message()}{hint}")
            sys.exit(2)
        except click.ClickException as exc:
            render.error(exc.format_message())
            sys.exit(exc.exit_code)
        except AhError as exc:
            render.error(str(exc))
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            render.error("interrupted")
            sys.exit(130)
        except OSError as exc:
            where = f": {exc.filename}" if exc.filename else ""
            render.error(f"{exc.strerror or exc}{where}")
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


def _open(ctx: click.Context, *, read_only: bool = False):
    from ..registry import Registry

    return Registry.open(ctx.obj.get("registry"), read_only=read_only)


def _decorations(reg) -> dict[str, list[str]]:
    """commit id -> ["HEAD -> main", "tag: v1", ...] for log output."""
    out: dict[str, list[str]] = {}
    current = reg.current_branch()
    target, head = reg.refs.read_head()
    if target is None and head:
        out.setdefault(head, []).append("HEAD")
    for b in reg.branches():
        out.setdefault(b.commit, []).append(f"HEAD -> {b.name}" if b.name == current else b.name)
    for t in reg.tags():
        out.setdefault(t.commit, []).append(f"tag: {t.name}")
    return out


@click.group(cls=AhGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--registry",
    type=click.Path(file_okay=False, path_type=Path),
    help="Registry folder (the one holding .ah/). Default: $AH_REGISTRY, else the nearest .ah/ upward.",
)
# The version from the package itself: asked of the installed metadata, click imported
# importlib.metadata (~20 ms) for `ah --version` (test_cli checks the two agree).
@click.version_option(version=__version__, prog_name="ah")
@click.pass_context
def cli(ctx: click.Context, registry: Path | None):
    """adapterhub: version control for PEFT adapters."""
    ctx.ensure_object(dict)
    ctx.obj["registry"] = registry


@cli.command()
@click.argument("path", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("-b", "--initial-branch", default="main", show_default=True, help="Name of the first branch.")
@click.pass_context
def init(ctx, path: Path | None, initial_branch: str):
    """Create an empty registry in PATH (default: --registry, else the current folder)."""
    from ..registry import Registry

    target = path or ctx.obj.get("registry") or Path(".")
    reg = Registry.init(target, default_branch=initial_branch)
    click.echo(f"Initialized empty adapterhub registry in {reg.ah_dir.resolve()}")


@cli.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("-m", "--message", required=True, help="Commit message.")
@click.option("-b", "--branch", help="Commit on this branch (created if missing) instead of HEAD's.")
@click.option("--base-model", help="Base model name (default: adapter_config.json's base_model_name_or_path).")
@click.option("--base-model-revision", help="Base model revision (default: adapter_config.json's revision).")
@click.option("--dataset", help="Dataset URI or local path.")
@click.option("--train-config", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Training config (JSON or YAML).")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE", help="A training parameter; repeatable.")
@click.option("--author", help='Author as "Name <email>" (default: $AH_AUTHOR, else git config).')
@click.option("--sign", is_flag=True, help="Sign the commit with your ed25519 key.")
@click.pass_context
def commit(ctx, folder, message, branch, base_model, base_model_revision, dataset, train_config, params, author, sign):
    """Record the adapter in FOLDER as a new revision. Prints the commit id last."""
    from ..errors import AhError
    from ..provenance import parse_params
    from ..snapshot import list_adapter_files
    from .progress import byte_progress

    if sign:
        raise AhError("commit signing is not available in this version yet")
    reg = _open(ctx)
    total = sum(p.stat().st_size for _, p in list_adapter_files(folder)) if Path(folder).is_dir() else 0
    with byte_progress(total, "commit") as progress:
        result = reg.commit(
            folder, message, branch=branch, base_model=base_model, base_model_revision=base_model_revision,
            dataset=dataset, train_config=train_config, params=parse_params(params), author=author,
            progress=progress,
        )
    where = result.branch or "detached HEAD"
    root = " (root-commit)" if not result.parents else ""
    click.echo(f"[{where}{root} {result.id[:12]}] {message.splitlines()[0]}")
    click.echo(
        f" {result.files} files, {result.tensors} tensors, {render.human_bytes(result.logical_bytes)}; "
        f"{result.new_objects} new objects stored"
    )
    click.echo(result.id)
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    if result.notice:
        click.echo(f"hint: {result.notice}", err=True)


@cli.command()
@click.argument("rev", default="HEAD")
@click.option("-n", "--max-count", "n", type=int, help="Show at most N commits.")
@click.option("--oneline", is_flag=True, help="One line per commit.")
@click.option("--format", "fmt", type=FORMATS, default="text", show_default=True)
@click.option("--where", "where", multiple=True, metavar="FILTER",
              help="Keep commits matching FILTER (base_model=X, author~alice, metric:acc>=0.9; docs/index.md); repeatable.")
@click.pass_context
def log(ctx, rev, n, oneline, fmt, where):
    """Show the history of REV (default HEAD), newest first."""
    reg = _open(ctx)
    if where:  # only filtered logs use the DuckDB index
        from ..index.queries import log_where, parse_where

        infos = log_where(reg, rev, [parse_where(w) for w in where], n)
    elif fmt == "json":
        infos = reg.log(rev, n)
    else:  # printed as walked: a commit that cannot be read ends the log with its error, after the rest
        if n is not None and n < 0:
            raise click.UsageError("-n must be zero or more")
        infos = itertools.islice(reg.iter_log(rev), n)
    if fmt == "json":
        render.emit_json([dict(i.to_json(), evals=[e.to_json() for e in reg.evals(i.id)]) for i in infos])
        return
    deco = _decorations(reg)
    for k, info in enumerate(infos):
        if oneline:
            click.echo(render.oneline(info, deco.get(info.id)))
        else:
            click.echo(("\n" if k else "") + render.commit_text(info, deco.get(info.id)))


@cli.command()
@click.argument("rev", default="HEAD")
@click.option("--format", "fmt", type=FORMATS, default="text", show_default=True)
@click.pass_context
def show(ctx, rev, fmt):
    """Show one revision: metadata, provenance, files and eval records."""
    from .index_commands import eval_text

    reg = _open(ctx)
    result = reg.show(rev)
    evals = reg.evals(result.info.id)  # from the commit's eval list: no index needed
    if fmt == "json":
        render.emit_json(dict(result.to_json(), evals=[e.to_json() for e in evals]))
    else:
        click.echo(render.show_text(result) + (f"\nEvals:\n{eval_text(evals)}" if evals else ""))


@cli.command()
@click.argument("rev")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Folder to write the adapter into.")
@click.option("-f", "--force", is_flag=True, help="Write into a non-empty folder, replacing the adapter's files.")
@click.pass_context
def checkout(ctx, rev, out, force):
    """Write the adapter folder of REV into OUTPUT, byte-identical to what was committed."""
    from .progress import byte_progress

    reg = _open(ctx)
    oid = reg.resolve(rev)
    snap = reg.store.get_snapshot(reg.store.get_commit(oid).snapshot)
    with byte_progress(sum(f.size for f in snap.files), "checkout") as progress:
        result = reg.checkout(oid, out, force=force, progress=progress)
    click.echo(f"Checked out {result.id[:12]} into {out} ({result.files} files, {render.human_bytes(result.bytes)})")


@cli.command()
@click.argument("name", required=False)
@click.argument("start", required=False, default="HEAD")
@click.option("-d", "--delete", is_flag=True, help="Delete branch NAME.")
@click.option("-f", "--force", is_flag=True, help="Move NAME to START even if it exists.")
@click.option("--format", "fmt", type=FORMATS, default="text", show_default=True)
@click.pass_context
def branch(ctx, name, start, delete, force, fmt):
    """List branches, create NAME at START (default HEAD), or delete NAME with -d."""
    reg = _open(ctx)
    if delete:
        if not name:
            raise click.UsageError("branch -d needs a branch name")
        info = reg.delete_branch(name)
        click.echo(f"Deleted branch {info.name} (was {info.commit[:12]})")
    elif name:
        info = reg.create_branch(name, start, force=force)
        click.echo(f"Created branch {info.name} at {info.commit[:12]}")
    elif fmt == "json":
        render.emit_json([b.to_json() for b in reg.branches()])
    else:
        text = render.refs_text(reg.branches())
        if text:
            click.echo(text)


@cli.command()
@click.argument("name", required=False)
@click.argument("rev", required=False, default="HEAD")
@click.option("-m", "--message", help="Make an annotated tag with this message.")
@click.option("-d", "--delete", is_flag=True, help="Delete tag NAME.")
@click.option("-f", "--force", is_flag=True, help="Replace an existing tag.")
@click.option("--format", "fmt", type=FORMATS, default="text", show_default=True)
@click.pass_context
def tag(ctx, name, rev, message, delete, force, fmt):
    """List tags, tag REV (default HEAD) as NAME, or delete NAME with -d."""
    reg = _open(ctx)
    if delete:
        if not name:
            raise click.UsageError("tag -d needs a tag name")
        info = reg.delete_tag(name)
        click.echo(f"Deleted tag {info.name} (was {info.commit[:12]})")
    elif name:
        info = reg.create_tag(name, rev, message=message, force=force)
        click.echo(f"Tagged {info.commit[:12]} as {info.name}")
    elif fmt == "json":
        render.emit_json([t.to_json() for t in reg.tags()])
    else:
        for t in reg.tags():
            click.echo(f"{t.name}  {t.commit[:12]}")


@cli.command()
@click.argument("name")
@click.argument("start", required=False, default="HEAD")
@click.option("-c", "--create", is_flag=True, help="Create NAME at START first.")
@click.pass_context
def switch(ctx, name, start, create):
    """Point HEAD at branch NAME, so commits go there by default."""
    info = _open(ctx).switch(name, create=create, start=start)
    click.echo(f"Switched to {'a new ' if create else ''}branch {info.name}")


@cli.command()
@click.argument("ref", default="HEAD")
@click.option("-n", "--max-count", "n", type=int, help="Show at most N entries.")
@click.pass_context
def reflog(ctx, ref, n):
    """Show how a branch (default HEAD's) moved, newest first."""
    from ..refs import HEADS, TAGS

    reg = _open(ctx)
    if ref == "HEAD":
        target, _ = reg.refs.read_head()
        refname = target or "HEAD"
    elif ref.startswith("refs/"):
        refname = ref
    else:
        refname = HEADS + ref if reg.refs.read(HEADS + ref) or not reg.refs.read(TAGS + ref) else TAGS + ref
    entries = list(reversed(reg.refs.reflog(refname)))[:n]
    for e in entries:
        click.echo(f"{e.new[:12]} {render.iso_time(e.timestamp)} {e.message}")


@cli.command("cat-file")
@click.argument("obj")
@click.option("-t", "mode", flag_value="type", help="Print the object's type.")
@click.option("-s", "mode", flag_value="size", help="Print the object's body size.")
@click.option("-p", "mode", flag_value="pretty", default=True, help="Pretty-print the object (default).")
@click.pass_context
def cat_file(ctx, obj, mode):
    """Show a raw object by id or revision (for debugging)."""
    import json

    from ..objects import is_oid

    reg = _open(ctx)
    oid = obj if is_oid(obj) and reg.store.has(obj) else None
    if oid is None:
        from ..errors import UnknownRevision

        try:
            oid = reg.resolve(obj)
        except UnknownRevision:
            oid = reg.store.resolve_prefix(obj.lower()) if len(obj) >= 6 else None
            if oid is None:
                raise
    obj_type, body = reg.store.read(oid)
    if mode == "type":
        click.echo(obj_type)
    elif mode == "size":
        click.echo(len(body))
    elif obj_type in ("tensor",) or (obj_type == "blob" and b"\0" in body[:8192]):
        click.echo(f"<{obj_type}: {len(body)} bytes>")
    else:
        text = body.decode("utf-8", "replace")
        if obj_type in ("commit", "snapshot", "tag", "eval"):
            text = json.dumps(json.loads(text), indent=2, ensure_ascii=False)
        click.echo(text)


def _register_index_commands() -> None:
    # At the bottom so index_commands can import FORMATS and _open from this module.
    from .index_commands import COMMANDS

    for command in COMMANDS:
        cli.add_command(command)


_register_index_commands()


def _register_storage_commands() -> None:
    # gc, stats, pack-refs, import (issue 4); at the bottom for the same reason.
    from .storage_commands import COMMANDS

    for command in COMMANDS:
        cli.add_command(command)


_register_storage_commands()


def main() -> None:
    cli(prog_name="ah")


if __name__ == "__main__":
    main()
