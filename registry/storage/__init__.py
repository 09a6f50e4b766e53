"""Blob storage behind one interface; ``open_store`` picks the implementation from a URL."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

from deltareg.registry.config import Settings
from deltareg.registry.storage.base import (
    BlobLocation,
    BlobStore,
    CompletedPart,
    LocalFile,
    MultipartUpload,
    PartChecksums,
    PutUpload,
    RemoteURL,
    StoredBlob,
    UploadInstructions,
    UploadPart,
)
from deltareg.registry.storage.filesystem import FilesystemBlobStore

__all__ = [
    "BlobLocation",
    "BlobStore",
    "CompletedPart",
    "PartChecksums",
    "FilesystemBlobStore",
    "LocalFile",
    "MultipartUpload",
    "PutUpload",
    "RemoteURL",
    "StoredBlob",
    "UnsupportedStorageURL",
    "UploadInstructions",
    "UploadPart",
    "open_store",
]


class UnsupportedStorageURL(ValueError):
    """DELTAREG_STORAGE_URL names a store this version cannot use (a startup error)."""


def open_store(url: str, settings: Settings | None = None) -> BlobStore:
    """The blob store for ``url``: ``file:///folder`` or ``s3://bucket/prefix``.

    For S3 the boto3 client is built here (no network traffic yet), configured by ``settings``
    (default: from DELTAREG_* variables): endpoint, region, presigning and multipart sizes.
    """
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        # Imported here: boto3 is slow to import and the embedded default never needs it.
        from deltareg.registry.storage.s3 import S3BlobStore, UnsupportedS3URL

        try:
            return S3BlobStore.from_settings(url, settings or Settings())
        except UnsupportedS3URL as exc:
            raise UnsupportedStorageURL(str(exc)) from None
    if parsed.scheme != "file":
        raise UnsupportedStorageURL(
            f"DELTAREG_STORAGE_URL={url!r}: unsupported storage scheme {parsed.scheme or '(none)'!r}; "
            "use file:///absolute/folder or s3://bucket/prefix"
        )
    if parsed.netloc not in ("", "localhost"):
        raise UnsupportedStorageURL(f"DELTAREG_STORAGE_URL={url!r}: a file:// URL must name a local folder")
    return FilesystemBlobStore(Path(unquote(parsed.path)))
