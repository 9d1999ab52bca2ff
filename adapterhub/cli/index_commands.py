"""`ah eval`, `ah best`, `ah query`, `ah reindex`: evals and the DuckDB index.

Registered on the main group by cli/main.py. Like every command, each one parses options,
makes one API call and renders; duckdb is imported only inside the commands that need it.
"""

from __future__ import annotations

import click

from . import render

FORMATS = click.Choice(["text", "json"])


def _open(ctx: click.Context):
    # Imported here, not at module level: cli/main.py imports this module at its bottom.
    from .main import _open as open_registry

    return open_registry(ctx)


def eval_text(infos) -> str:
    lines = []
    for e in infos:
        r = e.record
        where = " ".join(x for x in (f"suite={r.suite}" if r.suite else "", f"dataset={r.dataset}" if r.dataset else "") if x)
        lines.append(
            f"{e.id[:12]}  {r.commit[:12]}  {r.metric}={r.value:g}  {where}  "
            f"{render.iso_time(r.timestamp)}  {r.evaluator}".replace("    ", "  ")
        )
    return "\n".join(lines)


@click.group("eval")
def eval_group():
    """Record and list evaluation results of revisions."""


@eval_group.command("add")
@click.argument("rev")
@click.option("--metric", "metrics", multiple=True, required=True, metavar="NAME=VALUE", help="A metric; repeatable.")
@click.option("--suite", default="", help="Evaluation suite or benchmark name.")
@click.option("--dataset", help="Evaluation dataset name or URI.")
@click.option("--evaluator", help="Who or what ran the evaluation (default: you).")
@click.option("--detail", "details", multiple=True, metavar="KEY=VALUE", help="Free-form detail; repeatable.")
@click.option("--format", "fmt", type=FORMATS, default="text", show_default=True)
@click.pass_context
def eval_add(ctx, rev, metrics, suite, dataset, evaluator, details, fmt):
    """Record METRICs for REV, one eval object each."""
    from ..evals import parse_detail_args, parse_metric_args

    parsed, extra = parse_metric_args(metrics), parse_detail_args(details)
    infos = _open(ctx).add_eval(rev, parsed, suite=suite, dataset=dataset, evaluator=evaluator, details=extra)
    if fmt == "json":
        render.emit_json([e.to_json() for e in infos])
    else:
        click.echo(eval_text(infos))


@eval_group.command("list")
@click.argument("rev", default="HEAD")
@click.option("--format", "fmt", type=FORMATS, default="text", show_default=True)
@click.pass_context
def eval_list(ctx, rev, fmt):
    """List the eval records of REV (default HEAD), oldest first."""
    infos = _open(ctx).evals(rev)
    if fmt == "json":
        render.emit_json([e.to_json() for e in infos])
    elif infos:
        click.echo(eval_text(infos))


COMMANDS = [eval_group]


def _json_value(v):
    """DuckDB values (lists, dates, decimals) as JSON-friendly values."""
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _json_value(x) for k, x in v.items()}
    return str(v)


def table_text(columns: list[str], rows: list[tuple]) -> str:
    cells = [[("NULL" if v is None else str(v)) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()  # noqa: E731
    out = [line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells]
    out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(out)


@click.command()
@click.argument("sql")
@click.option("--format", "fmt", type=click.Choice(["text", "json", "csv"]), default="text", show_default=True)
@click.option("--timeout", "timeout_s", type=float, default=60.0, show_default=True, help="Stop the query after this many seconds.")
@click.pass_context
def query(ctx, sql, fmt, timeout_s):
    """Run one read-only SELECT over the index (tables: docs/index.md)."""
    from ..index.sql import run_query

    result = run_query(_open(ctx), sql, timeout_s=timeout_s)
    if fmt == "json":
        render.emit_json([dict(zip(result.columns, map(_json_value, row))) for row in result.rows])
    elif fmt == "csv":
        import csv
        import sys

        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(result.columns)
        for row in result.rows:
            writer.writerow(["" if v is None else (v if not isinstance(v, (list, dict)) else str(_json_value(v))) for v in row])
    else:
        click.echo(table_text(result.columns, result.rows))


@click.command()
@click.argument("metric")
@click.option("-b", "--branch", "rev", help="Only ancestors of this branch (or any revision).")
@click.option("--min", "minimize", is_flag=True, help="Lower is better (loss, perplexity).")
@click.option("--suite", help="Only records of this suite.")
@click.option("-n", "count", type=int, default=1, show_default=True, help="How many commits to list.")
@click.option("--format", "fmt", type=FORMATS, default="text", show_default=True)
@click.pass_context
def best(ctx, metric, rev, minimize, suite, count, fmt):
    """The commit(s) with the best value of METRIC, best first."""
    from ..index.queries import best as best_query

    results = best_query(_open(ctx), metric, rev=rev, minimize=minimize, suite=suite, n=count)
    if fmt == "json":
        render.emit_json([r.to_json() for r in results])
        return
    for r in results:
        e = r.eval.record
        suite_txt = f"  suite={e.suite}" if e.suite else ""
        click.echo(f"{r.info.id[:12]}  {e.metric}={e.value:g}{suite_txt}  {r.info.message.splitlines()[0] if r.info.message else ''}")


@click.command()
@click.pass_context
def reindex(ctx):
    """Rebuild .ah/index.duckdb from objects and refs."""
    from ..index.build import rebuild

    stats = rebuild(_open(ctx))
    click.echo(
        f"Reindexed {stats.commits} commits, {stats.snapshots} snapshots ({stats.tensors} tensors), "
        f"{stats.evals} evals, {stats.refs} refs in {stats.seconds:.2f} s"
    )


COMMANDS.extend([query, best, reindex])
