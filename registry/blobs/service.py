"""Blob rules: which blobs a client must upload, and accepting an upload only when it verifies."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from sqlalchemy.orm import Session

from deltareg.client.errors import BlobNotFound, InvalidInput, PayloadTooLarge
from deltareg.client.refs import DIGEST
from deltareg.registry.blobs.repository import BlobRepository
from deltareg.registry.blobs.schemas import BlobRef, BlobStored, UploadTarget
from deltareg.registry.config import Settings
from deltareg.registry.storage import BlobLocation, BlobStore

# Where a client uploads when the store has no direct upload URL (see BlobStore.direct_upload_url).
API_UPLOAD_PATH = "/api/v1/blobs/{digest}"


def check_digest(digest: str) -> str:
    if not DIGEST.fullmatch(digest):
        raise InvalidInput(
            f"invalid blob digest {digest!r}: expected 'sha256:' followed by 64 lower-case hex"
        )
    return digest


class BlobService:
    def __init__(self, session: Session, store: BlobStore, settings: Settings) -> None:
        self.blobs = BlobRepository(session)
        self.store = store
        self.max_blob_bytes = settings.max_blob_bytes

    def plan_uploads(self, refs: list[BlobRef]) -> list[UploadTarget]:
        """For each blob: is it present with that size, and if not, where to upload it."""
        recorded = self.blobs.get_many(ref.digest for ref in refs)
        targets = []
        for ref in refs:
            row = recorded.get(ref.digest)
            present = row is not None and row.size == ref.size and self.store.size_of(ref.digest) == ref.size
            url = None if present else self._upload_url(ref)
            targets.append(UploadTarget(digest=ref.digest, size=ref.size, present=present, upload_url=url))
        return targets

    def _upload_url(self, ref: BlobRef) -> str:
        if ref.size > self.max_blob_bytes:
            raise PayloadTooLarge(
                f"blob {ref.digest} is {ref.size} bytes, over the limit of {self.max_blob_bytes} bytes"
            )
        direct = self.store.direct_upload_url(ref.digest, ref.size)
        return direct if direct is not None else API_UPLOAD_PATH.format(digest=ref.digest)

    def upload(self, digest: str, chunks: Iterable[bytes], *, declared_size: int | None) -> BlobStored:
        """Store streamed bytes under ``digest`` once they hash to it; a present blob is not stored again."""
        check_digest(digest)
        if declared_size is not None and declared_size > self.max_blob_bytes:
            raise PayloadTooLarge(
                f"blob of {declared_size} bytes is over the limit of {self.max_blob_bytes} bytes"
            )
        limited = _limited(chunks, self.max_blob_bytes, declared_size)
        existing = self.store.size_of(digest)
        if existing is not None:
            # Read the body anyway, so the client gets this answer rather than a reset connection.
            for _ in limited:
                pass
            self.blobs.ensure(digest, existing)
            return BlobStored(digest=digest, size=existing, created=False)
        size = self.store.receive(digest, limited)
        self.blobs.ensure(digest, size)
        return BlobStored(digest=digest, size=size, created=True)

    def locate(self, digest: str) -> BlobLocation:
        """Where to download a blob from."""
        location = self.store.locate(check_digest(digest))
        if location is None:
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
