from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from deltareg.client.refs import MAX_VERSION

MAX_REASON_LENGTH = 1000


class MoveAliasRequest(BaseModel):
    """A compare-and-swap move: point the alias at ``version`` if it points at ``expected`` now."""

    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=1, le=MAX_VERSION, description="the version number the alias should point to")
    # Required (null allowed) so that a client cannot overwrite an alias without saying what it expects.
    expected: int | None = Field(
        ge=1,
        le=MAX_VERSION,
        description="the version number the alias points to now, or null if it must not exist yet",
    )
    reason: str | None = Field(default=None, max_length=MAX_REASON_LENGTH)


class RollbackRequest(BaseModel):
    """Move the alias back: to its previous holder that is not yanked, or to ``to`` (a former holder)."""

    model_config = ConfigDict(extra="forbid")

    to: int | None = Field(
        default=None,
        ge=1,
        le=MAX_VERSION,
        description="a version that held the alias before; null: the previous holder that is not yanked",
    )
    expected: int | None = Field(
        default=None,
        ge=1,
        le=MAX_VERSION,
        description="the version the alias must point to now (409 otherwise); null: whatever it holds",
    )
    reason: str | None = Field(default=None, max_length=MAX_REASON_LENGTH)


class AliasOut(BaseModel):
    repo: str
    name: str
    version: int = Field(description="the version number the alias points to")
    digest: str = Field(description="that version's manifest digest")
    updated_at: datetime


class AliasMoved(AliasOut):
    previous: int | None = Field(description="the version it pointed to before; null when it was created")
    moved: bool = Field(description="false when the alias already pointed to that version (nothing changed)")


class AliasList(BaseModel):
    repo: str
    aliases: list[AliasOut] = Field(description="sorted by name")
