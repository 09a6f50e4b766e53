"""Server settings, read from ``DELTAREG_*`` environment variables when the app is created."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

GIB = 1 << 30
MIB = 1 << 20
# S3's own limits: parts of a multipart upload are 5 MiB .. 5 GiB (the last one may be smaller), one PUT
# holds at most 5 GiB.
S3_MIN_PART_BYTES = 5 * MIB
S3_MAX_PART_BYTES = 5 * GIB
DEFAULT_S3_REGION = "us-east-1"


class Settings(BaseSettings):
    """Configuration of one registry server process.

    The defaults describe the embedded setup: a SQLite database and a blob folder inside ``data_dir``.
    With ``storage_url=s3://bucket/prefix`` the standard AWS variables (AWS_ACCESS_KEY_ID, ...) give the
    credentials; ``s3_endpoint_url`` points at an S3-compatible store (MinIO, Ceph RGW, R2).
    """

    model_config = SettingsConfigDict(env_prefix="DELTAREG_", extra="ignore")

    data_dir: Path = Path("./deltareg-data")
    # Empty means "derive from data_dir" (see _fill_defaults).
    database_url: str = ""
    storage_url: str = ""
    max_blob_bytes: int = Field(default=256 * GIB, gt=0)
    max_manifest_bytes: int = Field(default=MIB, gt=0)
    max_json_bytes: int = Field(default=MIB, gt=0)
    # Memory per server process for rendered versions served by GET /resolve while they are unchanged
    # (deltareg.registry.versions.reads); 0 renders every request.
    version_cache_bytes: int = Field(default=64 * MIB, ge=0)
    # None means: migrate automatically on SQLite (embedded), never on a shared server database.
    auto_migrate: bool | None = None

    # ---- Access
    # Reads without a token. None means: allowed on the embedded default (database and blobs both in
    # data_dir), refused everywhere else.
    anonymous_read: bool | None = None
    # An admin token given to the server itself, for first set-up and automation (create real tokens
    # with it, then unset it): accepted as the actor "bootstrap", never stored.
    bootstrap_token: SecretStr | None = None

    # DELTAREG_LOG_FORMAT: "text" (readable lines) or "json" (one object a line, for log collectors).
    log_format: Literal["text", "json"] = "text"

    # ---- S3 (used only with an s3:// storage_url)
    s3_endpoint_url: str | None = None
    # The endpoint clients reach the store at, for presigned URLs, when it differs from the server's
    # (e.g. the server talks to http://minio:9000 inside a compose network). Default: s3_endpoint_url.
    s3_public_endpoint_url: str | None = None
    # Empty means: AWS_REGION, else AWS_DEFAULT_REGION, else us-east-1.
    s3_region: str = ""
    # Attempts per S3 call (botocore "standard" retries) before the request fails with a 503.
    s3_max_attempts: int = Field(default=3, ge=1, le=10)
    # Accept the store's full-object SHA-256 checksum (HEAD with checksum mode) instead of reading a
    # single-PUT upload back. Only for stores that verify x-amz-checksum-sha256 on upload (AWS S3,
    # MinIO): a store that records a client's checksum without checking it would accept wrong bytes.
    s3_trust_checksums: bool = False
    # Multipart uploads carry a CRC32 per part, signed into each part's presigned URL: the store checks
    # every part as it arrives (as boto3's upload_file does by default). Off for stores that do not
    # support S3's additional checksums; uploads then use DELTAREG_MULTIPART_PART_SIZE without them.
    s3_part_checksums: bool = True
    # How long presigned upload and download URLs stay valid.
    presign_seconds: int = Field(default=900, ge=1, le=7 * 24 * 3600)
    # Blobs of at least this size upload in parts (S3 multipart) instead of one PUT.
    multipart_threshold: int = Field(default=64 * MIB, ge=1, le=S3_MAX_PART_BYTES)
    # Part size of multipart uploads whose client proposes no part layout with checksums.
    multipart_part_size: int = Field(default=16 * MIB, ge=S3_MIN_PART_BYTES, le=S3_MAX_PART_BYTES)

    @model_validator(mode="after")
    def _fill_defaults(self) -> Settings:
        embedded_database, embedded_storage = _embedded_urls(self.data_dir)
        bootstrap = self.bootstrap_token.get_secret_value() if self.bootstrap_token is not None else None
        if bootstrap is not None and not re.fullmatch(r"[A-Za-z0-9_\-]{16,256}", bootstrap):
            raise ValueError("DELTAREG_BOOTSTRAP_TOKEN must be 16-256 letters, digits, '_' or '-'")
        self.database_url = self.database_url or embedded_database
        self.storage_url = self.storage_url or embedded_storage
        if self.anonymous_read is None:
            self.anonymous_read = self.is_embedded
        if self.auto_migrate is None:
            self.auto_migrate = self.database_url.startswith("sqlite")
        # An empty variable (a compose file passing "${VAR:-}") means "not set".
        self.s3_endpoint_url = self.s3_endpoint_url or None
        self.s3_public_endpoint_url = self.s3_public_endpoint_url or None
        if not self.s3_region:
            self.s3_region = (
                os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or DEFAULT_S3_REGION
            )
        return self

    @property
    def is_embedded(self) -> bool:
        """The embedded default: the database and the blobs both in ``data_dir``."""
        return (self.database_url, self.storage_url) == _embedded_urls(self.data_dir)

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


def _embedded_urls(data_dir: Path) -> tuple[str, str]:
    """The database and storage URLs of the embedded default in ``data_dir``."""
    folder = data_dir.expanduser().resolve()
    return f"sqlite:///{folder / 'registry.db'}", (folder / "blobs").as_uri()
