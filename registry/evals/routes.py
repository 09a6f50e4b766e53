from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from deltareg.registry.audit.refusals import RefusalsDep
from deltareg.registry.body import RawJsonBody, openapi_body
from deltareg.registry.deps import SessionDep, VersionNumber
from deltareg.registry.evals.schemas import EvalsRecorded, RecordEvalsRequest, parse_record_request
from deltareg.registry.evals.service import EvalService

router = APIRouter(prefix="/api/v1", tags=["evals"])


def get_eval_service(session: SessionDep) -> EvalService:
    return EvalService(session)


EvalServiceDep = Annotated[EvalService, Depends(get_eval_service)]


@router.post(
    "/repos/{namespace}/{name}/versions/{number}/evals",
    status_code=201,
    openapi_extra=openapi_body(RecordEvalsRequest),
)
def record_evals(
    namespace: str,
    name: str,
    number: VersionNumber,
    body: RawJsonBody,
    service: EvalServiceDep,
    refusals: RefusalsDep,
) -> EvalsRecorded:
    """Record scores (1 to 64) on an existing version, yanked ones included; the actor is recorded.

    One ``eval`` entry is appended to the audit log; a refused request (a non-finite value, an unknown
    version, ...) records nothing and is audited as ``eval.refused``.
    """
    refusals.watch("eval", f"{namespace}/{name}:{number}", repo=f"{namespace}/{name}", version=number)
    request = parse_record_request(body)
    return service.record(namespace, name, number, request.evals, actor=refusals.actor)
