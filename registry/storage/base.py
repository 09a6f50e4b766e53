"""The one small interface every blob store implements (a local folder, S3).

Blobs are content-addressed (``sha256:<hex>``) and immutable. A store only ever publishes verified bytes
under a digest: ``receive`` hashes while it writes, and ``complete_upload`` checks a direct upload (bytes
the client sent to the store itself) before publishing it. Anything not yet verified lives in a staging
area that ``clean_staging`` empties.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Protocol

# The parts of a multipart upload are wire types the client owns (the server depends on the client).
from deltareg.client.transfer import CompletedPart as CompletedPart
from deltareg.client.transfer import PartChecksums as PartChecksums
from deltareg.client.transfer import UploadPart as UploadPart


@dataclass(frozen=True)
class LocalFile:
    """The blob is a file this server can stream itself (Range requests included)."""

    path: Path
    size: int


@dataclass(frozen=True)
class RemoteURL:
    """The blob is served by someone else (e.g. a presigned S3 URL); the server redirects there."""

    url: str


BlobLocation = LocalFile | RemoteURL


@dataclass(frozen=True)
class PutUpload:
    """Upload the whole blob with one ``PUT url`` sending ``headers`` (a presigned URL)."""

    url: str
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class MultipartUpload:
    """Upload the blob in parts (any order, in parallel), then complete with every part's ETag."""

    upload_id: str
    part_size: int
    parts: list[UploadPart]


UploadInstructions = PutUpload | MultipartUpload


@dataclass(frozen=True)
class StoredBlob:
    """A published blob as the store lists it; ``modified`` is when it was last written (UTC)."""

    digest: str
    size: int
    modified: datetime | None = None


class BlobStore(Protocol):
    """Where blob bytes live. Calls block (disk or network): run them off the event loop."""

    def size_of(self, digest: str) -> int | None:
        """The size of the stored (verified) blob, or None when the store does not hold it."""
        ...

    def sizes_of(self, digests: Iterable[str]) -> dict[str, int | None]:
        """``size_of`` of each digest (a remote store asks in parallel)."""
        ...

    def read_range(self, digest: str, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (fewer only at the end of the blob).

        Raises MissingBlob when the blob is not stored (garbage collection may remove it meanwhile).
        """
        ...

    def receive(self, digest: str, chunks: Iterable[bytes]) -> int:
        """Store the streamed bytes as ``digest`` and return their size.

        Raises DigestMismatch (nothing stored) when the bytes hash to something else; any exception
        from ``chunks`` leaves nothing behind either.
        """
        ...

    def plan_upload(
        self, digest: str, size: int, proposed: PartChecksums | None = None
    ) -> UploadInstructions | None:
        """How a client uploads ``size`` bytes of ``digest`` directly to the store, or None when it
        uploads through the registry API (``receive``). ``proposed`` is the client's part layout with
        each part's CRC32: a store that checks part checksums uses it (or refuses it with InvalidInput),
        others ignore it."""
        ...

    def complete_upload(
        self, digest: str, upload_id: str | None, parts: list[CompletedPart], *, max_bytes: int
    ) -> int:
        """Verify a direct upload of ``digest`` and publish it; returns its size.

        Raises DigestMismatch (the upload is deleted) when the bytes hash to something else,
        PayloadTooLarge when they are over ``max_bytes``, MissingBlob when nothing was uploaded.
        """
        ...

    def verify_published(self, digest: str, *, max_bytes: int) -> int:
        """The size of the object stored as ``digest``, once it is known to hold exactly those bytes.

        An object can sit at a blob's key before it is verified (S3 multipart uploads complete in place),
        so its mere existence proves nothing. Raises MissingBlob when there is none, Conflict when one is
        still being verified.
        """
        ...

    def abort_upload(self, digest: str, upload_id: str) -> None:
        """Forget an unfinished multipart upload (no error when it is gone already)."""
        ...

    def locate(self, digest: str, *, head: bool = False) -> BlobLocation | None:
        """Where a client can download the blob from (``head``: where to send a HEAD request), or None
        when this store cannot tell it is there.

        A remote store answers with a URL without checking that the object exists (callers check the
        database, which records only verified blobs).
        """
        ...

    def delete(self, digest: str) -> None:
        """Remove a blob (no error when it is not there)."""
        ...

    def iter_blobs(self) -> Iterator[StoredBlob]:
        """Every published blob in the store, in no particular order."""
        ...

    def clean_staging(self, older_than: datetime) -> int:
        """Remove staged uploads (unverified bytes, unfinished multipart uploads) started before
        ``older_than``; returns how many were removed."""
        ...

    def check(self) -> None:
        """Raise ServiceUnavailable naming the problem when the store cannot be used right now."""
        ...
