"""Blob store in a local folder: ``<root>/sha256/<first 2 hex>/<hex>``."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from deltareg.client.errors import DigestMismatch
from deltareg.client.refs import DIGEST
from deltareg.registry.storage.base import BlobLocation, LocalFile

TMP_DIR = "tmp"


class FilesystemBlobStore:
    """Verified blobs in a folder; uploads are staged in ``<root>/tmp`` and renamed into place."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "sha256").mkdir(parents=True, exist_ok=True)
        # Staging lives under the root so the final rename never crosses a filesystem.
        (root / TMP_DIR).mkdir(exist_ok=True)

    def path_of(self, digest: str) -> Path:
        # Callers validate digests; this check keeps a bad one from ever becoming a path.
        if not DIGEST.fullmatch(digest):
            raise ValueError(f"not a blob digest: {digest!r}")
        hex_digest = digest.removeprefix("sha256:")
        return self.root / "sha256" / hex_digest[:2] / hex_digest

    def size_of(self, digest: str) -> int | None:
        try:
            return self.path_of(digest).stat().st_size
        except FileNotFoundError:
            return None

    def read_range(self, digest: str, offset: int, length: int) -> bytes:
        with self.path_of(digest).open("rb") as handle:
            return os.pread(handle.fileno(), length, offset)

    def direct_upload_url(self, digest: str, size: int) -> str | None:
        return None

    def receive(self, digest: str, chunks: Iterable[bytes]) -> int:
        fd, tmp_name = tempfile.mkstemp(prefix="upload-", dir=self.root / TMP_DIR)
        tmp_path = Path(tmp_name)
        try:
            size, actual = _write_hashed(fd, chunks)
            if actual != digest:
                raise DigestMismatch(f"uploaded bytes hash to {actual}, not {digest}")
            final = self.path_of(digest)
            final.parent.mkdir(parents=True, exist_ok=True)
            # Atomic: readers see the whole blob or none. A concurrent upload of the same digest
            # replaces identical bytes.
            os.replace(tmp_path, final)
            return size
        finally:
            tmp_path.unlink(missing_ok=True)

    def locate(self, digest: str) -> BlobLocation | None:
        size = self.size_of(digest)
        return None if size is None else LocalFile(self.path_of(digest), size)


def _write_hashed(fd: int, chunks: Iterable[bytes]) -> tuple[int, str]:
    """Write every chunk to ``fd`` (closing it) and return (size, ``sha256:<hex>``)."""
    hasher = hashlib.sha256()
    size = 0
    with os.fdopen(fd, "wb") as handle:
        for chunk in chunks:
            hasher.update(chunk)
            handle.write(chunk)
            size += len(chunk)
        handle.flush()
        os.fsync(handle.fileno())
    return size, "sha256:" + hasher.hexdigest()
