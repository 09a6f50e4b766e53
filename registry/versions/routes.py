from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Response

from deltareg.client.refs import MAX_VERSION
from deltareg.registry.audit.refusals import RefusalsDep
from deltareg.registry.body import json_body, openapi_body
from deltareg.registry.deps import SessionDep, StoreDep
from deltareg.registry.versions.schemas import (
    CreateVersionRequest,
    RepoDetail,
    RepoList,
    VersionCreated,
    VersionOut,
)
from deltareg.registry.versions.service import VersionService

router = APIRouter(prefix="/api/v1", tags=["versions"])


def get_version_service(session: SessionDep, store: StoreDep) -> VersionService:
    return VersionService(session, store)


VersionServiceDep = Annotated[VersionService, Depends(get_version_service)]
CreateVersionBody = Annotated[
    CreateVersionRequest, Depends(json_body(CreateVersionRequest, lambda s: s.max_manifest_bytes))
]
VersionNumber = Annotated[int, Path(ge=1, le=MAX_VERSION)]


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
) -> VersionCreated:
    """Create a version from a manifest whose blobs are uploaded (the repo is created on first push).

    A new version is appended to the audit log; a refused push is audited as ``push.refused``.
    """
    refusals.watch("push", f"{namespace}/{name}", repo=f"{namespace}/{name}")
    version = service.push(namespace, name, body.manifest, body.evals, actor=refusals.actor)
    if not version.created:
        response.status_code = 200
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
    """Get one version with its manifest."""
    return service.get_version(namespace, name, number)


@router.get("/resolve")
def resolve(ref: Annotated[str, Query(max_length=512)], service: VersionServiceDep) -> VersionOut:
    """Resolve a reference (ns/name, ns/name:N, ns/name@sha256:..., ns/name@alias) to a version."""
    return service.resolve_text(ref)
