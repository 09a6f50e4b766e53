"""Moving blobs: digests of local files, uploads, and verified downloads into place."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import httpx

from deltareg.client._http import raise_for_status, translate_transport_errors
from deltareg.client.errors import DigestMismatch

CHUNK_BYTES = 1 << 20


def file_digest(path: Path) -> str:
    with path.open("rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()


def upload_blob(client: httpx.Client, url: str, path: Path) -> None:
    """PUT one file to the URL the registry gave for it; the registry checks digest and size."""
    with translate_transport_errors(str(client.base_url)), path.open("rb") as body:
        response = client.put(
            url,
            content=body,
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(path.stat().st_size)},
        )
    raise_for_status(response)


def download_blob(client: httpx.Client, digest: str, size: int, dest: Path, *, label: str) -> None:
    """Download a blob to ``dest``: into a temporary file beside it, checked, then renamed into place.

    A digest or size mismatch raises DigestMismatch and leaves nothing at ``dest``.
    """
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".partial")
    tmp = Path(tmp_name)
    try:
        hasher = hashlib.sha256()
        received = 0
        with os.fdopen(fd, "wb") as out, translate_transport_errors(str(client.base_url)):
            with client.stream("GET", f"/api/v1/blobs/{digest}") as response:
                raise_for_status(response)
                for chunk in response.iter_bytes(CHUNK_BYTES):
                    received += len(chunk)
                    if received > size:
                        break
                    hasher.update(chunk)
                    out.write(chunk)
        actual = "sha256:" + hasher.hexdigest()
        if received != size or actual != digest:
            raise DigestMismatch(
                f"{label}: downloaded {'more than ' if received > size else ''}{received} bytes hashing to "
                f"{actual}, but the manifest declares {size} bytes with {digest}; nothing was kept"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
