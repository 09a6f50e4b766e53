"""Blob store in a local folder: ``<root>/sha256/<first 2 hex>/<hex>``."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from deltareg.client.errors import DigestMismatch, InvalidInput, MissingBlob, ServiceUnavailable
from deltareg.client.refs import DIGEST
from deltareg.registry.storage.base import (
    BlobLocation,
    CompletedPart,
    LocalFile,
    PartChecksums,
    StoredBlob,
    UploadInstructions,
)

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

    def sizes_of(self, digests: Iterable[str]) -> dict[str, int | None]:
        return {digest: self.size_of(digest) for digest in digests}

    def read_range(self, digest: str, offset: int, length: int) -> bytes:
        try:
            with self.path_of(digest).open("rb") as handle:
                return os.pread(handle.fileno(), length, offset)
        except FileNotFoundError:
            # Removed since the caller checked (garbage collection): the client uploads it again.
            raise MissingBlob(f"blob {digest} is no longer in the store; upload it again") from None

    def plan_upload(
        self, digest: str, size: int, proposed: PartChecksums | None = None
    ) -> UploadInstructions | None:
        return None  # through the registry API, which hashes while it writes

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

    def complete_upload(
        self, digest: str, upload_id: str | None, parts: list[CompletedPart], *, max_bytes: int
    ) -> int:
        # Uploads through the API are verified as they arrive, so a stored file is a verified one.
        if upload_id is not None or parts:
            raise InvalidInput("this registry takes uploads through its API; there is no multipart upload")
        size = self.size_of(digest)
        if size is None:
            raise MissingBlob(f"blob {digest} was not uploaded; PUT it to /api/v1/blobs/{digest} first")
        return size

    def verify_published(self, digest: str, *, max_bytes: int) -> int:
        # Files are published only by receive(), after their bytes hashed to the digest.
        return self.complete_upload(digest, None, [], max_bytes=max_bytes)

    def abort_upload(self, digest: str, upload_id: str) -> None:
        return None  # there are no multipart uploads to forget

    def locate(self, digest: str, *, head: bool = False) -> BlobLocation | None:
        size = self.size_of(digest)
        return None if size is None else LocalFile(self.path_of(digest), size)

    def delete(self, digest: str) -> None:
        self.path_of(digest).unlink(missing_ok=True)

    def iter_blobs(self) -> Iterator[StoredBlob]:
        for path in (self.root / "sha256").glob("*/*"):
            digest = "sha256:" + path.name
            if DIGEST.fullmatch(digest) and path.parent.name == path.name[:2]:
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    continue  # deleted while we listed
                yield StoredBlob(digest, stat.st_size, datetime.fromtimestamp(stat.st_mtime, UTC))

    def clean_staging(self, older_than: datetime) -> int:
        cutoff = older_than.timestamp()
        removed = 0
        for path in (self.root / TMP_DIR).iterdir():
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue  # finished (renamed away) while we looked
        return removed

    def check(self) -> None:
        staging = self.root / TMP_DIR
        if not staging.is_dir() or not os.access(staging, os.W_OK):
            raise ServiceUnavailable(f"blob folder {self.root} is missing or not writable")


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
