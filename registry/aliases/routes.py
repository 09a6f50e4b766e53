from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from deltareg.registry.aliases.schemas import (
    AliasList,
    AliasMoved,
    AliasOut,
    MoveAliasRequest,
    RollbackRequest,
)
from deltareg.registry.aliases.service import AliasService
from deltareg.registry.audit.refusals import RefusalsDep
from deltareg.registry.body import json_body, openapi_body
from deltareg.registry.deps import SessionDep

router = APIRouter(prefix="/api/v1/repos/{namespace}/{name}/aliases", tags=["aliases"])


def get_alias_service(session: SessionDep) -> AliasService:
    return AliasService(session)


AliasServiceDep = Annotated[AliasService, Depends(get_alias_service)]
MoveAliasBody = Annotated[MoveAliasRequest, Depends(json_body(MoveAliasRequest, lambda s: s.max_json_bytes))]
RollbackBody = Annotated[RollbackRequest, Depends(json_body(RollbackRequest, lambda s: s.max_json_bytes))]


@router.get("")
def list_aliases(namespace: str, name: str, service: AliasServiceDep) -> AliasList:
    """List the repository's aliases and the versions they point to."""
    return service.list(namespace, name)


@router.get("/{alias}")
def get_alias(namespace: str, name: str, alias: str, service: AliasServiceDep) -> AliasOut:
    """Show one alias and the version it points to."""
    return service.get(namespace, name, alias)


@router.put(
    "/{alias}", openapi_extra=openapi_body(MoveAliasRequest), responses={409: {"description": "stale"}}
)
def move_alias(
    namespace: str,
    name: str,
    alias: str,
    body: MoveAliasBody,
    service: AliasServiceDep,
    refusals: RefusalsDep,
) -> AliasMoved:
    """Compare-and-swap: point the alias at ``version`` if it points at ``expected`` now (null: undefined).

    A stale ``expected`` is 409 ``conflict`` naming the current holder; nothing changes. Every move is
    appended to the alias history in the same transaction.
    """
    refusals.watch(
        "alias.promote", f"{namespace}/{name}@{alias}", repo=f"{namespace}/{name}", to=body.version
    )
    return service.move(namespace, name, alias, body, actor=refusals.actor)


@router.post(
    "/{alias}/rollback",
    openapi_extra=openapi_body(RollbackRequest),
    responses={409: {"description": "stale, or no previous holder"}},
)
def rollback_alias(
    namespace: str,
    name: str,
    alias: str,
    body: RollbackBody,
    service: AliasServiceDep,
    refusals: RefusalsDep,
) -> AliasMoved:
    """Move the alias back to its previous holder that is not yanked, or to ``to`` (a former holder).

    Repeated rollbacks keep going back through the promotions (they never return to a version a
    rollback left). Compare-and-swap from the holder read in the same transaction (or ``expected``): a
    concurrent move makes it 409 ``conflict``. The alias's policy is not applied (the version held the
    alias before). Recorded as a ``rollback`` move and audited as ``alias.rollback``.
    """
    refusals.watch("alias.rollback", f"{namespace}/{name}@{alias}", repo=f"{namespace}/{name}", to=body.to)
    return service.rollback(namespace, name, alias, body, actor=refusals.actor)
