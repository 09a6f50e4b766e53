from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field


class DatasetOut(BaseModel):
    name: str
    revision: str | None = None


class LineageNode(BaseModel):
    repo: str
    number: int
    digest: str
    parent: str | None = Field(description="the parent's manifest digest")
    kind: str
    base_fingerprint: str
    base_name: str | None
    base_revision: str | None
    created_at: datetime
    pushed_by: str | None
    size: int = Field(description="total bytes of the version's files")
    yanked: str | None = Field(description="the reason, when the version was yanked")
    datasets: list[DatasetOut] = Field(default_factory=list)
    code_commit: str | None = None
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    aliases: list[str] = Field(default_factory=list, description='aliases pointing at it: "ns/name@alias"')
    manifest: dict[str, Any] | None = Field(
        default=None, description="the manifest (root and ancestors only, with manifests=true)"
    )


class LineageEdge(BaseModel):
    parent: str = Field(description="parent manifest digest")
    child: str = Field(description="child manifest digest")


class LineageGraph(BaseModel):
    root: str = Field(description="manifest digest of the version the reference names")
    nodes: list[LineageNode] = Field(description="the root, its ancestors, then descendants breadth-first")
    edges: list[LineageEdge]
    ancestors: list[str] = Field(description="digests from the root's parent up to the first version")
    descendants: list[str] = Field(description="digests of versions stacked on the root, breadth-first")
    truncated: bool = Field(description="the depth or node limit cut the graph short")
