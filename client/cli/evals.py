"""``deltareg eval`` (record scores on a version after its push) and ``deltareg search``."""

from __future__ import annotations

from typing import Any

import click

from deltareg.client.cli import cli
from deltareg.client.cli._options import Session, parse_scores, with_session

DIGEST_SHOWN = len("sha256:") + 12


@cli.command("eval")
@click.argument("ref")
@click.argument("scores", nargs=-1, required=True, metavar="NAME=VALUE...")
@click.option("--dataset", default=None, metavar="D", help="The dataset the scores were measured on.")
@click.option("--dataset-revision", default=None, metavar="R", help="That dataset's revision.")
@click.option("--suite", default=None, metavar="VERSION", help="The eval suite's version.")
@with_session
def eval_(
    session: Session,
    ref: str,
    scores: tuple[str, ...],
    dataset: str | None,
    dataset_revision: str | None,
    suite: str | None,
) -> None:
    """Record scores (NAME=VALUE, finite numbers) on the version REF names; the actor is recorded."""
    try:
        parsed = parse_scores(scores)
    except click.BadParameter as exc:
        exc.param_hint = "NAME=VALUE"
        raise
    recorded = session.registry.eval(
        ref, parsed, dataset=dataset, dataset_revision=dataset_revision, suite=suite
    )
    names = " ".join(f"{e['name']}={e['value']:g}" for e in recorded["evals"])
    on = measured_on(recorded["evals"][0]) if recorded["evals"] else ""
    session.emit(recorded, f"recorded on {recorded['repo']}:{recorded['number']}: {names}{on}")


@cli.command()
@click.option("--repo", default=None, metavar="NS/NAME", help="Only versions of this repository.")
@click.option("--namespace", default=None, metavar="NS", help="Only versions of this namespace.")
@click.option("--base", default=None, metavar="FINGERPRINT", help="Only versions for this tmv1: base.")
@click.option(
    "--where",
    "where",
    multiple=True,
    metavar="EXPR",
    help="METRIC OP NUMBER, OP one of >=, <=, >, <, = (repeatable; all must hold): the version's newest "
    "score of the metric (on --dataset, if given) must satisfy it.",
)
@click.option("--dataset", default=None, metavar="D", help="Only versions scored on D; scopes --where to D.")
@click.option("--alias", default=None, metavar="A", help="Only versions an alias named A points to now.")
@click.option("--include-yanked", is_flag=True, help="Include yanked versions (left out by default).")
@click.option(
    "--limit",
    default=100,
    show_default=True,
    type=click.IntRange(1, None),
    metavar="N",
    help="At most N versions.",
)
@with_session
def search(
    session: Session,
    repo: str | None,
    namespace: str | None,
    base: str | None,
    where: tuple[str, ...],
    dataset: str | None,
    alias: str | None,
    include_yanked: bool,
    limit: int,
) -> None:
    """Search versions across repositories, newest first; one line per version."""
    if repo is not None and namespace is not None:
        raise click.UsageError("give --repo or --namespace, not both")
    found = session.registry.search(
        repo=repo,
        namespace=namespace,
        base=base,
        where=where,
        dataset=dataset,
        alias=alias,
        include_yanked=include_yanked,
        limit=limit,
    )

    def table() -> None:
        if not found:
            click.echo("no matching versions")
        for hit in found:
            click.echo(_hit_line(hit, dataset))

    session.emit(found, table)


def _hit_line(hit: dict[str, Any], dataset: str | None) -> str:
    """``acme/bot:3  sha256:0123456789ab  accuracy=0.91 f1=0.8`` (+ ``yanked: reason``).

    The scores shown are the matched ones with --where, else each metric's newest (on --dataset, if given).
    """
    shown = hit.get("matched") or _newest_per_metric(hit.get("evals", []), dataset)
    scores = " ".join(f"{e['name']}={e['value']:g}" for e in shown) or "-"
    yanked = f"  yanked: {hit['yanked']['reason']}" if hit.get("yanked") else ""
    return f"{hit['repo']}:{hit['number']}  {hit['digest'][:DIGEST_SHOWN]}  {scores}{yanked}"


def _newest_per_metric(evals: list[dict[str, Any]], dataset: str | None) -> list[dict[str, Any]]:
    newest: dict[str, dict[str, Any]] = {}
    for e in evals:  # by name, then oldest first: the last one of a name is its newest
        if dataset is None or e.get("dataset") == dataset:
            newest[e["name"]] = e
    return list(newest.values())


def measured_on(e: dict[str, Any]) -> str:
    """`` (tickets@r3, suite 1.2, by alice)``: what a score was measured on and who recorded it."""
    parts = []
    revision = f"@{e['dataset_revision']}" if e.get("dataset_revision") else ""
    if e.get("dataset") or revision:
        parts.append(f"{e.get('dataset') or 'dataset'}{revision}")
    if e.get("suite_version"):
        parts.append(f"suite {e['suite_version']}")
    if e.get("actor"):
        parts.append(f"by {e['actor']}")
    return f" ({', '.join(parts)})" if parts else ""
