from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query

from deltareg.registry.deps import SessionDep
from deltareg.registry.history.schemas import AliasAt, AliasHistory
from deltareg.registry.history.service import HistoryService

router = APIRouter(prefix="/api/v1/repos/{namespace}/{name}/aliases/{alias}", tags=["aliases"])
MAX_MOVES = 1000


def get_history_service(session: SessionDep) -> HistoryService:
    return HistoryService(session)


HistoryServiceDep = Annotated[HistoryService, Depends(get_history_service)]


@router.get("/history")
def alias_history(
    namespace: str,
    name: str,
    alias: str,
    service: HistoryServiceDep,
    limit: Annotated[int, Query(ge=1, le=MAX_MOVES)] = 100,
) -> AliasHistory:
    """Every move of the alias, newest first: kind, from -> to, reason, actor, time."""
    return service.moves(namespace, name, alias, limit=limit)


@router.get("/at")
def alias_at(
    namespace: str,
    name: str,
    alias: str,
    service: HistoryServiceDep,
    time: Annotated[datetime, Query(description="ISO 8601 with a UTC offset, e.g. 2026-11-29T14:00:00Z")],
) -> AliasAt:
    """The version the alias pointed to at ``time``, and the move that put it there."""
    return service.at(namespace, name, alias, time)
