from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field


class AliasMoveOut(BaseModel):
    kind: str = Field(description="promote or rollback")
    from_version: int | None = Field(description="null when the move created the alias")
    to_version: int
    reason: str | None
    actor: str | None
    at: datetime


class AliasHistory(BaseModel):
    repo: str
    alias: str
    moves: list[AliasMoveOut] = Field(description="newest first")


class AliasAt(BaseModel):
    repo: str
    alias: str
    at: datetime = Field(description="the time asked about")
    version: int = Field(description="the version the alias pointed to then")
    since: AliasMoveOut = Field(description="the move that put it there")
