from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from deltareg.registry.audit.schemas import AuditList, AuditVerification
from deltareg.registry.audit.service import AuditService
from deltareg.registry.deps import SessionDep

router = APIRouter(prefix="/api/v1/audit", tags=["audit"])
MAX_PAGE = 1000
MAX_ID = 2**31 - 1  # ids are INTEGER: PostgreSQL refuses a larger before_id with a 500


def get_audit_service(session: SessionDep) -> AuditService:
    return AuditService(session)


AuditServiceDep = Annotated[AuditService, Depends(get_audit_service)]


@router.get("")
def list_audit(
    service: AuditServiceDep,
    repo: Annotated[str | None, Query(max_length=129, description="namespace/name")] = None,
    before_id: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
) -> AuditList:
    """The audit log, newest first (of one repo if given), a page at a time."""
    return service.list(repo, before_id=before_id, limit=limit)


@router.get("/verify")
def verify_audit(service: AuditServiceDep) -> AuditVerification:
    """Recompute the hash chain from the first entry; name the first entry that does not match."""
    return service.verify()
