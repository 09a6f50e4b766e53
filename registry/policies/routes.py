from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Response

from deltareg.registry.audit.refusals import RefusalsDep
from deltareg.registry.body import json_body, openapi_body
from deltareg.registry.deps import SessionDep, VersionNumber
from deltareg.registry.policies.schemas import (
    ApprovalCreated,
    ApprovalList,
    ApproveRequest,
    Policy,
    PolicyList,
    PolicyOut,
)
from deltareg.registry.policies.service import PolicyService

router = APIRouter(prefix="/api/v1/repos/{namespace}/{name}", tags=["policies"])


def get_policy_service(session: SessionDep) -> PolicyService:
    return PolicyService(session)


PolicyServiceDep = Annotated[PolicyService, Depends(get_policy_service)]
PolicyBody = Annotated[Policy, Depends(json_body(Policy, lambda s: s.max_json_bytes))]
ApproveBody = Annotated[ApproveRequest, Depends(json_body(ApproveRequest, lambda s: s.max_json_bytes))]


@router.put("/aliases/{alias}/policy", openapi_extra=openapi_body(Policy))
def set_policy(
    namespace: str, name: str, alias: str, body: PolicyBody, service: PolicyServiceDep, refusals: RefusalsDep
) -> PolicyOut:
    """Set (or replace) the promotion policy of an alias; the repo must exist, the alias need not.

    Every later move of the alias (``PUT .../aliases/{alias}``) must pass every rule, or it is refused
    (403 ``policy_violation`` listing each failed rule). Audited as ``policy.set`` with the old and new
    policy.
    """
    refusals.watch("policy.set", f"{namespace}/{name}@{alias}", repo=f"{namespace}/{name}")
    return service.set(namespace, name, alias, body, actor=refusals.actor)


@router.get("/aliases/{alias}/policy")
def get_policy(namespace: str, name: str, alias: str, service: PolicyServiceDep) -> PolicyOut:
    """The promotion policy of an alias (404 if it has none)."""
    return service.get(namespace, name, alias)


@router.delete("/aliases/{alias}/policy")
def delete_policy(
    namespace: str, name: str, alias: str, service: PolicyServiceDep, refusals: RefusalsDep
) -> PolicyOut:
    """Remove the promotion policy of an alias (404 if it has none); returns the removed policy.

    Audited as ``policy.delete``.
    """
    refusals.watch("policy.delete", f"{namespace}/{name}@{alias}", repo=f"{namespace}/{name}")
    return service.delete(namespace, name, alias, actor=refusals.actor)


@router.get("/policies")
def list_policies(namespace: str, name: str, service: PolicyServiceDep) -> PolicyList:
    """Every promotion policy of the repo, by alias."""
    return service.list(namespace, name)


@router.post(
    "/versions/{number}/approvals",
    status_code=201,
    openapi_extra=openapi_body(ApproveRequest),
    responses={200: {"model": ApprovalCreated, "description": "this actor had already approved"}},
)
def approve(
    namespace: str,
    name: str,
    number: VersionNumber,
    body: ApproveBody,
    response: Response,
    service: PolicyServiceDep,
    refusals: RefusalsDep,
) -> ApprovalCreated:
    """The actor (``X-Deltareg-Actor``) approves moving ``alias`` to this version.

    403 ``permission_denied`` for the version's pusher and for an anonymous actor; 410 for a yanked
    version. Approving again is idempotent (200, ``created`` false, nothing audited). Audited as
    ``approve``.
    """
    refusals.watch("approve", f"{namespace}/{name}:{number}", repo=f"{namespace}/{name}", alias=body.alias)
    approval = service.approve(namespace, name, number, body, actor=refusals.actor)
    if not approval.created:
        response.status_code = 200
    return approval


@router.get("/versions/{number}/approvals")
def list_approvals(
    namespace: str,
    name: str,
    number: VersionNumber,
    service: PolicyServiceDep,
    alias: Annotated[str | None, Query(max_length=64)] = None,
) -> ApprovalList:
    """The approvals of a version (of one alias, if given), oldest first."""
    return service.list_approvals(namespace, name, number, alias)
