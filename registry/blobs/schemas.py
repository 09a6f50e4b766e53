from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from deltareg.client.refs import DIGEST

MAX_BLOBS_PER_REQUEST = 256


class BlobRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    digest: str = Field(pattern=f"^{DIGEST.pattern}$", description="sha256:<64 hex>")
    size: int = Field(ge=0)


class UploadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    blobs: list[BlobRef] = Field(min_length=1, max_length=MAX_BLOBS_PER_REQUEST)


class UploadTarget(BaseModel):
    digest: str
    size: int
    present: bool
    # Relative to the registry's base URL when uploads go through the API; absolute when presigned.
    upload_url: str | None


class UploadPlan(BaseModel):
    blobs: list[UploadTarget]


class BlobStored(BaseModel):
    digest: str
    size: int
    created: bool
