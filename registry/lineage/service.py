"""The lineage graph of a version: its ancestors (following parent digests) and its descendants.

Ancestors follow ``parent`` digests up to the first version. A digest may be a version of several repos
(the same manifest pushed twice): the ancestor shown is the one in the child's repo if there is one, else
the oldest (lowest id) of them. Every copy holds the same manifest, so the choice changes only which
repo, number and aliases are shown, never the chain of deltas.

Descendants are found breadth-first, one SQL statement per level (``parent_digest IN (<the level>)``),
bounded by ``depth`` levels and ``MAX_NODES`` versions; ``truncated`` says when a bound cut the graph.
Every version with a parent in the tree is a descendant, whatever its repo. A digest is expanded once
(a visited set), so even a parent cycle planted in the database could not make the walk loop.
"""

from __future__ import annotations

import json
import math
from typing import Any

from sqlalchemy.orm import Session

from deltareg.client.errors import AliasNotFound, VersionNotFound
from deltareg.client.refs import Reference
from deltareg.registry.aliases.repository import AliasRepository
from deltareg.registry.lineage.repository import LineageRepository, LineageRow
from deltareg.registry.lineage.schemas import DatasetOut, LineageEdge, LineageGraph, LineageNode
from deltareg.registry.models import Version
from deltareg.registry.versions.repository import RepoRepository, VersionRepository

DEFAULT_DEPTH = 16
MAX_DEPTH = 64
# Descendants returned at most (the root and its ancestors come on top).
MAX_NODES = 500
# A chain longer than this is cut (and flagged): deltas are not stacked thousands deep in practice.
MAX_ANCESTORS = 256


class LineageService:
    def __init__(self, session: Session) -> None:
        self.repos = RepoRepository(session)
        self.versions = VersionRepository(session)
        self.aliases = AliasRepository(session)
        self.lineage = LineageRepository(session)

    def graph(self, ref_text: str, *, depth: int = DEFAULT_DEPTH, manifests: bool = False) -> LineageGraph:
        """The lineage of the version ``ref_text`` names.

        Args:
            depth: levels of descendants to follow (0: none).
            manifests: include the manifests of the root and its ancestors (what applying a chain needs).

        Raises:
            InvalidReference, InvalidName: the reference is malformed.
            RepoNotFound, VersionNotFound, AliasNotFound: it names nothing.
        """
        root = self._resolve(Reference.parse(ref_text))
        ancestors, truncated = self._ancestors(root)
        descendants, cut = self._descendants(root, ancestors, depth)
        rows = [root, *ancestors, *descendants]
        aliases = self.lineage.aliases_of([version.id for version, _, _ in rows])
        with_manifest = {root[0].id, *(version.id for version, _, _ in ancestors)} if manifests else set()
        nodes = [_node(row, aliases.get(row[0].id, []), row[0].id in with_manifest) for row in rows]
        in_tree = {node.digest for node in nodes}
        edges: dict[tuple[str, str], LineageEdge] = {}
        for node in nodes:
            if node.parent is not None and node.parent in in_tree:
                edges.setdefault(
                    (node.parent, node.digest), LineageEdge(parent=node.parent, child=node.digest)
                )
        return LineageGraph(
            root=root[0].digest,
            nodes=nodes,
            edges=list(edges.values()),
            ancestors=[version.digest for version, _, _ in ancestors],
            descendants=_unique(version.digest for version, _, _ in descendants),
            truncated=truncated or cut,
        )

    def _resolve(self, ref: Reference) -> LineageRow:
        repo = self.repos.require(ref.repo.namespace, ref.repo.name)
        if ref.alias is not None:
            holder = self.aliases.get(repo.id, ref.alias)
            if holder is None:
                raise AliasNotFound(f"alias {ref.alias!r} is not defined on {ref.repo}")
            found = self.versions.by_number(repo.id, holder[1].number)
        elif ref.version is not None:
            found = self.versions.by_number(repo.id, ref.version)
        elif ref.digest is not None:
            found = self.versions.by_digest(repo.id, ref.digest)
        else:  # ``ns/name`` means the newest version that is not yanked, as everywhere else
            found = self.versions.latest_not_yanked(repo.id)
        if found is None:
            raise VersionNotFound(f"{ref} names no version (that is not yanked)")
        return found[0], repo, found[1]

    def _ancestors(self, root: LineageRow) -> tuple[list[LineageRow], bool]:
        """Nearest first; True when the chain was cut by MAX_ANCESTORS."""
        chain: list[LineageRow] = []
        seen = {root[0].digest}
        child = root
        while child[0].parent_digest is not None and child[0].parent_digest not in seen:
            if len(chain) == MAX_ANCESTORS:
                return chain, True
            candidates = self.lineage.with_digest(child[0].parent_digest)
            if not candidates:
                break  # cannot happen through the API (a push checks its parent); shown as the chain's end
            same_repo = [row for row in candidates if row[1].id == child[1].id]
            child = (same_repo or candidates)[0]
            seen.add(child[0].digest)
            chain.append(child)
        return chain, False

    def _descendants(
        self, root: LineageRow, ancestors: list[LineageRow], depth: int
    ) -> tuple[list[LineageRow], bool]:
        """Breadth-first from the root, one statement per level; True when a bound cut the graph."""
        found: list[LineageRow] = []
        seen_ids = {row[0].id for row in (root, *ancestors)}
        expanded = {row[0].digest for row in (root, *ancestors)}
        level = [root[0].digest]
        for _ in range(depth):
            room = MAX_NODES - len(found)
            if room <= 0:
                return found, bool(self.lineage.children_of(level, 1))
            children = [row for row in self.lineage.children_of(level, room + 1) if row[0].id not in seen_ids]
            if len(children) > room:
                return found + children[:room], True
            found += children
            seen_ids.update(row[0].id for row in children)
            level = _unique(row[0].digest for row in children if row[0].digest not in expanded)
            expanded.update(level)
            if not level:
                return found, False
        return found, bool(self.lineage.children_of(level, 1))


