from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response

from deltareg.registry.audit.refusals import RefusalsDep
from deltareg.registry.body import RawJsonBody, openapi_body
from deltareg.registry.deps import SessionDep, VersionNumber
from deltareg.registry.results.schemas import (
    RecordResultRequest,
    ResultList,
    ResultRecorded,
    parse_record_request,
)
from deltareg.registry.results.service import ResultService

router = APIRouter(prefix="/api/v1/repos/{namespace}/{name}/versions/{number}", tags=["results"])

DTYPE_SHOWN = 32  # of a refused dtype, in the audit entry (the path may hold anything)


def get_result_service(session: SessionDep) -> ResultService:
    return ResultService(session)


ResultServiceDep = Annotated[ResultService, Depends(get_result_service)]


@router.put(
    "/results/{base_dtype}",
    status_code=201,
    openapi_extra=openapi_body(RecordResultRequest),
    responses={200: {"model": ResultRecorded, "description": "the same fingerprint was recorded before"}},
)
def record_result(
    namespace: str,
    name: str,
    number: VersionNumber,
    base_dtype: str,
    body: RawJsonBody,
    response: Response,
    service: ResultServiceDep,
    refusals: RefusalsDep,
) -> ResultRecorded:
    """Record the fingerprint of the model this version yields on a ``base_dtype`` base (BF16, F16,
    F32, F64); yanked versions included, the actor recorded.

    Results are immutable: the same fingerprint again is 200 with the first record (nothing audited); a
    different one is 409 ``conflict``. Audited as ``result.record``; a refused request records nothing
    and is audited as ``result.record.refused``.
    """
    refusals.watch(
        "result.record",
        f"{namespace}/{name}:{number}",
        repo=f"{namespace}/{name}",
        version=number,
        dtype=base_dtype[:DTYPE_SHOWN],
    )
    fingerprint = parse_record_request(body)
    refusals.details["fingerprint"] = fingerprint  # a conflict's refusal names what was refused
    recorded = service.record(namespace, name, number, base_dtype, fingerprint, actor=refusals.actor)
    if not recorded.created:
        response.status_code = 200
    return recorded


@router.get("/results")
def list_results(namespace: str, name: str, number: VersionNumber, service: ResultServiceDep) -> ResultList:
    """The recorded result fingerprints of a version, one per base dtype, by dtype."""
    return service.list(namespace, name, number)
