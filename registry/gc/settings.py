"""Garbage-collection settings, read from ``DELTAREG_GC_*`` environment variables."""

from __future__ import annotations

from datetime import timedelta

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DAY_SECONDS = 24 * 3600


class GcSettings(BaseSettings):
    """How long unreferenced blobs are kept, and how often a server collects them by itself."""

    model_config = SettingsConfigDict(env_prefix="DELTAREG_GC_", extra="ignore")

    # DELTAREG_GC_GRACE_SECONDS: an unreferenced blob (or upload leftover) younger than this is kept, so
    # a push that is still uploading or about to commit never loses what it relies on.
    grace_seconds: float = Field(default=DAY_SECONDS, ge=0)
    # DELTAREG_GC_INTERVAL_SECONDS: run garbage collection in the server this often; 0 = never (run
    # `deltareg gc` from cron instead).
    interval_seconds: float = Field(default=0, ge=0)

    @property
    def grace(self) -> timedelta:
        return timedelta(seconds=self.grace_seconds)