def _unique(digests: Any) -> list[str]:
    return list(dict.fromkeys(digests))


def _node(row: LineageRow, aliases: list[str], with_manifest: bool) -> LineageNode:
    version, repo, size = row
    manifest: dict[str, Any] = json.loads(version.manifest)
    base = _object(manifest.get("base"))
    metadata = _object(manifest.get("metadata"))
    return LineageNode(
        repo=repo.full_name,
        number=version.number,
        digest=version.digest,
        parent=version.parent_digest,
        kind=version.kind,
        base_fingerprint=version.base_fingerprint,
        base_name=_text(base.get("name")),
        base_revision=_text(base.get("revision")),
        created_at=version.created_at,
        pushed_by=version.pushed_by,
        size=size,
        yanked=_yank_reason(version),
        datasets=_datasets(metadata.get("datasets")),
        code_commit=_text(metadata.get("code_commit")),
        hyperparameters=_hyperparameters(metadata.get("hyperparameters")),
        aliases=aliases,
        manifest=manifest if with_manifest else None,
    )


def _yank_reason(version: Version) -> str | None:
    if version.yanked_at is None:
        return None
    return version.yank_reason or "yanked (no reason given)"


# The well-known training metadata keys are read defensively: the manifest's metadata is free-form, so a
# version pushed by another client may hold anything under these keys; what does not fit is left out.


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _datasets(value: Any) -> list[DatasetOut]:
    if not isinstance(value, list):
        return []
    return [
        DatasetOut(name=item["name"], revision=_text(item.get("revision")))
        for item in value
        if isinstance(item, dict) and isinstance(item.get("name"), str)
    ]


def _hyperparameters(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        return {}
    return {
        key: item
        for key, item in value.items()
        if isinstance(item, str | bool | int) or (isinstance(item, float) and math.isfinite(item))
    }
