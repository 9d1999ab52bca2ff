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
