from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request

from deltareg.registry.audit.refusals import RefusalsDep
from deltareg.registry.auth.principal import authenticate, forget_principals
from deltareg.registry.auth.schemas import CreateTokenRequest, TokenCreated, TokenList, TokenOut, WhoAmI
from deltareg.registry.auth.service import TokenService
from deltareg.registry.body import json_body, openapi_body
from deltareg.registry.deps import SessionDep

router = APIRouter(prefix="/api/v1", tags=["tokens"])

CreateBody = Annotated[CreateTokenRequest, Depends(json_body(CreateTokenRequest, lambda s: s.max_json_bytes))]
# The column is an INTEGER: PostgreSQL refuses ids beyond 2**31 - 1 (a 500, not a 404, without this bound).
TokenId = Annotated[int, Path(ge=1, le=2**31 - 1)]


def get_token_service(session: SessionDep) -> TokenService:
    return TokenService(session)


TokenServiceDep = Annotated[TokenService, Depends(get_token_service)]


@router.post("/tokens", status_code=201, openapi_extra=openapi_body(CreateTokenRequest))
def create_token(body: CreateBody, service: TokenServiceDep, refusals: RefusalsDep) -> TokenCreated:
    """Create an API token (admin). The secret is in the answer, once; only its SHA-256 is stored.
    Audited as ``token.create`` (never with the secret)."""
    refusals.watch("token.create", f"token:{body.name}", repo=None, name=body.name)
    return service.create(body, actor=refusals.actor)


@router.get("/tokens")
def list_tokens(service: TokenServiceDep) -> TokenList:
    """Every token (admin): names, scopes, namespaces, expiry, revocation; never secrets or hashes."""
    return service.list()


@router.post("/tokens/{token_id}/revoke")
def revoke_token(
    token_id: TokenId, service: TokenServiceDep, refusals: RefusalsDep, request: Request
) -> TokenOut:
    """Revoke a token (admin): refused from its next request on (by other worker processes within
    PRINCIPAL_CACHE_SECONDS). Audited as ``token.revoke``."""
    refusals.watch("token.revoke", f"token:{token_id}", repo=None)
    revoked = service.revoke(token_id, actor=refusals.actor)
    forget_principals(request)
    return revoked


@router.get("/whoami")
def whoami(request: Request) -> WhoAmI:
    """Who the request's token is (``anonymous`` without one), with its scopes and namespaces."""
    principal = authenticate(request)
    return WhoAmI(
        name=principal.name,
        scopes=sorted(principal.scopes),
        namespaces=list(principal.namespaces),
        token_id=principal.token_id,
    )
