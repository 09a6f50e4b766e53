"""Webhook delivery settings, read from ``DELTAREG_WEBHOOK_*`` environment variables."""

from __future__ import annotations

from typing import Self

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class WebhookSettings(BaseSettings):
    """How often a server looks for deliveries to send, and how it retries them."""

    model_config = SettingsConfigDict(env_prefix="DELTAREG_WEBHOOK_", extra="ignore")

    # DELTAREG_WEBHOOK_POLL_SECONDS: look for due deliveries this often; 0 = this server sends none
    # (another replica must then run the worker).
    poll_seconds: float = Field(default=2.0, ge=0)
    # DELTAREG_WEBHOOK_TIMEOUT_SECONDS: a receiver that has not answered by then counts as a failed attempt.
    timeout_seconds: float = Field(default=10.0, gt=0)
    # DELTAREG_WEBHOOK_MAX_ATTEMPTS: after this many failed attempts a delivery is marked failed.
    max_attempts: int = Field(default=8, ge=1, le=100)
    # DELTAREG_WEBHOOK_BACKOFF_BASE_SECONDS / _CAP_SECONDS: the wait after failed attempt n is
    # base * 2**(n-1), at most cap.
    backoff_base_seconds: float = Field(default=10.0, ge=0)
    backoff_cap_seconds: float = Field(default=3600.0, ge=0)
    # DELTAREG_WEBHOOK_LEASE_SECONDS: a claimed delivery is left to its worker this long; if that replica
    # dies meanwhile, another one sends it after the lease (so it must outlast the timeout).
    lease_seconds: float = Field(default=60.0, gt=0)
    # DELTAREG_WEBHOOK_BATCH_SIZE: deliveries claimed (and sent concurrently) at a time.
    batch_size: int = Field(default=20, ge=1, le=1000)

    @model_validator(mode="after")
    def _lease_outlasts_timeout(self) -> Self:
        if self.lease_seconds <= self.timeout_seconds:
            raise ValueError(
                "DELTAREG_WEBHOOK_LEASE_SECONDS must be longer than DELTAREG_WEBHOOK_TIMEOUT_SECONDS, "
                "or a slow receiver's delivery is claimed again while it is still being sent"
            )
        return self

    def backoff(self, failed_attempts: int) -> float:
        """Seconds to wait after the ``failed_attempts``-th failure before the next attempt."""
        exponent = min(failed_attempts - 1, 60)  # 2**60 seconds is past any cap
        delay: float = self.backoff_base_seconds * 2**exponent
        return min(self.backoff_cap_seconds, delay)
