"""Blob rules: which blobs a client must upload and where, accepting an upload only when it verifies,
and where to download from."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from sqlalchemy.orm import Session

from deltareg.client.errors import BlobNotFound, InvalidInput, PayloadTooLarge
from deltareg.client.refs import DIGEST
from deltareg.registry.blobs.repository import BlobRepository
from deltareg.registry.blobs.schemas import (
    BlobRef,
    BlobStored,
    CompleteRequest,
    DownloadTarget,
    MultipartInstructions,
    PartTarget,
    PutInstructions,
    UploadTarget,
)
from deltareg.registry.config import Settings
from deltareg.registry.storage import (
    BlobLocation,
    BlobStore,
    CompletedPart,
    LocalFile,
    MultipartUpload,
    PartChecksums,
    PutUpload,
    RemoteURL,
)

# Where a client uploads (and downloads) through the registry API, relative to its base URL.
API_BLOB_PATH = "/api/v1/blobs/{digest}"


def check_digest(digest: str) -> str:
    if not DIGEST.fullmatch(digest):
        raise InvalidInput(
            f"invalid blob digest {digest!r}: expected 'sha256:' followed by 64 lower-case hex"
        )
    return digest


class BlobService:
    """Store work (hashing, network) happens before the first database statement of a request, so the
    transaction (and SQLite's write lock) is held only for the short bookkeeping at the end."""

    def __init__(self, session: Session, store: BlobStore, settings: Settings) -> None:
        self.blobs = BlobRepository(session)
        self.store = store
        self.max_blob_bytes = settings.max_blob_bytes

    def plan_uploads(self, refs: list[BlobRef]) -> list[UploadTarget]:
        """For each blob: is it present with that size (then it is marked in use), and if not, how to
        upload it."""
        stored = self.store.sizes_of(ref.digest for ref in refs)
        recorded = self.blobs.mark_in_use(ref.digest for ref in refs)
        targets = []
        for ref in refs:
            present = recorded.get(ref.digest) == ref.size and stored[ref.digest] == ref.size
            targets.append(self._target(ref, present))
        return targets

    def _check_size(self, ref: BlobRef) -> None:
        if ref.size > self.max_blob_bytes:
            raise PayloadTooLarge(
                f"blob {ref.digest} is {ref.size} bytes, over the limit of {self.max_blob_bytes} bytes"
            )

    def _target(self, ref: BlobRef, present: bool) -> UploadTarget:
        if present:
            return UploadTarget(digest=ref.digest, size=ref.size, present=True, upload_url=None, upload=None)
        self._check_size(ref)
        proposed = None if ref.parts is None else PartChecksums(ref.parts.part_size, tuple(ref.parts.crc32))
        planned = self.store.plan_upload(ref.digest, ref.size, proposed)
        if isinstance(planned, MultipartUpload):
            parts = [
                PartTarget(
                    number=p.number,
                    url=p.url,
                    offset=p.offset,
                    size=p.size,
                    headers=dict(p.headers),
                    checksum_crc32=p.checksum_crc32,
                )
                for p in planned.parts
            ]
            multipart = MultipartInstructions(
                upload_id=planned.upload_id, part_size=planned.part_size, parts=parts
            )
            return UploadTarget(
                digest=ref.digest, size=ref.size, present=False, upload_url=None, upload=multipart
            )
        put = planned or PutUpload(API_BLOB_PATH.format(digest=ref.digest), {})
        instructions = PutInstructions(url=put.url, headers=put.headers)
        return UploadTarget(
            digest=ref.digest, size=ref.size, present=False, upload_url=put.url, upload=instructions
        )

    def upload(self, digest: str, chunks: Iterable[bytes], *, declared_size: int | None) -> BlobStored:
        """Store streamed bytes under ``digest`` once they hash to it; a present blob is not stored again."""
        check_digest(digest)
        if declared_size is not None and declared_size > self.max_blob_bytes:
            raise PayloadTooLarge(
                f"blob of {declared_size} bytes is over the limit of {self.max_blob_bytes} bytes"
            )
        limited = _limited(chunks, self.max_blob_bytes, declared_size)
        if self.store.size_of(digest) is not None:
            # Read the body anyway, so the client gets this answer rather than a reset connection.
            for _ in limited:
                pass
            existing = self.store.verify_published(digest, max_bytes=self.max_blob_bytes)
            self.blobs.ensure(digest, existing)
            return BlobStored(digest=digest, size=existing, created=False)
        size = self.store.receive(digest, limited)
        self.blobs.ensure(digest, size)
        return BlobStored(digest=digest, size=size, created=True)

    def complete(self, digest: str, request: CompleteRequest) -> BlobStored:
        """Verify a direct upload and record the blob; a blob already published is a no-op (created false)."""
        check_digest(digest)
        if self.store.size_of(digest) is not None:
            # The key is taken, so this upload cannot complete: forget it. Then check the object there
            # rather than trust it, since it may still be unverified.
            if request.upload_id is not None:
                self.store.abort_upload(digest, request.upload_id)
            existing = self.store.verify_published(digest, max_bytes=self.max_blob_bytes)
            created = self.blobs.ensure(digest, existing)
            return BlobStored(digest=digest, size=existing, created=created)
        parts = [CompletedPart(p.number, p.etag, p.checksum_crc32) for p in request.parts]
        size = self.store.complete_upload(digest, request.upload_id, parts, max_bytes=self.max_blob_bytes)
        self.blobs.ensure(digest, size)
        return BlobStored(digest=digest, size=size, created=True)

    def download_targets(self, digests: list[str]) -> list[DownloadTarget]:
        """Where to download each recorded blob from; BlobNotFound names the first one not recorded."""
        recorded = self.blobs.get_many(digests)
        missing = [digest for digest in digests if digest not in recorded]
        if missing:
            raise BlobNotFound(f"blob {missing[0]} is not in the registry")
        return [
            DownloadTarget(digest=digest, size=recorded[digest].size, url=self._download_url(digest))
            for digest in digests
        ]

    def _download_url(self, digest: str) -> str:
        location = self.store.locate(digest)
        if isinstance(location, RemoteURL):
            return location.url
        return API_BLOB_PATH.format(digest=digest)

    def locate(self, digest: str, *, head: bool = False) -> BlobLocation:
        """Where to download a recorded blob from (a local file, or a URL to redirect to)."""
        check_digest(digest)
        location = self.store.locate(digest, head=head)
        if isinstance(location, LocalFile):
            return location  # the file itself says it is there
        if location is None or self.blobs.get(digest) is None:
            raise BlobNotFound(f"blob {digest} is not in the registry")
        return location


def _limited(chunks: Iterable[bytes], max_bytes: int, declared_size: int | None) -> Iterator[bytes]:
    """Pass chunks through, stopping at ``max_bytes``; check the total against Content-Length."""
    total = 0
    for chunk in chunks:
        total += len(chunk)
        if total > max_bytes:
            raise PayloadTooLarge(f"blob is over the limit of {max_bytes} bytes")
        yield chunk
    if declared_size is not None and total != declared_size:
        raise InvalidInput(f"request body has {total} bytes but Content-Length said {declared_size}")
