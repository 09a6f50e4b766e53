"""Blob store in an S3 bucket (AWS S3 or any S3-compatible store) through boto3.

Keys under the configured prefix::

    blobs/sha256/<ab>/<hex>        blob objects; a blob exists only once its row is recorded (verified)
    uploads/<hex>/put              a client's single presigned PUT (staging)
    uploads/<hex>/stream-<token>   an upload streamed through the registry API (staging)

Single presigned PUTs go to staging: ``complete_upload`` hashes the staged object (or, with
``trust_checksums``, accepts the store's own SHA-256 checksum), then copies it to its final key on the
condition that its ETag is still the one that was verified, so a client re-using a still-valid presigned
URL can never change a verified blob. Multipart uploads (large blobs) go straight to the blob's key and
complete with ``If-None-Match: *``, so they can never replace an object already there; ``complete_upload``
then reads the object back and hashes it, and deletes it on a mismatch. This saves the copy, a whole extra
pass over a large blob. Because an object can sit at a blob's key before it is verified, "present" always
means "recorded in the database" (the blobs table), never merely "an object exists".

Every call blocks: the routes that use this store are sync and run in FastAPI's thread pool.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import math
import queue
import re
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    CredentialRetrievalError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from deltareg.client.errors import (
    Conflict,
    DigestMismatch,
    InvalidInput,
    MissingBlob,
    PayloadTooLarge,
    ServiceUnavailable,
)
from deltareg.client.refs import DIGEST
from deltareg.client.transfer import part_size_for
from deltareg.registry.config import GIB, MIB, S3_MAX_PART_BYTES, S3_MIN_PART_BYTES, Settings
from deltareg.registry.storage.base import (
    BlobLocation,
    CompletedPart,
    MultipartUpload,
    PartChecksums,
    PutUpload,
    RemoteURL,
    StoredBlob,
    UploadInstructions,
    UploadPart,
)

logger = logging.getLogger("deltareg.registry.storage")

# What CompleteMultipartUpload answers when the client's part list is wrong: unknown, misordered or too
# small parts, or (InvalidRequest, BadDigest) part checksums missing from the list or not the parts'.
REFUSED_PARTS = frozenset(
    {"InvalidPart", "InvalidPartOrder", "EntityTooSmall", "MalformedXML", "InvalidRequest", "BadDigest"}
)
# Reading an object back to hash it: chunks read ahead of the hasher (a thread) at most.
READ_CHUNK_BYTES = MIB
HASH_QUEUE_CHUNKS = 8
# The first bytes of blobs this process read back and verified, kept for read_range (the version
# commit reads each safetensors header right after the upload's complete): no second GET of the start.
HEAD_CACHE_BYTES = MIB
HEAD_CACHE_ENTRIES = 16
# CopyObject copies at most 5 GiB; larger objects are copied in parts (UploadPartCopy).
MAX_SINGLE_COPY_BYTES = 5 * GIB
COPY_PART_BYTES = 512 * MIB
# Uploads through the registry API are buffered and sent in parts of this size.
STREAM_PART_BYTES = 16 * MIB
# HEAD requests in flight at once when sizes_of asks about many blobs.
PARALLEL_HEADS = 16
# How often complete_upload re-verifies a staged object that changed under it before giving up.
VERIFY_ATTEMPTS = 3
TOKEN = re.compile(r"[0-9a-f]{32}")
CREDENTIAL_ERRORS = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AccessDenied",
        "InvalidToken",
        "ExpiredToken",
        "InvalidSecurity",
        "AuthorizationHeaderMalformed",
        "AllAccessDisabled",
        "403",
    }
)
NOT_FOUND = frozenset({"404", "NoSuchKey", "NotFound"})
PRECONDITION_FAILED = frozenset({"PreconditionFailed", "412"})


class UnsupportedS3URL(ValueError):
    """DELTAREG_STORAGE_URL is an s3:// URL without a bucket (a startup error)."""


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # "" or ending in "/"

    @classmethod
    def parse(cls, url: str) -> S3Location:
        """``s3://bucket/some/prefix`` -> bucket ``bucket``, key prefix ``some/prefix/``."""
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise UnsupportedS3URL(
                f"DELTAREG_STORAGE_URL={url!r}: expected s3://bucket or s3://bucket/prefix"
            )
        prefix = parts.path.strip("/")
        return cls(parts.netloc, f"{prefix}/" if prefix else "")


