"""Blob storage behind one interface; ``open_store`` picks the implementation from a URL."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

from deltareg.registry.storage.base import BlobLocation, BlobStore, LocalFile, RemoteURL
from deltareg.registry.storage.filesystem import FilesystemBlobStore

__all__ = ["BlobLocation", "BlobStore", "FilesystemBlobStore", "LocalFile", "RemoteURL", "open_store"]


class UnsupportedStorageURL(ValueError):
    """DELTAREG_STORAGE_URL names a store this version cannot use (a startup error)."""


def open_store(url: str) -> BlobStore:
    """The blob store for ``url``; only ``file://`` folders are supported for now."""
    parsed = urlparse(url)
    if parsed.scheme != "file":
        raise UnsupportedStorageURL(
            f"DELTAREG_STORAGE_URL={url!r}: unsupported storage scheme {parsed.scheme or '(none)'!r}; "
            "this version supports only file:///absolute/folder"
        )
    if parsed.netloc not in ("", "localhost"):
        raise UnsupportedStorageURL(f"DELTAREG_STORAGE_URL={url!r}: a file:// URL must name a local folder")
    return FilesystemBlobStore(Path(unquote(parsed.path)))
