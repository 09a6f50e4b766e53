"""Moving blobs: digests of local files, uploads by the registry's plan, and resumable verified downloads.

Uploads follow the upload plan of protocol v1: one PUT of the whole file, or a multipart upload whose
parts go in parallel, each retried on connection errors and 5xx; then the registry completes and
verifies the upload. Registry-relative URLs go through the registry's client (with its token); absolute
URLs are presigned and go through a separate client that never sends the token.

Downloads resume. Bytes land in ``<partials>/<hex>.partial``, named after the digest, which survives a
failed pull; the next pull re-hashes its prefix and asks for the rest with an HTTP Range. Large blobs
download as parallel ranges written with ``pwrite`` while the sha256 is computed in order behind them, so
hashing overlaps the transfer. A file reaches its destination only once its size and digest verify; a
mismatch deletes the partial file and raises DigestMismatch.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import math
import os
import re
import socket
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import httpx

from deltareg.client._http import (
    DEFAULT_TIMEOUT,
    USER_AGENT,
    raise_for_status,
    request_json,
    translate_transport_errors,
)
from deltareg.client.errors import (
    BlobNotFound,
    ConnectionFailed,
    DeltaregError,
    DigestMismatch,
    InvalidInput,
    PermissionDenied,
    ServiceUnavailable,
)
from deltareg.client.progress import SilentProgress, TransferProgress

MIB = 1 << 20
CHUNK_BYTES = MIB
MAX_DIGESTS_PER_REQUEST = 256
MAX_PARTS = 10_000  # S3's limit on the parts of one multipart upload
T = TypeVar("T")


def file_digest(path: Path) -> str:
    """``sha256:<hex>`` of a file's bytes."""
    with path.open("rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()


@dataclass(frozen=True)
class PartChecksums:
    """The file cut into ``part_size`` parts (the last one shorter), and each part's CRC32.

    Sent with the upload plan request: an S3 store then signs each part's checksum into its presigned
    URL, checks every part's bytes against it as they arrive and keeps the object's checksum, as boto3's
    ``upload_file`` does by default. CRC32 values are base64 of the 4 big-endian bytes, as S3 writes them.
    """

    part_size: int
    crc32: tuple[str, ...]

    def to_json_obj(self) -> dict[str, Any]:
        return {"part_size": self.part_size, "crc32": list(self.crc32)}


def part_size_for(size: int, preferred: int) -> int:
    """``preferred``, or larger (whole MiB) when ``size`` bytes would need more than MAX_PARTS parts."""
    needed = math.ceil(size / MAX_PARTS)
    return preferred if needed <= preferred else math.ceil(needed / MIB) * MIB


def part_checksums(path: Path, part_size: int) -> PartChecksums:
    """The CRC32 of each ``part_size`` part of the file (one part for an empty file)."""
    values = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        for start in range(0, max(size, 1), part_size):
            crc = 0
            for chunk in _pread_chunks(fd, start, min(start + part_size, size)):
                crc = zlib.crc32(chunk, crc)
            values.append(base64.b64encode(crc.to_bytes(4, "big")).decode())
    finally:
        os.close(fd)
    return PartChecksums(part_size, tuple(values))


def describe_blob(path: Path, preferred_part_size: int) -> tuple[str, PartChecksums]:
    """The file's digest and its part checksums, both computed at once: the two passes over the file
    run side by side (hashlib and zlib let go of the GIL), so the checksums cost no wall time on a
    machine with a core to spare."""
    size = path.stat().st_size
    with ThreadPoolExecutor(1, thread_name_prefix="deltareg-crc32") as pool:
        checksums = pool.submit(part_checksums, path, part_size_for(size, preferred_part_size))
        digest = file_digest(path)
        return digest, checksums.result()


@dataclass(frozen=True)
class TransferSettings:
    """Tunables of blob transfers.

    Args:
        upload_workers: parts of a multipart upload sent at once.
        part_bytes: size of each part of a multipart upload (the registry's store may ask for others).
        download_workers: ranges of a large blob fetched at once.
        parallel_download_bytes: blobs at least this large download as parallel ranges.
        range_bytes: size of each range of a parallel download.
        attempts: tries of each part, range or presigned PUT (the first included) before giving up.
        backoff_seconds: wait after the first failed try, doubled after each further one.
    """

    upload_workers: int = 6
    part_bytes: int = 16 * MIB
    download_workers: int = 4
    parallel_download_bytes: int = 64 * MIB
    range_bytes: int = 16 * MIB
    attempts: int = 4
    backoff_seconds: float = 0.5

    def __post_init__(self) -> None:
        counts = (
            "upload_workers",
            "part_bytes",
            "download_workers",
            "parallel_download_bytes",
            "range_bytes",
            "attempts",
        )
        for name in counts:
            if getattr(self, name) < 1:
                raise InvalidInput(f"transfer setting {name} must be at least 1, not {getattr(self, name)}")
        if self.backoff_seconds < 0:
            raise InvalidInput(f"transfer setting backoff_seconds must be >= 0, not {self.backoff_seconds}")


# -- the upload plan ---------------------------------------------------------------------------


@dataclass(frozen=True)
class UploadPart:
    """One part of a multipart upload: the bytes ``[offset, offset + size)`` of the file go to ``url``,
    with ``headers``; ``checksum_crc32`` (when the store checks one) is reported back at completion."""

    number: int
    url: str
    offset: int
    size: int
    headers: Mapping[str, str] = field(default_factory=dict)
    checksum_crc32: str | None = None


@dataclass(frozen=True)
class CompletedPart:
    number: int
    etag: str
    checksum_crc32: str | None = None


@dataclass(frozen=True)
class UploadPlan:
    """What the registry answered for one blob in ``POST /api/v1/blobs/uploads``."""

    digest: str
    size: int
    present: bool
    kind: Literal["put", "multipart"] | None = None
    url: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    upload_id: str | None = None
    parts: tuple[UploadPart, ...] = ()

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> UploadPlan:
        """Parse one plan entry; a plan this client cannot follow is an error, not a guess."""
        try:
            return cls._parse(data)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            # The plan holds presigned URLs (short-lived credentials): name the problem, not the data.
            raise DeltaregError(
                f"the registry sent an upload plan this client cannot follow ({exc}); "
                "is the client older than the server?"
            ) from exc

    @classmethod
    def _parse(cls, data: Mapping[str, Any]) -> UploadPlan:
        digest, size, present = str(data["digest"]), int(data["size"]), bool(data["present"])
        if present:
            return cls(digest, size, True)
        upload = data.get("upload")
        if upload is None:
            # A registry from before protocol v1 names only a URL for one PUT.
            if not data.get("upload_url"):
                raise ValueError(f"no upload target for missing blob {digest}")
            return cls(digest, size, False, "put", str(data["upload_url"]))
        if upload["kind"] == "put":
            headers = {str(k): str(v) for k, v in (upload.get("headers") or {}).items()}
            return cls(digest, size, False, "put", str(upload["url"]), headers)
        if upload["kind"] == "multipart":
            parts = tuple(_parse_part(p) for p in upload["parts"])
            _check_parts_cover(parts, size)
            return cls(digest, size, False, "multipart", upload_id=str(upload["upload_id"]), parts=parts)
        raise ValueError(f"unknown upload kind {upload['kind']!r}")


def _parse_part(data: Mapping[str, Any]) -> UploadPart:
    headers = {str(k): str(v) for k, v in (data.get("headers") or {}).items()}
    checksum = data.get("checksum_crc32")
    return UploadPart(
        int(data["number"]),
        str(data["url"]),
        int(data["offset"]),
        int(data["size"]),
        headers,
        None if checksum is None else str(checksum),
    )


def _check_parts_cover(parts: Sequence[UploadPart], size: int) -> None:
    """The parts must tile the file exactly, or the store would assemble something else."""
    position = 0
    for part in sorted(parts, key=lambda p: p.offset):
        if part.offset != position or part.size <= 0:
            raise ValueError(f"part {part.number} starts at {part.offset}, expected {position}")
        position += part.size
    if position != size or len({p.number for p in parts}) != len(parts):
        raise ValueError(f"the parts cover {position} bytes of {size}, or repeat a part number")


@dataclass(frozen=True)
class BlobDownload:
    """Where to download a blob from (a registry-relative or a presigned URL), and its expected size."""

    digest: str
    size: int
    url: str


# -- retries -----------------------------------------------------------------------------------


class _Transient(Exception):
    """A failure worth another try; ``error`` is what the caller gets when the tries run out."""

    def __init__(self, error: DeltaregError) -> None:
        super().__init__(error.message)
        self.error = error


class _Stopped(Exception):
    """Another part or range failed; this one gives up quietly."""


def _is_transient(status: int) -> bool:
    return status >= 500 or status in (408, 429)


def _redacted(url: str) -> str:
    """A URL without its query: presigned signatures are credentials, not for messages or logs."""
    return str(httpx.URL(url).copy_with(query=None))


def _s3_error_code(response: httpx.Response) -> str:
    response.read()
    match = re.search(r"<Code>([^<]+)</Code>", response.text[:4096])
    return match.group(1) if match else ""


def store_error(response: httpx.Response, what: str) -> DeltaregError:
    """The deltareg error for an object store's (S3) failure answer to a presigned URL."""
    status, code = response.status_code, _s3_error_code(response)
    where = _redacted(str(response.request.url))
    answer = f"{status} {code}".strip()
    if status == 404:
        return BlobNotFound(f"{what}: the object store has no object at {where} ({answer})")
    if status == 403:
        return PermissionDenied(
            f"{what}: the object store refused the presigned URL ({answer}); it may have expired, "
            "or the registry's store credentials are wrong"
        )
    if status == 416 or "Digest" in code or "Checksum" in code or "SHA256Mismatch" in code:
        return DigestMismatch(f"{what}: the object store's checksum check failed ({answer})")
    if status >= 500:
        return ServiceUnavailable(f"{what}: the object store at {where} answered {answer}")
    return DeltaregError(f"{what}: the object store at {where} answered {answer}")


# -- the resumable partial file ----------------------------------------------------------------

if sys.platform == "win32":

    def _lock(fd: int) -> None:
        """No flock on Windows: concurrent pulls of one blob there are not serialized."""

else:
    import fcntl

    def _lock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX)


