from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from deltareg.registry.deps import SessionDep
from deltareg.registry.search.schemas import DEFAULT_PAGE, MAX_PAGE, VersionSearch
from deltareg.registry.search.service import SearchService

router = APIRouter(prefix="/api/v1", tags=["search"])


def get_search_service(session: SessionDep) -> SearchService:
    return SearchService(session)


SearchServiceDep = Annotated[SearchService, Depends(get_search_service)]


@router.get("/versions")
def search_versions(
    service: SearchServiceDep,
    repo: Annotated[str | None, Query(max_length=129, description="namespace/name")] = None,
    namespace: Annotated[str | None, Query(max_length=64)] = None,
    base: Annotated[str | None, Query(max_length=69, description="a tmv1: base fingerprint")] = None,
    where: Annotated[
        list[str] | None,
        Query(
            description="repeatable: METRIC OP NUMBER with OP one of >=, <=, >, <, = (accuracy>=0.8); the "
            "version's newest score of the metric (on `dataset`, if given) must satisfy it"
        ),
    ] = None,
    dataset: Annotated[
        str | None, Query(max_length=256, description="versions with a score on it; scopes `where` to it")
    ] = None,
    alias: Annotated[
        str | None, Query(max_length=64, description="versions an alias of this name points to")
    ] = None,
    include_yanked: Annotated[bool, Query()] = False,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = DEFAULT_PAGE,
    cursor: Annotated[
        str | None, Query(max_length=32, description="next_cursor of the previous page")
    ] = None,
) -> VersionSearch:
    """Search versions across repositories; every filter given must hold. Newest first, a page at a time.

    A bad filter (a malformed `where`, fingerprint, name or cursor) is 400 naming it.
    """
    return service.search(
        repo=repo,
        namespace=namespace,
        base=base,
        where=where,
        dataset=dataset,
        alias=alias,
        include_yanked=include_yanked,
        limit=limit,
        cursor=cursor,
    )