_loader_lock = threading.Lock()
_shared_loader: Any = None


def _session() -> Any:
    """A new boto3 session (credentials resolved afresh) that shares the parsed service models.

    A fresh session per client keeps credential resolution independent between apps; sharing botocore's
    data loader saves parsing the S3 model JSON again each time (~0.2 s).
    """
    import boto3
    import botocore.loaders
    import botocore.session

    global _shared_loader
    core = botocore.session.get_session()
    with _loader_lock:
        if _shared_loader is None:
            _shared_loader = botocore.loaders.create_loader()
        core.register_component("data_loader", _shared_loader)
    return boto3.session.Session(botocore_session=core)


def make_s3_client(settings: Settings, endpoint_url: str | None) -> Any:
    """A boto3 S3 client for ``endpoint_url`` (None: AWS), credentials from the usual AWS sources."""
    from botocore.config import Config

    config = Config(
        region_name=settings.s3_region,
        signature_version="s3v4",
        retries={"max_attempts": settings.s3_max_attempts, "mode": "standard"},
        connect_timeout=5,
        read_timeout=60,
        max_pool_connections=64,
        # Path-style URLs work on every S3-compatible store without wildcard DNS.
        s3={"addressing_style": "path" if endpoint_url else "auto"},
        # Only the checksums we ask for: newer botocore defaults (CRC32 trailers) break some stores.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    # Plain HTTP has no certificates to check; not loading the CA bundle saves time per client.
    plain_http = endpoint_url is not None and endpoint_url.startswith("http://")
    return _session().client(
        "s3", endpoint_url=endpoint_url, config=config, verify=False if plain_http else None
    )


class S3BlobStore:
    """Verified blobs in an S3 bucket; clients transfer bytes directly with presigned URLs."""

    def __init__(
        self,
        client: Any,
        location: S3Location,
        *,
        presign_client: Any = None,
        endpoint_url: str | None = None,
        presign_seconds: int = 900,
        multipart_threshold: int = 64 * MIB,
        part_size: int = 16 * MIB,
        trust_checksums: bool = False,
        part_checksums: bool = True,
        max_single_copy_bytes: int = MAX_SINGLE_COPY_BYTES,
        copy_part_bytes: int = COPY_PART_BYTES,
        stream_part_bytes: int = STREAM_PART_BYTES,
    ) -> None:
        self.client = client
        self.presign_client = presign_client or client
        self.bucket = location.bucket
        self.prefix = location.prefix
        self.endpoint = _without_userinfo(endpoint_url) if endpoint_url else "the AWS S3 endpoint"
        self.presign_seconds = presign_seconds
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        self.trust_checksums = trust_checksums
        self.part_checksums = part_checksums
        self.max_single_copy_bytes = max_single_copy_bytes
        self.copy_part_bytes = copy_part_bytes
        self.stream_part_bytes = stream_part_bytes
        self._heads = ThreadPoolExecutor(PARALLEL_HEADS, thread_name_prefix="deltareg-s3-head")
        self._verified_heads = _HeadCache(HEAD_CACHE_ENTRIES)

    @classmethod
    def from_settings(cls, url: str, settings: Settings) -> S3BlobStore:
        """The store for ``s3://bucket/prefix`` with clients configured by ``settings``."""
        location = S3Location.parse(url)
        public = settings.s3_public_endpoint_url or settings.s3_endpoint_url
        client = make_s3_client(settings, settings.s3_endpoint_url)
        presign_client = client if public == settings.s3_endpoint_url else make_s3_client(settings, public)
        return cls(
            client,
            location,
            presign_client=presign_client,
            endpoint_url=settings.s3_endpoint_url,
            presign_seconds=settings.presign_seconds,
            multipart_threshold=settings.multipart_threshold,
            part_size=settings.multipart_part_size,
            trust_checksums=settings.s3_trust_checksums,
            part_checksums=settings.s3_part_checksums,
        )

    # ---- keys

    def blob_key(self, digest: str) -> str:
        hex_digest = _hex(digest)
        return f"{self.prefix}blobs/sha256/{hex_digest[:2]}/{hex_digest}"

    def _staging_key(self, digest: str, name: str) -> str:
        return f"{self.prefix}uploads/{_hex(digest)}/{name}"

    # ---- reads

    def size_of(self, digest: str) -> int | None:
        return self.sizes_of([digest])[digest]

    def sizes_of(self, digests: Iterable[str]) -> dict[str, int | None]:
        wanted = list(dict.fromkeys(digests))
        if len(wanted) == 1:
            sizes = {wanted[0]: self._head_size(self.blob_key(wanted[0]))}
        else:
            sizes = dict(
                zip(wanted, self._heads.map(self._head_size, map(self.blob_key, wanted)), strict=True)
            )
        if any(size is None for size in sizes.values()):
            # A HEAD answers a bare 404 for a missing bucket too: tell "no such blob" from "no bucket".
            self.check()
        return sizes

    def _head_size(self, key: str) -> int | None:
        try:
            head = self._call("head_object", Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _code(exc) in NOT_FOUND:
                return None
            raise
        size: int = head["ContentLength"]
        return size

    def read_range(self, digest: str, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        cached = self._verified_heads.get(digest, offset, length)
        if cached is not None:
            return cached
        range_header = f"bytes={offset}-{offset + length - 1}"
        try:
            with self._translated():
                response = self._call(
                    "get_object", Bucket=self.bucket, Key=self.blob_key(digest), Range=range_header
                )
                data: bytes = response["Body"].read()
        except ClientError as exc:
            if _code(exc) == "InvalidRange":
                return b""  # offset at or past the end
            if _code(exc) in NOT_FOUND:
                # Removed since the caller checked (garbage collection): the client uploads it again.
                raise MissingBlob(f"blob {digest} is no longer in the store; upload it again") from None
            raise
        return data

    def locate(self, digest: str, *, head: bool = False) -> BlobLocation | None:
        # The method is part of a presigned URL's signature: a HEAD needs a URL of its own.
        operation = "head_object" if head else "get_object"
        return RemoteURL(self._presign(operation, Bucket=self.bucket, Key=self.blob_key(digest)))

    def iter_blobs(self) -> Iterator[StoredBlob]:
        for item in self._list_objects(f"{self.prefix}blobs/sha256/"):
            *_, folder, name = item["Key"].split("/")
            digest = "sha256:" + name
            if DIGEST.fullmatch(digest) and folder == name[:2]:
                yield StoredBlob(digest, item["Size"], item["LastModified"])

    def check(self) -> None:
        try:
            self._call("head_bucket", Bucket=self.bucket)
        except ClientError as exc:
            if _code(exc) in NOT_FOUND | {"NoSuchBucket"}:
                raise ServiceUnavailable(self._bucket_missing()) from None
            raise

    # ---- direct uploads

    def plan_upload(
        self, digest: str, size: int, proposed: PartChecksums | None = None
    ) -> UploadInstructions:
        if size < self.multipart_threshold:
            return self._plan_put(digest, size)
        if proposed is not None and self.part_checksums:
            _check_layout(digest, size, proposed)
            return self._plan_multipart(digest, size, proposed.part_size, proposed.crc32)
        return self._plan_multipart(digest, size, _part_size(size, self.part_size), None)

    def _plan_put(self, digest: str, size: int) -> PutUpload:
        checksum = _base64_sha256(digest)
        url = self._presign(
            "put_object",
            Bucket=self.bucket,
            Key=self._staging_key(digest, "put"),
            ContentLength=size,
            ContentType="application/octet-stream",
            ChecksumSHA256=checksum,
        )
        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Length": str(size),
            "x-amz-checksum-sha256": checksum,
        }
        return PutUpload(url, headers)

    def _plan_multipart(
        self, digest: str, size: int, part_size: int, crc32: Sequence[str] | None
    ) -> MultipartUpload:
        # A multipart upload goes straight to the blob's own key: its completion is conditional
        # (If-None-Match), so it can never replace an object already there, and publishing needs no copy
        # from staging -- a whole extra pass over the data. The object is a blob only once it is recorded,
        # after complete_upload has read it back and hashed it.
        key = self.blob_key(digest)
        checked = {"ChecksumAlgorithm": "CRC32"} if crc32 is not None else {}
        created = self._call(
            "create_multipart_upload",
            Bucket=self.bucket,
            Key=key,
            ContentType="application/octet-stream",
            **checked,
        )
        s3_upload_id: str = created["UploadId"]
        parts = []
        for index, offset in enumerate(range(0, size, part_size)):
            length = min(part_size, size - offset)
            crc = crc32[index] if crc32 is not None else None
            # A part's checksum is signed into its URL: S3 refuses unsigned x-amz-* headers there.
            url = self._presign(
                "upload_part",
                Bucket=self.bucket,
                Key=key,
                UploadId=s3_upload_id,
                PartNumber=index + 1,
                ContentLength=length,
                **({"ChecksumCRC32": crc} if crc else {}),
            )
            headers = {"x-amz-checksum-crc32": crc} if crc else {}
            parts.append(UploadPart(index + 1, url, offset, length, headers, crc))
        return MultipartUpload(f"{uuid.uuid4().hex}.{s3_upload_id}", part_size, parts)

    def complete_upload(
        self, digest: str, upload_id: str | None, parts: list[CompletedPart], *, max_bytes: int
    ) -> int:
        if upload_id is not None:
            _token, s3_upload_id = _split_upload_id(upload_id)
            return self._complete_in_place(digest, s3_upload_id, parts, max_bytes)
        if parts:
            raise InvalidInput("parts were given without the upload_id of a multipart upload")
        try:
            return self._verify_and_publish(self._staging_key(digest, "put"), digest, max_bytes)
        except MissingBlob:
            # A concurrent upload of the same bytes may have published it and removed the staging object.
            return self.verify_published(digest, max_bytes=max_bytes)

    def _complete_in_place(
        self, digest: str, s3_upload_id: str, parts: list[CompletedPart], max_bytes: int
    ) -> int:
        key = self.blob_key(digest)
        try:
            self._complete_multipart(key, s3_upload_id, parts, digest)
        except ClientError as exc:
            if _code(exc) not in PRECONDITION_FAILED:
                raise
            # The blob's key already holds an object (an earlier or concurrent upload): ours is not needed.
            self._quietly("abort_multipart_upload", Bucket=self.bucket, Key=key, UploadId=s3_upload_id)
            return self.verify_published(digest, max_bytes=max_bytes)
        read = self._hash_object(key, digest, max_bytes)
        if read.digest != digest:
            # Ours: nothing else can have been written to this key since our conditional completion.
            self._delete_key(key)
            raise DigestMismatch(f"uploaded bytes hash to {read.digest}, not {digest}")
        self._verified_heads.put(digest, read)
        return read.size

    def verify_published(self, digest: str, *, max_bytes: int) -> int:
        """The size of the object at the blob's key once it is known to hash to ``digest``.

        An object there that does not match is an upload being verified right now, or one a crash left
        unverified: the latter (older than a presigned URL lives) is removed so the blob can be uploaded
        again; the former is a conflict the client retries.
        """
        key = self.blob_key(digest)
        try:
            read = self._hash_object(key, digest, max_bytes)
        except ClientError as exc:
            if _code(exc) in NOT_FOUND:
                raise MissingBlob(f"blob {digest} was not uploaded (or its upload expired)") from None
            raise
        if read.digest == digest:
            self._verified_heads.put(digest, read)
            return read.size
        head = self._call("head_object", Bucket=self.bucket, Key=key)
        if head["LastModified"] < datetime.now(UTC) - timedelta(seconds=2 * self.presign_seconds):
            self._delete_key(key)
            raise MissingBlob(f"blob {digest}: a stale upload that did not match was removed; upload again")
        raise Conflict(f"another upload of blob {digest} is being verified; upload it again shortly")

    def _complete_multipart(
        self, key: str, s3_upload_id: str, parts: list[CompletedPart], digest: str
    ) -> None:
        if not parts:
            raise InvalidInput("a multipart upload needs the ETag of every part")
        numbers = [part.number for part in parts]
        if sorted(numbers) != list(range(1, len(parts) + 1)):
            raise InvalidInput("parts must be numbered 1..N, each once")
        listing = [_listed(part) for part in sorted(parts, key=lambda p: p.number)]
        try:
            self._call(
                "complete_multipart_upload",
                Bucket=self.bucket,
                Key=key,
                UploadId=s3_upload_id,
                MultipartUpload={"Parts": listing},
                IfNoneMatch="*",
            )
        except ClientError as exc:
            code = _code(exc)
            if code == "NoSuchUpload":
                raise MissingBlob(f"blob {digest}: no such multipart upload (finished or expired)") from None
            if code in REFUSED_PARTS:
                raise InvalidInput(
                    f"blob {digest}: the store refused the parts ({code}); upload again"
                ) from None
            raise

    def abort_upload(self, digest: str, upload_id: str) -> None:
        _token, s3_upload_id = _split_upload_id(upload_id)
        try:
            self._call(
                "abort_multipart_upload",
                Bucket=self.bucket,
                Key=self.blob_key(digest),
                UploadId=s3_upload_id,
            )
        except ClientError as exc:
            if _code(exc) not in NOT_FOUND | {"NoSuchUpload"}:
                raise

    def _verify_and_publish(self, key: str, digest: str, max_bytes: int) -> int:
        """Hash the staged object, copy exactly that version of it to the blob's key, drop the staging.

        Concurrent uploads of the same digest share the single-PUT staging key: one of them may replace
        it (412 on our conditional GET or copy: verify again) or publish and delete it (404: the caller
        then finds the published blob).
        """
        for _ in range(VERIFY_ATTEMPTS):
            try:
                size, etag, read = self._verify(key, digest, max_bytes)
                self._copy(key, self.blob_key(digest), size, etag)
                if read is not None:  # the copy was of exactly the version that was read
                    self._verified_heads.put(digest, read)
            except ClientError as exc:
                if _code(exc) in PRECONDITION_FAILED:
                    continue
                if _code(exc) in NOT_FOUND:
                    raise MissingBlob(f"blob {digest} was not uploaded (or its upload expired)") from None
                raise
            self._quietly("delete_object", Bucket=self.bucket, Key=key)  # clean_staging gets a leftover
            return size
        raise Conflict(f"the upload of blob {digest} kept changing while it was verified; upload it again")

    def _verify(self, key: str, digest: str, max_bytes: int) -> tuple[int, str, _ReadBack | None]:
        """(size, ETag, what was read or None) of the staged object once it is known to hash to ``digest``.

        Reads it back and hashes it (one GET); with ``trust_checksums`` a HEAD first, whose full-object
        SHA-256 checksum, when the store has one, makes the read unnecessary.
        """
        try:
            if self.trust_checksums:
                head = self._call("head_object", Bucket=self.bucket, Key=key, ChecksumMode="ENABLED")
                self._check_size(key, digest, head["ContentLength"], max_bytes)
                if head.get("ChecksumSHA256") == _base64_sha256(digest):
                    return head["ContentLength"], head["ETag"], None
            read = self._hash_object(key, digest, max_bytes)
        except ClientError as exc:
            if _code(exc) in NOT_FOUND:
                self.check()
            raise
        if read.digest != digest:
            self._delete_key(key)
            raise DigestMismatch(f"uploaded bytes hash to {read.digest}, not {digest}")
        return read.size, read.etag, read

    def _hash_object(self, key: str, digest: str, max_bytes: int) -> _ReadBack:
        """Size, ETag, digest and first bytes of the object, read once."""
        with self._translated():
            response = self._call("get_object", Bucket=self.bucket, Key=key)
            body = response["Body"]
            try:
                self._check_size(key, digest, response["ContentLength"], max_bytes)
                actual, head = _hash_chunks(body.iter_chunks(READ_CHUNK_BYTES))
            finally:
                body.close()
        return _ReadBack(response["ContentLength"], response["ETag"], actual, head)

    def _check_size(self, key: str, digest: str, size: int, max_bytes: int) -> None:
        if size > max_bytes:
            self._delete_key(key)
            raise PayloadTooLarge(f"blob {digest} is {size} bytes, over the limit of {max_bytes} bytes")

    def _copy(self, source_key: str, target_key: str, size: int, etag: str | None) -> None:
        """Server-side copy, only of the object version with ``etag`` (when given)."""
        source = {"Bucket": self.bucket, "Key": source_key}
        condition = {"CopySourceIfMatch": etag} if etag else {}
        if size <= self.max_single_copy_bytes:
            self._call(
                "copy_object",
                Bucket=self.bucket,
                Key=target_key,
                CopySource=source,
                ContentType="application/octet-stream",
                MetadataDirective="REPLACE",
                **condition,
            )
            return
        created = self._call(
            "create_multipart_upload",
            Bucket=self.bucket,
            Key=target_key,
            ContentType="application/octet-stream",
        )
        upload_id = created["UploadId"]
        try:
            parts = []
            for number, offset in enumerate(range(0, size, self.copy_part_bytes), start=1):
                last = min(offset + self.copy_part_bytes, size) - 1
                copied = self._call(
                    "upload_part_copy",
                    Bucket=self.bucket,
                    Key=target_key,
                    UploadId=upload_id,
                    PartNumber=number,
                    CopySource=source,
                    CopySourceRange=f"bytes={offset}-{last}",
                    **condition,
                )
                parts.append({"PartNumber": number, "ETag": copied["CopyPartResult"]["ETag"]})
            self._call(
                "complete_multipart_upload",
                Bucket=self.bucket,
                Key=target_key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
        except BaseException:
            self._quietly("abort_multipart_upload", Bucket=self.bucket, Key=target_key, UploadId=upload_id)
            raise

    # ---- uploads through the registry API

    def receive(self, digest: str, chunks: Iterable[bytes]) -> int:
        key = self._staging_key(digest, f"stream-{uuid.uuid4().hex}")
        try:
            size, actual = self._stream_to(key, chunks)
            if actual != digest:
                raise DigestMismatch(f"uploaded bytes hash to {actual}, not {digest}")
            # Nobody else knows this staging key, so no ETag condition is needed.
            self._copy(key, self.blob_key(digest), size, None)
            return size
        finally:
            self._quietly("delete_object", Bucket=self.bucket, Key=key)

    def _stream_to(self, key: str, chunks: Iterable[bytes]) -> tuple[int, str]:
        """Upload the chunks to ``key`` (one PUT, or parts when large); returns (size, digest)."""
        hasher = hashlib.sha256()
        size = 0
        buffer = bytearray()
        upload: _StreamedMultipart | None = None
        try:
            for chunk in chunks:
                hasher.update(chunk)
                size += len(chunk)
                buffer += chunk
                while len(buffer) >= self.stream_part_bytes:
                    upload = upload or _StreamedMultipart.start(self, key)
                    upload.send(bytes(buffer[: self.stream_part_bytes]))
                    del buffer[: self.stream_part_bytes]
            if upload is None:
                self._call("put_object", Bucket=self.bucket, Key=key, Body=bytes(buffer))
            else:
                if buffer:
                    upload.send(bytes(buffer))
                upload.finish()
        except BaseException:
            if upload is not None:
                upload.abort()
            raise
        return size, "sha256:" + hasher.hexdigest()

    # ---- housekeeping

    def delete(self, digest: str) -> None:
        self._verified_heads.discard(digest)
        self._delete_key(self.blob_key(digest))

    def clean_staging(self, older_than: datetime) -> int:
        removed = 0
        prefix = f"{self.prefix}uploads/"
        for item in self._list_objects(prefix):
            if item["LastModified"] < older_than:
                self._delete_key(item["Key"])
                removed += 1
        paginator = self.client.get_paginator("list_multipart_uploads")
        with self._translated():
            # Multipart uploads target the blobs' own keys: look at the whole prefix.
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
                for upload in page.get("Uploads", []):
                    if upload["Initiated"] < older_than:
                        key, upload_id = upload["Key"], upload["UploadId"]
                        self._quietly(
                            "abort_multipart_upload", Bucket=self.bucket, Key=key, UploadId=upload_id
                        )
                        removed += 1
        return removed

    def _list_objects(self, prefix: str) -> Iterator[dict[str, Any]]:
        paginator = self.client.get_paginator("list_objects_v2")
        with self._translated():
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                yield from page.get("Contents", [])

    def _delete_key(self, key: str) -> None:
        self._call("delete_object", Bucket=self.bucket, Key=key)

    # ---- calls and their failures

    def _call(self, operation: str, /, **params: Any) -> Any:
        with self._translated():
            try:
                return getattr(self.client, operation)(**params)
            except ClientError as exc:
                if operation.startswith("head_") and _code(exc) == "403":
                    # A HEAD answer has no body, so no error code: ask in a way that names it.
                    self.client.list_objects_v2(Bucket=self.bucket, MaxKeys=1)
                raise

    def _quietly(self, operation: str, /, **params: Any) -> None:
        """A clean-up call whose failure must not hide the error being handled (it is only logged)."""
        try:
            self._call(operation, **params)
        except Exception as exc:  # the leftover is staging; clean_staging removes it later
            logger.warning("object store clean-up %s failed: %s", operation, exc)

    def _presign(self, operation: str, **params: Any) -> str:
        with self._translated():
            url: str = self.presign_client.generate_presigned_url(
                operation, Params=params, ExpiresIn=self.presign_seconds
            )
        return url

    @contextmanager
    def _translated(self) -> Iterator[None]:
        """Turn "the store is unusable" failures into ServiceUnavailable; other errors pass through."""
        try:
            yield
        except (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError):
            raise ServiceUnavailable(
                "object store credentials are missing: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            ) from None
        except (BotoConnectionError, HTTPClientError):
            raise ServiceUnavailable(f"object store unreachable at {self.endpoint}") from None
        except ClientError as exc:
            reason = self._unavailable_reason(exc)
            if reason is None:
                raise
            raise ServiceUnavailable(reason) from None
        except BotoCoreError as exc:
            raise ServiceUnavailable(f"object store error: {type(exc).__name__}") from None

    def _unavailable_reason(self, exc: ClientError) -> str | None:
        code = _code(exc)
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code == "NoSuchBucket":
            return self._bucket_missing()
        if code in CREDENTIAL_ERRORS:
            return f"object store refused the credentials ({'403 Forbidden' if code == '403' else code})"
        if status >= 500 or code in ("SlowDown", "ServiceUnavailable", "InternalError"):
            return f"object store unavailable at {self.endpoint} ({code})"
        return None

    def _bucket_missing(self) -> str:
        return f"object store unavailable: bucket {self.bucket!r} does not exist"


@dataclass(frozen=True)
class _ReadBack:
    """An object as read back: its size, ETag, sha256 digest and first HEAD_CACHE_BYTES bytes."""

    size: int
    etag: str
    digest: str
    head: bytes


def _hash_chunks(chunks: Iterable[bytes]) -> tuple[str, bytes]:
    """(``sha256:<hex>``, the first HEAD_CACHE_BYTES bytes) of the chunks.

    A thread hashes while this one reads the next chunks (hashlib releases the GIL on large buffers), so
    the read-back of a large object costs about the longer of the two rather than their sum.
    """
    hasher = hashlib.sha256()
    pending: queue.Queue[bytes | None] = queue.Queue(HASH_QUEUE_CHUNKS)

    def hash_pending() -> None:
        while (chunk := pending.get()) is not None:
            hasher.update(chunk)

    hashing = threading.Thread(target=hash_pending, name="deltareg-s3-hash", daemon=True)
    hashing.start()
    head = bytearray()
    try:
        for chunk in chunks:
            if len(head) < HEAD_CACHE_BYTES:
                head += chunk[: HEAD_CACHE_BYTES - len(head)]
            pending.put(chunk)
    finally:
        pending.put(None)  # the hasher drains what is queued, then stops
        hashing.join()
    return "sha256:" + hasher.hexdigest(), bytes(head)


class _HeadCache:
    """The first bytes of recently verified blobs (least recently used dropped first), thread-safe.

    Blobs are content-addressed, so the bytes read back and found to hash to a digest are that blob's
    bytes for good: serving them again needs no new read. A deleted blob is dropped.
    """

    def __init__(self, entries: int) -> None:
        self.entries = entries
        self._heads: OrderedDict[str, tuple[int, bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, digest: str, read: _ReadBack) -> None:
        with self._lock:
            self._heads[digest] = (read.size, read.head)
            self._heads.move_to_end(digest)
            while len(self._heads) > self.entries:
                self._heads.popitem(last=False)

    def get(self, digest: str, offset: int, length: int) -> bytes | None:
        """The bytes ``[offset, offset + length)`` (cut at the blob's end), or None when not cached."""
        with self._lock:
            cached = self._heads.get(digest)
            if cached is None:
                return None
            self._heads.move_to_end(digest)
        size, head = cached
        end = min(offset + length, size)
        if end > len(head):
            return None
        return head[offset:end]

    def discard(self, digest: str) -> None:
        with self._lock:
            self._heads.pop(digest, None)


@dataclass
class _StreamedMultipart:
    """A multipart upload the server itself sends (uploads through the registry API)."""

    store: S3BlobStore
    key: str
    upload_id: str
    parts: list[dict[str, Any]]

    @classmethod
    def start(cls, store: S3BlobStore, key: str) -> _StreamedMultipart:
        created = store._call("create_multipart_upload", Bucket=store.bucket, Key=key)
        return cls(store, key, created["UploadId"], [])

    def send(self, data: bytes) -> None:
        number = len(self.parts) + 1
        sent = self.store._call(
            "upload_part",
            Bucket=self.store.bucket,
            Key=self.key,
            UploadId=self.upload_id,
            PartNumber=number,
            Body=data,
        )
        self.parts.append({"PartNumber": number, "ETag": sent["ETag"]})

    def finish(self) -> None:
        self.store._call(
            "complete_multipart_upload",
            Bucket=self.store.bucket,
            Key=self.key,
            UploadId=self.upload_id,
            MultipartUpload={"Parts": self.parts},
        )

    def abort(self) -> None:
        self.store._quietly(
            "abort_multipart_upload", Bucket=self.store.bucket, Key=self.key, UploadId=self.upload_id
        )


def _hex(digest: str) -> str:
    # Callers validate digests; this check keeps a bad one from ever becoming a key.
    if not DIGEST.fullmatch(digest):
        raise ValueError(f"not a blob digest: {digest!r}")
    return digest.removeprefix("sha256:")


def _base64_sha256(digest: str) -> str:
    """The digest in the form S3 checksums use: base64 of the raw 32 bytes."""
    return base64.b64encode(bytes.fromhex(_hex(digest))).decode("ascii")


def _part_size(size: int, preferred: int) -> int:
    """``preferred``, or larger (whole MiB) when the blob would need more than 10000 parts."""
    part = part_size_for(size, preferred)
    if part > S3_MAX_PART_BYTES:
        raise PayloadTooLarge(f"a blob of {size} bytes is over what S3 can hold in one object")
    return part


def _check_layout(digest: str, size: int, proposed: PartChecksums) -> None:
    """A client's part layout must be one S3 accepts and give exactly one checksum per part (the request
    schema already caps the checksums, and so the parts, at MAX_PARTS)."""
    count = max(1, math.ceil(size / proposed.part_size))
    if len(proposed.crc32) != count:
        raise InvalidInput(
            f"blob {digest}: {size} bytes in parts of {proposed.part_size} bytes are {count} parts, "
            f"but {len(proposed.crc32)} part checksums were sent"
        )
    largest = min(proposed.part_size, size)
    if largest > S3_MAX_PART_BYTES or (count > 1 and proposed.part_size < S3_MIN_PART_BYTES):
        raise InvalidInput(
            f"blob {digest}: parts of {proposed.part_size} bytes; S3 needs {S3_MIN_PART_BYTES} to "
            f"{S3_MAX_PART_BYTES} bytes (only a single part may be smaller)"
        )


def _listed(part: CompletedPart) -> dict[str, Any]:
    """A part as CompleteMultipartUpload lists it (with its checksum when the upload checks them)."""
    listed: dict[str, Any] = {"PartNumber": part.number, "ETag": part.etag}
    if part.checksum_crc32 is not None:
        listed["ChecksumCRC32"] = part.checksum_crc32
    return listed


def _split_upload_id(upload_id: str) -> tuple[str, str]:
    """Our upload ids are ``<token>.<S3 UploadId>`` (the token keeps them opaque and distinct)."""
    token, _, s3_upload_id = upload_id.partition(".")
    if not TOKEN.fullmatch(token) or not s3_upload_id:
        raise InvalidInput(f"invalid upload_id {upload_id!r}: use the one from POST /api/v1/blobs/uploads")
    return token, s3_upload_id


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _without_userinfo(url: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "", "")).rstrip("/")
