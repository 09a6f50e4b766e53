from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from deltareg.registry.auth.principal import NAMESPACE_PATTERN, SCOPES

MAX_EXPIRY_DAYS = 3650
TOKEN_NAME = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$"
Scope = Literal["read", "write", "promote", "admin"]


class CreateTokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=TOKEN_NAME, description="who the token is: the actor its writes record")
    scopes: list[Scope] = Field(min_length=1, max_length=len(SCOPES))
    namespaces: list[str] = Field(
        default_factory=lambda: ["*"], min_length=1, max_length=32, description='"*", "acme", "team-*"'
    )
    expires_in_days: int | None = Field(
        default=90, ge=1, le=MAX_EXPIRY_DAYS, description="null: never expires"
    )

    @field_validator("namespaces")
    @classmethod
    def _patterns(cls, patterns: list[str]) -> list[str]:
        bad = [p for p in patterns if not NAMESPACE_PATTERN.fullmatch(p)]
        if bad:
            raise ValueError(
                f"invalid namespace pattern {bad[0]!r}: "
                "use '*', a namespace, or a namespace prefix ending in '*'"
            )
        return sorted(set(patterns))

    @field_validator("scopes")
    @classmethod
    def _unique(cls, scopes: list[Scope]) -> list[Scope]:
        return sorted(set(scopes))


class TokenOut(BaseModel):
    id: int
    name: str
    scopes: list[str]
    namespaces: list[str]
    created_by: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    revoked_by: str | None


class TokenCreated(TokenOut):
    token: str = Field(description="the secret: shown once, stored only as its SHA-256")


class TokenList(BaseModel):
    tokens: list[TokenOut]


class WhoAmI(BaseModel):
    name: str
    scopes: list[str]
    namespaces: list[str]
    token_id: int | None