def _open_locked(path: Path) -> int:
    """Open (creating) and lock ``path``; retry if another process renamed it away while we waited."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        _lock(fd)
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _pread_chunks(fd: int, start: int, end: int) -> Iterator[bytes]:
    position = start
    while position < end:
        chunk = os.pread(fd, min(CHUNK_BYTES, end - position), position)
        if not chunk:
            raise OSError(f"unexpected end of file at byte {position}")
        position += len(chunk)
        yield chunk


def _pwrite_all(fd: int, data: bytes, position: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, position)
        view, position = view[written:], position + written


class _Partial:
    """The resumable download of one blob, locked while in use.

    ``hashed`` bytes of the file are in the hasher and are the blob's own prefix. Between uses the file
    holds exactly that prefix (a failure cuts it back), except after a process was killed during a
    parallel download: then ``<hex>.prefix`` names the prefix hashed so far, and bytes past it may be
    holes. The next use trusts only that prefix.
    """

    def __init__(self, path: Path, fd: int, blob: BlobDownload) -> None:
        self.path, self.fd, self.blob = path, fd, blob
        self.marker = path.with_suffix(".prefix")
        self.hasher = hashlib.sha256()
        self.hashed = 0
        self.gone = False

    @classmethod
    @contextmanager
    def open(cls, folder: Path, blob: BlobDownload) -> Iterator[_Partial]:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{blob.digest.removeprefix('sha256:')}.partial"
        partial = cls(path, _open_locked(path), blob)
        try:
            partial._resume()
            yield partial
        finally:
            partial._settle()
            os.close(partial.fd)

    def _resume(self) -> None:
        prefix = os.fstat(self.fd).st_size
        if self.marker.exists():
            try:
                prefix = min(prefix, int(self.marker.read_text()))
            except ValueError:
                prefix = 0  # killed while rewriting the marker: trust nothing
        if prefix > self.blob.size:
            prefix = 0
        os.ftruncate(self.fd, prefix)
        self.marker.unlink(missing_ok=True)
        for chunk in _pread_chunks(self.fd, 0, prefix):
            self.hasher.update(chunk)
        self.hashed = prefix

    def append(self, chunk: bytes) -> None:
        """Write and hash the next bytes in order (the sequential download path)."""
        if self.hashed + len(chunk) > self.blob.size:
            raise DigestMismatch(
                f"blob {self.blob.digest}: the server sent more than the declared {self.blob.size} bytes; "
                "nothing was kept"
            )
        _pwrite_all(self.fd, chunk, self.hashed)
        self.hasher.update(chunk)
        self.hashed += len(chunk)

    def restart(self) -> None:
        """Forget the prefix (the server ignored our Range and sends the whole blob)."""
        os.ftruncate(self.fd, 0)
        self.marker.unlink(missing_ok=True)
        self.hasher, self.hashed = hashlib.sha256(), 0

    def prepare_out_of_order(self) -> None:
        """Before writing ranges past the prefix: record the prefix, then allocate the whole file."""
        self._record_prefix()
        try:
            os.posix_fallocate(self.fd, self.hashed, self.blob.size - self.hashed)
        except AttributeError:  # no posix_fallocate on this platform
            os.ftruncate(self.fd, self.blob.size)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise DeltaregError(
                    f"not enough disk space in {self.path.parent} for blob {self.blob.digest} "
                    f"({self.blob.size} bytes)"
                ) from exc
            os.ftruncate(self.fd, self.blob.size)  # the filesystem cannot preallocate; holes will do

    def hash_through(self, end: int) -> None:
        """Hash the bytes already written up to ``end`` and record the longer prefix."""
        for chunk in _pread_chunks(self.fd, self.hashed, end):
            self.hasher.update(chunk)
        self.hashed = end
        self._record_prefix()

    def _record_prefix(self) -> None:
        self.marker.write_text(str(self.hashed))

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)
        self.marker.unlink(missing_ok=True)
        self.gone = True

    def verify_and_move(self, dest: Path, label: str) -> None:
        """Rename into ``dest`` if size and digest match; otherwise delete and raise DigestMismatch."""
        actual = "sha256:" + self.hasher.hexdigest()
        on_disk = os.fstat(self.fd).st_size
        if self.hashed != self.blob.size or on_disk != self.blob.size or actual != self.blob.digest:
            self.discard()
            raise DigestMismatch(
                f"{label}: downloaded {on_disk} bytes hashing to {actual}, but the manifest declares "
                f"{self.blob.size} bytes with {self.blob.digest}; nothing was kept (a new pull starts afresh)"
            )
        os.replace(self.path, dest)
        self.marker.unlink(missing_ok=True)
        self.gone = True

    def _settle(self) -> None:
        """After a failure: cut the file back to the hashed prefix, so the next pull can trust it."""
        if self.gone:
            return
        if os.fstat(self.fd).st_size != self.hashed:
            os.ftruncate(self.fd, self.hashed)
        self.marker.unlink(missing_ok=True)


# -- the transfers -----------------------------------------------------------------------------


def _completed_json(part: CompletedPart) -> dict[str, Any]:
    listed: dict[str, Any] = {"number": part.number, "etag": part.etag}
    if part.checksum_crc32 is not None:
        listed["checksum_crc32"] = part.checksum_crc32
    return listed


class _FileSlice:
    """Bytes ``[offset, offset + size)`` of an open file, read as the request body is sent.

    Bytes sent are reported to ``progress`` as they go; ``retract`` takes them back after a failed try.
    """

    def __init__(
        self,
        fd: int,
        offset: int,
        size: int,
        progress: tuple[TransferProgress, int],
        stop: threading.Event | None = None,
    ) -> None:
        self.fd, self.offset, self.size, self.stop = fd, offset, size, stop
        self.progress, self.task = progress
        self.sent = 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in _pread_chunks(self.fd, self.offset, self.offset + self.size):
            if self.stop is not None and self.stop.is_set():
                raise _Stopped()
            yield chunk
            self.sent += len(chunk)
            self.progress.advance(self.task, len(chunk))

    def retract(self) -> None:
        self.progress.advance(self.task, -self.sent)
        self.sent = 0


class _Source:
    """The URL of one blob download; a presigned one is renewed when the store says it expired."""

    def __init__(self, transfers: Transfers, blob: BlobDownload) -> None:
        self.transfers, self.blob, self.url = transfers, blob, blob.url
        self._lock = threading.Lock()

    def renew(self, stale: str) -> None:
        with self._lock:
            if self.url == stale:  # only the first of several failing ranges asks for a new one
                self.url = self.transfers.locate([self.blob.digest])[self.blob.digest].url


class Transfers:
    """Blob uploads and downloads for one registry.

    Args:
        registry: the registry's client (base URL and Authorization header set).
        settings: parallelism, range sizes and retries.
        progress: where to report bytes moved.
        direct: the client for presigned (absolute) URLs; by default a new one without credentials.
    """

    def __init__(
        self,
        registry: httpx.Client,
        *,
        settings: TransferSettings | None = None,
        progress: TransferProgress | None = None,
        direct: httpx.Client | None = None,
    ) -> None:
        self.registry = registry
        self.settings = settings or TransferSettings()
        self.progress: TransferProgress = progress or SilentProgress()
        self._owns_direct = direct is None
        # Never the registry's client: presigned URLs must not receive our token.
        self.direct = direct or httpx.Client(
            headers={"User-Agent": USER_AGENT},
            timeout=DEFAULT_TIMEOUT,
            follow_redirects=False,
            # Without TCP_NODELAY the end of each part body can wait for a delayed ACK (as urllib3 avoids).
            transport=httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]),
        )

    def close(self) -> None:
        if self._owns_direct:
            self.direct.close()

    def _client_for(self, url: str) -> tuple[httpx.Client, bool]:
        """The client for ``url`` and whether it is the registry (relative URL) rather than the store."""
        if httpx.URL(url).is_relative_url:
            return self.registry, True
        return self.direct, False

    def _failure(self, response: httpx.Response, what: str, from_registry: bool) -> DeltaregError:
        if not from_registry:
            return store_error(response, what)
        if response.status_code == 416:
            return DigestMismatch(f"{what}: the registry's copy is shorter than the declared size")
        try:
            raise_for_status(response)
        except DeltaregError as exc:
            return exc
        return DeltaregError(f"{what}: unexpected answer {response.status_code}")

    def _with_retries(self, action: Callable[[], T]) -> T:
        """``action()`` until it succeeds or raises something other than _Transient, at most N tries."""
        delay = self.settings.backoff_seconds
        for attempt in range(1, self.settings.attempts + 1):
            try:
                return action()
            except _Transient as exc:
                if attempt == self.settings.attempts:
                    raise exc.error from exc.__cause__
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    def _transport_failure(self, exc: httpx.TransportError, what: str, url: str) -> _Transient:
        return _Transient(
            ConnectionFailed(f"{what}: cannot reach {_redacted(url)} ({type(exc).__name__}: {exc})")
        )

    # -- uploads ---------------------------------------------------------------------------------

    def upload(self, plan: UploadPlan, path: Path, *, label: str) -> bool:
        """Upload ``path`` as the plan says and have the registry verify and record it.

        Returns False (and sends nothing) when the plan says the blob is already present.
        """
        if plan.present:
            return False
        parts = self.send(plan, path, label=label)
        if plan.kind == "put" and plan.url is not None and self._client_for(plan.url)[1]:
            return True  # the registry's own PUT endpoint verified and recorded the blob
        self.complete(plan, parts)
        return True

    def send(self, plan: UploadPlan, path: Path, *, label: str) -> list[CompletedPart]:
        """Only the bytes: PUT the file (or its parts, in parallel). Returns the parts' ETags, in order."""
        if plan.present or plan.kind is None:
            return []
        if path.stat().st_size != plan.size:
            raise InvalidInput(f"{path} changed during the push: it now has {path.stat().st_size} bytes")
        task = self.progress.start(f"push {label}", plan.size)
        try:
            with path.open("rb") as file:
                if plan.kind == "multipart":
                    return self._send_parts(plan, file.fileno(), task, label)
                self._send_whole(plan, file.fileno(), task, label)
                return []
        finally:
            self.progress.finish(task)

    def _send_whole(self, plan: UploadPlan, fd: int, task: int, label: str) -> None:
        assert plan.url is not None
        url, what = plan.url, f"upload of {label}"
        client, from_registry = self._client_for(url)
        headers = {
            "Content-Type": "application/octet-stream",
            **plan.headers,
            "Content-Length": str(plan.size),
        }
        if from_registry:
            body = _FileSlice(fd, 0, plan.size, (self.progress, task))
            with translate_transport_errors(str(self.registry.base_url)):
                response = client.put(url, content=body, headers=headers)
            raise_for_status(response)
            return
        self._with_retries(
            lambda: self._put(client, url, _FileSlice(fd, 0, plan.size, (self.progress, task)), headers, what)
        )

    def _put(
        self, client: httpx.Client, url: str, body: _FileSlice, headers: Mapping[str, str], what: str
    ) -> httpx.Response:
        """One PUT to the store: a failure answer is raised (as _Transient when worth retrying)."""
        try:
            response = client.put(url, content=body, headers=headers)
        except httpx.TransportError as exc:
            body.retract()
            raise self._transport_failure(exc, what, url) from exc
        except BaseException:
            body.retract()
            raise
        if response.is_success:
            return response
        body.retract()
        error = self._failure(response, what, from_registry=False)
        if _is_transient(response.status_code):
            raise _Transient(error)
        raise error

    def _send_parts(self, plan: UploadPlan, fd: int, task: int, label: str) -> list[CompletedPart]:
        stop = threading.Event()
        workers = max(1, min(self.settings.upload_workers, len(plan.parts)))
        with ThreadPoolExecutor(workers, thread_name_prefix="deltareg-upload") as pool:
            futures = [pool.submit(self._send_part, part, fd, task, label, stop) for part in plan.parts]
            try:
                return sorted((f.result() for f in futures), key=lambda p: p.number)
            finally:
                stop.set()  # after a failure, the other parts stop at their next chunk
                for future in futures:
                    future.cancel()

    def _send_part(
        self, part: UploadPart, fd: int, task: int, label: str, stop: threading.Event
    ) -> CompletedPart:
        what = f"part {part.number} of {label}"
        client, _ = self._client_for(part.url)
        headers = {**part.headers, "Content-Length": str(part.size)}

        def attempt() -> httpx.Response:
            if stop.is_set():
                raise _Stopped()
            body = _FileSlice(fd, part.offset, part.size, (self.progress, task), stop)
            return self._put(client, part.url, body, headers, what)

        response = self._with_retries(attempt)
        etag = response.headers.get("etag")
        if not etag:
            raise DeltaregError(f"{what}: the object store accepted it but sent no ETag header")
        return CompletedPart(part.number, etag, part.checksum_crc32)

    def complete(self, plan: UploadPlan, parts: Sequence[CompletedPart]) -> None:
        """``POST /api/v1/blobs/{digest}/complete``: the registry verifies the upload and records the blob."""
        listed = [_completed_json(p) for p in parts]
        body = {"upload_id": plan.upload_id, "parts": listed}
        answer = request_json(self.registry, "POST", f"/api/v1/blobs/{plan.digest}/complete", json=body)
        if answer.get("digest") != plan.digest or answer.get("size") != plan.size:
            raise DeltaregError(
                f"the registry completed {answer.get('digest')} ({answer.get('size')} bytes), "
                f"not {plan.digest} ({plan.size} bytes)"
            )

    # -- downloads -------------------------------------------------------------------------------

    def locate(self, digests: Sequence[str]) -> dict[str, BlobDownload]:
        """Download URLs from ``POST /api/v1/blobs/downloads`` (presigned, or relative to the registry)."""
        wanted = list(dict.fromkeys(digests))
        located: dict[str, BlobDownload] = {}
        for start in range(0, len(wanted), MAX_DIGESTS_PER_REQUEST):
            batch = wanted[start : start + MAX_DIGESTS_PER_REQUEST]
            with translate_transport_errors(str(self.registry.base_url)):
                response = self.registry.post("/api/v1/blobs/downloads", json={"digests": batch})
            if _route_missing(response):
                # A registry from before protocol v1 has no such route and streams every blob itself.
                located.update({d: BlobDownload(d, -1, f"/api/v1/blobs/{d}") for d in batch})
                continue
            raise_for_status(response)
            for blob in response.json()["blobs"]:
                located[blob["digest"]] = BlobDownload(
                    str(blob["digest"]), int(blob["size"]), str(blob["url"])
                )
        return located

    def download(self, blob: BlobDownload, dest: Path, *, partials: Path, label: str) -> None:
        """Download ``blob`` to ``dest``, resuming a partial download left in ``partials`` by an earlier try.

        The file appears at ``dest`` only when its size and sha256 match ``blob``. A failed download
        keeps its verified prefix in ``partials/<hex>.partial`` for the next try.

        Raises:
            DigestMismatch: the bytes do not match; the partial file is deleted and nothing is at ``dest``.
            ConnectionFailed, ServiceUnavailable: the source failed on every try.
        """
        with _Partial.open(partials, blob) as partial:
            task = self.progress.start(f"pull {label}", blob.size, completed=partial.hashed)
            try:
                self._fill(_Source(self, blob), partial, task, label)
            except DigestMismatch:
                partial.discard()  # the bytes are not the blob's: none of them is worth resuming
                raise
            finally:
                self.progress.finish(task)
            partial.verify_and_move(dest, label)

    def _fill(self, source: _Source, partial: _Partial, task: int, label: str) -> None:
        size, settings = partial.blob.size, self.settings
        if partial.hashed >= size:
            return
        if size >= settings.parallel_download_bytes and size - partial.hashed > settings.range_bytes:
            try:
                self._fetch_ranges(source, partial, task, label)
                return
            except _RangesIgnored:
                partial.restart()
        self._with_retries(lambda: self._fetch_rest(source, partial, task, label))

    @contextmanager
    def _get(self, source: _Source, headers: Mapping[str, str], what: str) -> Iterator[httpx.Response]:
        """A streamed GET of the source; transient failures (also while reading) raise _Transient."""
        url = source.url
        client, from_registry = self._client_for(url)
        request = client.build_request("GET", url, headers={"Accept-Encoding": "identity", **headers})
        try:
            response = client.send(request, stream=True)
        except httpx.TransportError as exc:
            raise self._transport_failure(exc, what, url) from exc
        try:
            if not response.is_success:
                self._raise_get_failure(response, source, url, from_registry, what)
            yield response
        except httpx.TransportError as exc:
            raise self._transport_failure(exc, what, url) from exc
        finally:
            response.close()

    def _raise_get_failure(
        self, response: httpx.Response, source: _Source, url: str, from_registry: bool, what: str
    ) -> None:
        error = self._failure(response, what, from_registry)
        if response.status_code == 403 and not from_registry:
            source.renew(url)  # presigned URLs expire; the registry signs a fresh one
            raise _Transient(error)
        if _is_transient(response.status_code):
            raise _Transient(error)
        raise error

    def _fetch_rest(self, source: _Source, partial: _Partial, task: int, label: str) -> None:
        """One GET of everything past the hashed prefix, written and hashed in order."""
        start, what = partial.hashed, f"download of {label}"
        with self._get(source, {"Range": f"bytes={start}-"} if start else {}, what) as response:
            if start and response.status_code == 200:
                partial.restart()
            elif start:
                _check_content_range(response, start, partial.blob, what)
            for chunk in response.iter_raw():
                partial.append(chunk)
                self.progress.advance(task, len(chunk))
        if partial.hashed != partial.blob.size:
            raise _Transient(ConnectionFailed(f"{what}: the connection closed after {partial.hashed} bytes"))

    def _fetch_ranges(self, source: _Source, partial: _Partial, task: int, label: str) -> None:
        """Parallel ranges written with pwrite; the main thread hashes them in order as they land."""
        size, step = partial.blob.size, self.settings.range_bytes
        ranges = [(start, min(start + step, size)) for start in range(partial.hashed, size, step)]
        partial.prepare_out_of_order()
        stop = threading.Event()
        workers = min(self.settings.download_workers, len(ranges))
        with ThreadPoolExecutor(workers, thread_name_prefix="deltareg-download") as pool:
            futures = [
                pool.submit(self._fetch_range, source, partial, start, end, task, label, stop)
                for start, end in ranges
            ]
            try:
                for (_, end), future in zip(ranges, futures, strict=True):
                    future.result()
                    partial.hash_through(end)
            finally:
                stop.set()
                for future in futures:
                    future.cancel()

    def _fetch_range(
        self,
        source: _Source,
        partial: _Partial,
        start: int,
        end: int,
        task: int,
        label: str,
        stop: threading.Event,
    ) -> None:
        what = f"download of {label} (bytes {start}-{end - 1})"
        position = start

        def attempt() -> None:
            nonlocal position
            if stop.is_set():
                raise _Stopped()
            with self._get(source, {"Range": f"bytes={position}-{end - 1}"}, what) as response:
                if response.status_code == 200:
                    raise _RangesIgnored()
                _check_content_range(response, position, partial.blob, what)
                for chunk in response.iter_raw():
                    if stop.is_set():
                        raise _Stopped()
                    if position + len(chunk) > end:
                        raise DeltaregError(f"{what}: the server sent more than the range asked for")
                    _pwrite_all(partial.fd, chunk, position)
                    position += len(chunk)
                    self.progress.advance(task, len(chunk))
            if position != end:
                raise _Transient(
                    ConnectionFailed(f"{what}: the connection closed after {position - start} bytes")
                )

        self._with_retries(attempt)


class _RangesIgnored(Exception):
    """The server answered a Range request with the whole blob: download it in one stream instead."""


def _route_missing(response: httpx.Response) -> bool:
    """Whether the registry has no such route (405, or a 404 that is not about a blob)."""
    if response.status_code == 405:
        return True
    if response.status_code != 404:
        return False
    try:
        body = response.json()
    except ValueError:
        return True
    return not (isinstance(body, dict) and body.get("error") == BlobNotFound.code)


_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def _check_content_range(response: httpx.Response, start: int, blob: BlobDownload, what: str) -> None:
    """A 206 must start where we asked, and name the total size we expect."""
    match = _CONTENT_RANGE.fullmatch(response.headers.get("content-range", "").strip())
    if match is None or int(match.group(1)) != start:
        raise DeltaregError(
            f"{what}: asked for bytes from {start}, got Content-Range "
            f"{response.headers.get('content-range')!r} (status {response.status_code})"
        )
    if match.group(3) != "*" and int(match.group(3)) != blob.size:
        raise DigestMismatch(
            f"{what}: the stored blob has {match.group(3)} bytes, but the manifest declares {blob.size}"
        )
