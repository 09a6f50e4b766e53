from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from deltareg.registry.evals.schemas import EvalIn, EvalOut


class CreateVersionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    manifest: dict[str, Any] = Field(description="the manifest JSON (deltareg.manifest.v1)")
    evals: list[EvalIn] = Field(
        default_factory=list, max_length=64, description="scores recorded with a new version"
    )


class YankOut(BaseModel):
    at: datetime
    reason: str
    by: str | None


MAX_YANK_REASON_LENGTH = 1000


class YankRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)] = Field(
        max_length=MAX_YANK_REASON_LENGTH, description="why the version is bad (shown to whoever pulls it)"
    )
    rollback: bool = Field(
        default=False,
        description="roll back every alias pointing to the version (else such a yank is 409)",
    )


class AliasRolledBack(BaseModel):
    alias: str
    previous: int = Field(description="the yanked version the alias pointed to")
    version: int = Field(description="the version it points to now")


class YankResult(BaseModel):
    repo: str
    number: int
    digest: str
    yanked: YankOut
    rolled_back: list[AliasRolledBack] = Field(description="aliases moved off the version, by name")


class VersionSummary(BaseModel):
    repo: str
    number: int
    digest: str
    kind: str
    base_fingerprint: str
    parent: str | None
    created_at: datetime
    size: int = Field(description="total bytes of the version's files")
    pushed_by: str | None = None
    yanked: YankOut | None = Field(default=None, description="set when the version was yanked")


class VersionOut(VersionSummary):
    manifest: dict[str, Any]
    evals: list[EvalOut] = Field(default_factory=list)


class VersionCreated(VersionOut):
    created: bool = Field(description="false when this exact manifest was already a version of the repo")


class RepoSummary(BaseModel):
    name: str
    versions: int
    latest: int | None
    created_at: datetime


class RepoList(BaseModel):
    repos: list[RepoSummary]


class RepoDetail(BaseModel):
    name: str
    created_at: datetime
    versions: list[VersionSummary] = Field(description="newest first")
