"""``deltareg lineage``, and the training-metadata flags and lines that ``push`` and ``show`` use."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import click

from deltareg.client.cli import cli
from deltareg.client.cli._options import Session, with_session
from deltareg.client.errors import InvalidInput
from deltareg.client.lineage import (
    CODE_COMMIT,
    DATASETS,
    HYPERPARAMETERS,
    Dataset,
    Hyperparameter,
    parse_dataset,
    parse_hyperparameter,
)

SHORT_DIGEST = len("sha256:") + 12


# -- push flags and show lines -----------------------------------------------------------------------


def parse_datasets(values: tuple[str, ...]) -> list[Dataset] | None:
    """``--dataset NAME[@REVISION]`` values; a malformed one is a usage error."""
    try:
        return [parse_dataset(value) for value in values] if values else None
    except InvalidInput as exc:
        raise click.BadParameter(exc.message, param_hint="--dataset") from None


def parse_hyperparameters(values: tuple[str, ...]) -> dict[str, Hyperparameter] | None:
    """``--hparam KEY=VALUE`` values (numbers as numbers, finite only); a malformed one is a usage error."""
    try:
        return dict(parse_hyperparameter(value) for value in values) if values else None
    except InvalidInput as exc:
        raise click.BadParameter(exc.message, param_hint="--hparam") from None


def training_lines(metadata: Mapping[str, Any]) -> list[str]:
    """``show``'s lines for the manifest metadata: datasets, code commit, hyperparameters, then the rest."""
    lines = []
    datasets = metadata.get(DATASETS)
    for item in datasets if isinstance(datasets, list) else []:
        if isinstance(item, dict):
            revision = f"@{item['revision']}" if item.get("revision") else ""
            lines.append(f"dataset:  {item.get('name')}{revision}")
    if isinstance(metadata.get(CODE_COMMIT), str):
        lines.append(f"code:     {metadata[CODE_COMMIT]}")
    hyperparameters = metadata.get(HYPERPARAMETERS)
    if isinstance(hyperparameters, dict):
        lines += [f"hparam:   {key}={value}" for key, value in sorted(hyperparameters.items())]
    known = {DATASETS, CODE_COMMIT, HYPERPARAMETERS}
    lines += [f"meta:     {k}={v}" for k, v in sorted(metadata.items()) if k not in known]
    return lines


# -- deltareg lineage -------------------------------------------------------------------------------


@cli.command()
@click.argument("ref")
@click.option(
    "--depth",
    type=click.IntRange(0, 64),
    default=None,
    help="Levels of descendants to show (default: the registry's, 16).",
)
@with_session
def lineage(session: Session, ref: str, depth: int | None) -> None:
    """Show the lineage of REF: its ancestors (oldest first) down to REF, then its descendants as a tree.

    Aliases pointing into the tree are shown in brackets; yanked versions are marked. --json prints the
    graph as the API returns it.
    """
    graph = session.registry.lineage(ref, depth=depth)
    session.emit(graph, lambda: click.echo("\n".join(render_lineage(graph))))


def render_lineage(graph: Mapping[str, Any]) -> list[str]:
    """The graph as text: the chain from the first ancestor down to the root (marked ``<- REF``), then the
    root's descendants as an indented tree."""
    nodes: list[dict[str, Any]] = list(graph["nodes"])
    root = nodes[0]
    by_digest: dict[str, dict[str, Any]] = {}
    for node in nodes:
        by_digest.setdefault(node["digest"], node)
    chain = [by_digest[digest] for digest in reversed(graph["ancestors"])]
    lines = []
    for depth, node in enumerate(chain):
        lines.append(_indent(depth) + _label(node))
    lines.append(_indent(len(chain)) + _label(root) + "  <- " + f"{root['repo']}:{root['number']}")
    descendants = nodes[1 + len(chain) :]
    children: dict[str, list[dict[str, Any]]] = {}
    for node in descendants:
        children.setdefault(node["parent"], []).append(node)
    shown: set[str] = {root["digest"], *graph["ancestors"]}
    lines += _tree(root["digest"], children, len(chain) + 1, shown)
    if graph.get("truncated"):
        lines.append("(truncated: more descendants than shown; use --depth or --json)")
    if len(lines) == 1 and not graph["ancestors"]:
        lines.append("(no parent and no descendants)")
    return lines


def _tree(
    digest: str, children: Mapping[str, list[dict[str, Any]]], depth: int, shown: set[str]
) -> list[str]:
    lines = []
    for child in children.get(digest, []):
        lines.append(_indent(depth) + _label(child))
        if child["digest"] not in shown:  # a digest's children are listed once (visited set)
            shown.add(child["digest"])
            lines += _tree(child["digest"], children, depth + 1, shown)
    return lines


def _indent(depth: int) -> str:
    return "" if depth == 0 else "    " * (depth - 1) + "└── "


def _label(node: Mapping[str, Any]) -> str:
    parts = [f"{node['repo']}:{node['number']}", node["digest"][:SHORT_DIGEST]]
    if node.get("aliases"):
        parts.append("[" + ", ".join(node["aliases"]) + "]")
    datasets = [
        d["name"] + (f"@{d['revision']}" if d.get("revision") else "") for d in node.get("datasets", [])
    ]
    if datasets:
        parts.append("datasets: " + ", ".join(datasets))
    if node.get("yanked") is not None:
        parts.append(f"YANKED: {node['yanked']}")
    return "  ".join(parts)
