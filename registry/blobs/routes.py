from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Annotated

import anyio.from_thread
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import FileResponse, RedirectResponse

from deltareg.client.errors import InvalidInput
from deltareg.registry.blobs.schemas import (
    BlobStored,
    CompleteRequest,
    DownloadPlan,
    DownloadRequest,
    UploadPlan,
    UploadRequest,
)
from deltareg.registry.blobs.service import BlobService
from deltareg.registry.body import json_body, openapi_body
from deltareg.registry.deps import SessionDep, SettingsDep, StoreDep
from deltareg.registry.observability.metrics import CommitCountsDep
from deltareg.registry.storage import LocalFile

# Every route is sync: FastAPI runs it in its thread pool, so blocking store calls (disk, boto3) never
# run on the event loop.
router = APIRouter(prefix="/api/v1/blobs", tags=["blobs"])


def get_blob_service(session: SessionDep, store: StoreDep, settings: SettingsDep) -> BlobService:
    return BlobService(session, store, settings)


BlobServiceDep = Annotated[BlobService, Depends(get_blob_service)]
UploadRequestBody = Annotated[UploadRequest, Depends(json_body(UploadRequest, lambda s: s.max_json_bytes))]
CompleteRequestBody = Annotated[
    CompleteRequest, Depends(json_body(CompleteRequest, lambda s: s.max_json_bytes))
]
DownloadRequestBody = Annotated[
    DownloadRequest, Depends(json_body(DownloadRequest, lambda s: s.max_json_bytes))
]


@router.post("/uploads", openapi_extra=openapi_body(UploadRequest))
def plan_uploads(body: UploadRequestBody, service: BlobServiceDep) -> UploadPlan:
    """Report which blobs are present and how to upload the missing ones (one PUT, or multipart)."""
    return UploadPlan(blobs=service.plan_uploads(body.blobs))


@router.post("/downloads", openapi_extra=openapi_body(DownloadRequest))
def plan_downloads(
    body: DownloadRequestBody, service: BlobServiceDep, counts: CommitCountsDep
) -> DownloadPlan:
    """Where to download each blob from (Range requests supported there)."""
    targets = service.download_targets(body.digests)
    counts.on_commit(lambda metrics: metrics.planned_downloads([target.size for target in targets]))
    return DownloadPlan(blobs=targets)


@router.post("/{digest}/complete", openapi_extra=openapi_body(CompleteRequest))
def complete_upload(
    digest: str, body: CompleteRequestBody, service: BlobServiceDep, counts: CommitCountsDep
) -> BlobStored:
    """Finish a direct upload: the server checks the bytes' sha256 and size, then records the blob."""
    stored = service.complete(digest, body)
    if stored.created:
        counts.on_commit(lambda metrics: metrics.uploaded(stored.size))
    return stored


@router.put("/{digest}", status_code=201, responses={200: {"model": BlobStored}})
def upload_blob(
    digest: str, request: Request, response: Response, service: BlobServiceDep, counts: CommitCountsDep
) -> BlobStored:
    """Upload a blob's raw bytes (application/octet-stream); stored only if they hash to the digest."""
    stored = service.upload(digest, _body_chunks(request), declared_size=_content_length(request))
    if not stored.created:
        response.status_code = 200
    else:
        counts.on_commit(lambda metrics: metrics.uploaded(stored.size))
    return stored


@router.get("/{digest}", response_class=Response)
@router.head("/{digest}", response_class=Response)
def download_blob(digest: str, request: Request, service: BlobServiceDep) -> Response:
    """Download a blob (Range requests supported); with S3, a redirect to a presigned URL."""
    location = service.locate(digest, head=request.method == "HEAD")
    if isinstance(location, LocalFile):
        return FileResponse(location.path, media_type="application/octet-stream")
    return RedirectResponse(location.url, status_code=307)


def _content_length(request: Request) -> int | None:
    value = request.headers.get("content-length")
    if value is None:
        return None
    if not (value.isascii() and value.isdigit()):
        raise InvalidInput(f"invalid Content-Length header {value!r}")
    return int(value)


def _body_chunks(request: Request) -> Iterator[bytes]:
    """The request body as a blocking iterator, for this sync route running in a worker thread.

    Each chunk is fetched on the event loop; hashing and disk writes stay in the worker thread.
    """
    stream: AsyncIterator[bytes] = request.stream()

    async def next_chunk() -> bytes | None:
        return await anext(stream, None)

    while (chunk := anyio.from_thread.run(next_chunk)) is not None:
        if chunk:
            yield chunk
