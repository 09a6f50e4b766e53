"""The one small interface every blob store implements (filesystem now, S3 later).

Blobs are content-addressed (``sha256:<hex>``) and immutable. A store only ever holds verified bytes:
``receive`` hashes while it writes and publishes the blob under its digest only when the hash matches.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


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


class BlobStore(Protocol):
    def size_of(self, digest: str) -> int | None:
        """The size of the stored blob, or None when the store does not hold it."""
        ...

    def read_range(self, digest: str, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (fewer only at the end of the blob)."""
        ...

    def direct_upload_url(self, digest: str, size: int) -> str | None:
        """A URL the client uploads to directly (presigned), or None to upload through the registry API."""
        ...

    def receive(self, digest: str, chunks: Iterable[bytes]) -> int:
        """Store the streamed bytes as ``digest`` and return their size.

        Raises DigestMismatch (nothing stored) when the bytes hash to something else; any exception
        from ``chunks`` leaves nothing behind either.
        """
        ...

    def locate(self, digest: str) -> BlobLocation | None:
        """Where a client can download the blob from, or None when it is not stored."""
        ...
