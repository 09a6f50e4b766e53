from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from deltareg.registry.deps import SessionDep
from deltareg.registry.lineage.schemas import LineageGraph
from deltareg.registry.lineage.service import DEFAULT_DEPTH, MAX_DEPTH, LineageService

router = APIRouter(prefix="/api/v1", tags=["lineage"])


def get_lineage_service(session: SessionDep) -> LineageService:
    return LineageService(session)


LineageServiceDep = Annotated[LineageService, Depends(get_lineage_service)]


@router.get("/lineage")
def lineage(
    ref: Annotated[str, Query(max_length=512)],
    service: LineageServiceDep,
    depth: Annotated[int, Query(ge=0, le=MAX_DEPTH)] = DEFAULT_DEPTH,
    manifests: Annotated[bool, Query()] = False,
) -> LineageGraph:
    """The lineage graph of a version: the root, its ancestors (nearest first) and its descendants
    (breadth-first, at most ``depth`` levels and 500 versions; ``truncated`` says when cut), with the
    aliases pointing into it and each version's training metadata. ``manifests=true`` adds the manifests
    of the root and its ancestors (what a client needs to apply the chain). Unknown reference: 404."""
    return service.graph(ref, depth=depth, manifests=manifests)
