"""API tokens: created by an admin (the secret shown once, stored hashed), listed, revoked; all audited."""

from __future__ import annotations

import secrets
from datetime import timedelta

from sqlalchemy.orm import Session

from deltareg.client.errors import Conflict, NotFound
from deltareg.registry.audit.repository import AuditRepository
from deltareg.registry.auth.principal import TOKEN_PREFIX, hash_token
from deltareg.registry.auth.repository import TokenRepository
from deltareg.registry.auth.schemas import CreateTokenRequest, TokenCreated, TokenList, TokenOut
from deltareg.registry.models import ApiToken, utcnow


def new_secret() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


class TokenService:
    def __init__(self, session: Session) -> None:
        self.tokens = TokenRepository(session)
        self.audit = AuditRepository(session)

    def create(self, request: CreateTokenRequest, *, actor: str) -> TokenCreated:
        secret = new_secret()
        expires_at = (
            None if request.expires_in_days is None else utcnow() + timedelta(days=request.expires_in_days)
        )
        token = self.tokens.add(
            name=request.name,
            token_hash=hash_token(secret),
            scopes=list(request.scopes),
            namespaces=request.namespaces,
            created_by=actor,
            expires_at=expires_at,
        )
        self.audit.append(
            actor=actor,
            action="token.create",
            target=f"token:{token.id}",
            repo=None,
            details={
                "id": token.id,
                "name": token.name,
                "scopes": list(request.scopes),
                "namespaces": request.namespaces,
                "expires_at": expires_at.isoformat() if expires_at else None,
            },
        )
        return TokenCreated(**token_out(token).model_dump(), token=secret)

    def list(self) -> TokenList:
        return TokenList(tokens=[token_out(token) for token in self.tokens.all()])

    def revoke(self, token_id: int, *, actor: str) -> TokenOut:
        token = self.tokens.get(token_id)
        if token is None:
            raise NotFound(f"no API token with id {token_id}")
        if token.revoked_at is not None:
            raise Conflict(f"API token {token_id} ({token.name}) was already revoked by {token.revoked_by}")
        token.revoked_at, token.revoked_by = utcnow(), actor
        self.audit.append(
            actor=actor,
            action="token.revoke",
            target=f"token:{token.id}",
            repo=None,
            details={"id": token.id, "name": token.name},
        )
        return token_out(token)


def token_out(token: ApiToken) -> TokenOut:
    return TokenOut(
        id=token.id,
        name=token.name,
        scopes=token.scopes.split(","),
        namespaces=token.namespaces.split(","),
        created_by=token.created_by,
        created_at=token.created_at,
        expires_at=token.expires_at,
        revoked_at=token.revoked_at,
        revoked_by=token.revoked_by,
    )


def create_first_admin_token(session: Session) -> str | None:
    """For the embedded default: an admin token named ``admin`` if the registry has no token yet (its
    secret, to hand to the local CLI), else None."""
    service = TokenService(session)
    if service.tokens.any():
        return None
    request = CreateTokenRequest(name="admin", scopes=["admin"], namespaces=["*"], expires_in_days=None)
    return service.create(request, actor="deltareg serve").token
