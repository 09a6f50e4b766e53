from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from deltareg.client.refs import DIGEST
from deltareg.client.transfer import MAX_PARTS

MAX_BLOBS_PER_REQUEST = 256

DigestStr = Annotated[str, Field(pattern=f"^{DIGEST.pattern}$", description="sha256:<64 hex>")]


# A CRC32 as S3 writes it: base64 of its 4 big-endian bytes.
Crc32Str = Annotated[str, Field(pattern=r"^[A-Za-z0-9+/]{6}==$", description="base64 CRC32")]


class PartChecksumsIn(BaseModel):
    """The blob cut into ``part_size`` parts (the last one shorter) and each part's CRC32.

    A store that checks part checksums (S3) then uses this layout, signs each part's checksum into its
    URL and checks the bytes against it; other stores ignore it.
    """

    model_config = ConfigDict(extra="forbid")

    part_size: int = Field(ge=1)
    crc32: list[Crc32Str] = Field(min_length=1, max_length=MAX_PARTS)


class BlobRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    digest: DigestStr
    size: int = Field(ge=0)
    parts: PartChecksumsIn | None = None


class UploadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    blobs: list[BlobRef] = Field(min_length=1, max_length=MAX_BLOBS_PER_REQUEST)


class PutInstructions(BaseModel):
    """One PUT of the whole body to ``url`` with ``headers``. A relative url is the registry's own."""

    kind: Literal["put"] = "put"
    url: str
    headers: dict[str, str]


class PartTarget(BaseModel):
    number: int
    url: str
    offset: int
    size: int
    # Send these with the part; report checksum_crc32 (when set) with its ETag at completion.
    headers: dict[str, str] = Field(default_factory=dict)
    checksum_crc32: str | None = None


class MultipartInstructions(BaseModel):
    """PUT each part's bytes to its url (in parallel, retried), keep each ETag, then complete."""

    kind: Literal["multipart"] = "multipart"
    upload_id: str
    part_size: int
    parts: list[PartTarget]


class UploadTarget(BaseModel):
    digest: str
    size: int
    present: bool
    # Same as upload.url for a single PUT, else None (kept for clients of the first API version).
    upload_url: str | None
    upload: PutInstructions | MultipartInstructions | None = Field(discriminator="kind")


class UploadPlan(BaseModel):
    blobs: list[UploadTarget]


class CompletedPartIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    number: int = Field(ge=1, le=MAX_PARTS)
    etag: str = Field(min_length=1, max_length=256)
    checksum_crc32: Crc32Str | None = None


class CompleteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    upload_id: str | None = Field(default=None, max_length=2048)
    parts: list[CompletedPartIn] = Field(default_factory=list, max_length=MAX_PARTS)


class BlobStored(BaseModel):
    digest: str
    size: int
    created: bool


class DownloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    digests: list[DigestStr] = Field(min_length=1, max_length=MAX_BLOBS_PER_REQUEST)


class DownloadTarget(BaseModel):
    digest: str
    size: int
    # Relative to the registry's base URL (served by the registry, Range supported) or absolute
    # (presigned; send no registry credentials there).
    url: str


class DownloadPlan(BaseModel):
    blobs: list[DownloadTarget]
