from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response

from deltareg.client.refs import Reference
from deltareg.registry.audit.refusals import RefusalsDep
from deltareg.registry.body import json_body, openapi_body
from deltareg.registry.deps import SessionDep, StoreDep, VersionNumber
from deltareg.registry.observability.metrics import CommitCountsDep
from deltareg.registry.versions.reads import VersionReads
from deltareg.registry.versions.schemas import (
    CreateVersionRequest,
    RepoDetail,
    RepoList,
    VersionCreated,
    VersionOut,
    YankRequest,
    YankResult,
)
from deltareg.registry.versions.service import VersionService

router = APIRouter(prefix="/api/v1", tags=["versions"])


async def get_version_service(session: SessionDep, store: StoreDep) -> VersionService:
    # async: it only builds objects, so it needs no hop to the thread pool (see deltareg.registry.deps)
    return VersionService(session, store)


VersionServiceDep = Annotated[VersionService, Depends(get_version_service)]
CreateVersionBody = Annotated[
    CreateVersionRequest, Depends(json_body(CreateVersionRequest, lambda s: s.max_manifest_bytes))
]
YankBody = Annotated[YankRequest, Depends(json_body(YankRequest, lambda s: s.max_json_bytes))]


@router.post(
    "/repos/{namespace}/{name}/versions",
    status_code=201,
    responses={200: {"model": VersionCreated, "description": "this manifest was already a version"}},
    openapi_extra=openapi_body(CreateVersionRequest),
)
def push_version(
    namespace: str,
    name: str,
    body: CreateVersionBody,
    response: Response,
    service: VersionServiceDep,
    refusals: RefusalsDep,
    counts: CommitCountsDep,
) -> VersionCreated:
    """Create a version from a manifest whose blobs are uploaded (the repo is created on first push).

    A new version is appended to the audit log; a refused push is audited as ``push.refused``.
    """
    refusals.watch("push", f"{namespace}/{name}", repo=f"{namespace}/{name}")
    version = service.push(namespace, name, body.manifest, body.evals, actor=refusals.actor)
    if not version.created:
        response.status_code = 200
    else:
        counts.on_commit(lambda metrics: metrics.pushes.inc())
    return version


@router.get("/repos")
def list_repos(service: VersionServiceDep, namespace: Annotated[str | None, Query()] = None) -> RepoList:
    """List repositories, optionally of one namespace."""
    return service.list_repos(namespace)


@router.get("/repos/{namespace}/{name}")
def show_repo(namespace: str, name: str, service: VersionServiceDep) -> RepoDetail:
    """Show a repository and its versions, newest first."""
    return service.show_repo(namespace, name)


@router.get("/repos/{namespace}/{name}/versions/{number}")
def get_version(namespace: str, name: str, number: VersionNumber, service: VersionServiceDep) -> VersionOut:
    """Get one version with its manifest; a yanked one too (with ``yanked``: reason, who, when)."""
    return service.get_version(namespace, name, number)


async def get_version_reads(request: Request) -> VersionReads:
    reads: VersionReads = request.app.state.version_reads
    return reads


@router.get("/resolve", response_model=VersionOut)
async def resolve(
    ref: Annotated[str, Query(max_length=512)],
    reads: Annotated[VersionReads, Depends(get_version_reads)],
    allow_yanked: Annotated[
        bool, Query(description="resolve a yanked version too; only with ns/name:N or ns/name@sha256:...")
    ] = False,
) -> Response:
    """Resolve a reference (ns/name, ns/name:N, ns/name@sha256:..., ns/name@alias) to a version.

    ``ns/name`` is the newest version that is not yanked. A yanked version named exactly is 410
    ``version_yanked`` (the message gives the reason) unless ``allow_yanked=true``.
    """
    # async, one query and an already rendered body in the common case (deltareg.registry.versions.reads)
    body = await reads.resolve_json(Reference.parse(ref), allow_yanked=allow_yanked)
    return Response(body, media_type="application/json")


@router.post(
    "/repos/{namespace}/{name}/versions/{number}/yank",
    openapi_extra=openapi_body(YankRequest),
    responses={409: {"description": "already yanked, or an alias points to it (pass rollback)"}},
)
def yank_version(
    namespace: str,
    name: str,
    number: VersionNumber,
    body: YankBody,
    service: VersionServiceDep,
    refusals: RefusalsDep,
) -> YankResult:
    """Yank a version: it stays readable here, but no alias may point to it and pulls refuse it.

    If aliases point to it: 409 naming them, unless ``rollback`` is true, which rolls each back to its
    previous holder that is not yanked (refusing the whole yank if one has none). Audited as ``yank``
    (and ``alias.rollback`` for each alias moved).
    """
    refusals.watch("yank", f"{namespace}/{name}:{number}", repo=f"{namespace}/{name}", rollback=body.rollback)
    return service.yank(namespace, name, number, body, actor=refusals.actor)
