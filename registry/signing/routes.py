"""Signing routes, in a router of their own (``/api/v1/namespaces/{ns}/keys``, ``.../signatures``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response

from deltareg.registry.audit.refusals import RefusalsDep
from deltareg.registry.auth.rules import VERSION
from deltareg.registry.body import RawJsonBody, openapi_body
from deltareg.registry.deps import SessionDep, VersionNumber
from deltareg.registry.signing.schemas import (
    KeyList,
    KeyRegistered,
    KeyRevoked,
    RegisterKeyRequest,
    SignatureAdded,
    SignatureList,
    SignRequest,
    parse_register_request,
    parse_sign_request,
)
from deltareg.registry.signing.service import SigningService

router = APIRouter(prefix="/api/v1", tags=["signing"])

KEYS = "/api/v1/namespaces/{namespace}/keys"
SIGNATURES = VERSION + "/signatures"
KEY_ID_SHOWN = 64  # of a refused key id, in the audit entry (the path may hold anything)


def get_signing_service(session: SessionDep) -> SigningService:
    return SigningService(session)


SigningServiceDep = Annotated[SigningService, Depends(get_signing_service)]


@router.post(
    "/namespaces/{namespace}/keys",
    status_code=201,
    openapi_extra=openapi_body(RegisterKeyRequest),
    responses={200: {"model": KeyRegistered, "description": "the key was registered before"}},
)
def register_key(
    namespace: str, body: RawJsonBody, response: Response, service: SigningServiceDep, refusals: RefusalsDep
) -> KeyRegistered:
    """Register an Ed25519 public key in a namespace: signatures by it count for the namespace's repos.

    The same key again is 200 with the first registration (nothing audited); a revoked key is 409.
    Audited as ``key.register``; a refusal as ``key.register.refused``.
    """
    refusals.watch("key.register", f"{namespace}/keys", repo=None, namespace=namespace)
    key, name = parse_register_request(body)
    refusals.details["key_id"] = key.key_id
    registered = service.register_key(namespace, key, name, actor=refusals.actor)
    if not registered.created:
        response.status_code = 200
    return registered


@router.get("/namespaces/{namespace}/keys")
def list_keys(namespace: str, service: SigningServiceDep) -> KeyList:
    """The keys registered in a namespace, oldest first, revoked ones included."""
    return service.list_keys(namespace)


@router.post("/namespaces/{namespace}/keys/{key_id}/revoke")
def revoke_key(namespace: str, key_id: str, service: SigningServiceDep, refusals: RefusalsDep) -> KeyRevoked:
    """Revoke a key: signatures by it no longer satisfy a policy's ``require_signature``.

    Revoking again changes nothing (``changed`` false). Audited as ``key.revoke``; a refusal (an unknown
    key: 404 ``signing_key_not_found``) as ``key.revoke.refused``.
    """
    refusals.watch(
        "key.revoke",
        f"{namespace}/keys/{key_id}",
        repo=None,
        namespace=namespace,
        key_id=key_id[:KEY_ID_SHOWN],
    )
    return service.revoke_key(namespace, key_id, actor=refusals.actor)


@router.post(
    "/repos/{namespace}/{name}/versions/{number}/signatures",
    status_code=201,
    openapi_extra=openapi_body(SignRequest),
    responses={200: {"model": SignatureAdded, "description": "the same signature was added before"}},
)
def sign(
    namespace: str,
    name: str,
    number: VersionNumber,
    body: RawJsonBody,
    response: Response,
    service: SigningServiceDep,
    refusals: RefusalsDep,
) -> SignatureAdded:
    """Add a signature of the version's manifest digest by a registered key of the repo's namespace.

    The registry verifies it first: a signature that does not verify is 400 ``signature_invalid``, an
    unknown key 404 ``signing_key_not_found``, a revoked key 400; nothing is stored then. The same
    signature again is 200 (nothing audited). Audited as ``version.sign``; a refusal as
    ``version.sign.refused``.
    """
    refusals.watch("version.sign", f"{namespace}/{name}:{number}", repo=f"{namespace}/{name}", version=number)
    request = parse_sign_request(body)
    refusals.details["key_id"] = request.key_id
    added = service.sign(namespace, name, number, request, actor=refusals.actor)
    if not added.created:
        response.status_code = 200
    return added


@router.get("/repos/{namespace}/{name}/versions/{number}/signatures")
def list_signatures(
    namespace: str, name: str, number: VersionNumber, service: SigningServiceDep
) -> SignatureList:
    """The signatures of a version, oldest first, each saying whether its key was revoked since."""
    return service.list_signatures(namespace, name, number)
