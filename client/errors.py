"""The one error hierarchy of deltareg, shared by the server and the client.

Every error carries a stable ``code`` (the wire identity) and the HTTP ``status_code`` the server
answers with. The server renders ``{"error": code, "detail": message}``;
the client turns that body back into the same class in exactly one place (``error_for``); the CLI maps
classes to exit codes in one table (``deltareg.client.cli.EXIT_CODES``).

    DeltaregError (500)
    ├── InvalidInput (400)
    │   ├── InvalidName, InvalidReference, InvalidManifest, InvalidSafetensors,
    │   ├── InvalidAdapter, InvalidModel, UnsafeFile (pickles), MissingBlob
    ├── AuthenticationRequired (401), PermissionDenied (403)
    ├── NotFound (404)
    │   ├── RepoNotFound, VersionNotFound, BlobNotFound, AliasNotFound, SigningKeyNotFound
    ├── Conflict (409)
    ├── PolicyViolation (403: a promotion policy refused the move; every failed rule is listed)
    ├── VersionYanked (410: the version was yanked; name it exactly and allow yanked versions to pull it)
    ├── PayloadTooLarge (413)
    ├── VerificationFailed (400; the CLI exits 3)
    │   ├── DigestMismatch, BaseMismatch, AuditChainBroken, SignatureInvalid
    ├── ServiceUnavailable (503)
    └── ConnectionFailed (client only: the server could not be reached)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar


class DeltaregError(Exception):
    """Base of every deltareg error."""

    code: ClassVar[str] = "internal_error"
    status_code: ClassVar[int] = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_body(self) -> dict[str, Any]:
        return {"error": self.code, "detail": self.message}


class InvalidInput(DeltaregError):
    code = "invalid_input"
    status_code = 400


class InvalidName(InvalidInput):
    code = "invalid_name"


class InvalidReference(InvalidInput):
    code = "invalid_reference"


class InvalidManifest(InvalidInput):
    code = "invalid_manifest"


class InvalidSafetensors(InvalidInput):
    code = "invalid_safetensors"


class InvalidAdapter(InvalidInput):
    code = "invalid_adapter"


class InvalidModel(InvalidInput):
    code = "invalid_model"


class InvalidDelta(InvalidInput):
    """A dense delta folder (``deltareg diff`` output) or its parameters are malformed."""

    code = "invalid_delta"


class UnsafeFile(InvalidInput):
    """A pickle-based weight file (.bin, .pt, …): deltareg never unpickles."""

    code = "unsafe_file"


class MissingBlob(InvalidInput):
    """A manifest names a blob the store does not hold (upload it first)."""

    code = "missing_blob"


class AuthenticationRequired(DeltaregError):
    code = "authentication_required"
    status_code = 401


class PermissionDenied(DeltaregError):
    code = "permission_denied"
    status_code = 403


class NotFound(DeltaregError):
    code = "not_found"
    status_code = 404


class RepoNotFound(NotFound):
    code = "repo_not_found"


class VersionNotFound(NotFound):
    code = "version_not_found"


class BlobNotFound(NotFound):
    code = "blob_not_found"


class AliasNotFound(NotFound):
    code = "alias_not_found"


class SigningKeyNotFound(NotFound):
    """No such public key is registered in the namespace."""

    code = "signing_key_not_found"


class Conflict(DeltaregError):
    code = "conflict"
    status_code = 409


class PolicyViolation(DeltaregError):
    """A promotion policy refused an alias move; the message lists every rule that failed, and so does
    ``failed_rules`` (sent in the response body too, for programs and the web UI)."""

    code = "policy_violation"
    status_code = 403

    def __init__(self, message: str, failed_rules: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.failed_rules = list(failed_rules)

    def to_body(self) -> dict[str, Any]:
        return {**super().to_body(), "failed_rules": self.failed_rules}


class VersionYanked(DeltaregError):
    """The version was yanked (the message gives the reason); it is pulled only when asked for exactly."""

    code = "version_yanked"
    status_code = 410


class PayloadTooLarge(DeltaregError):
    code = "payload_too_large"
    status_code = 413


class VerificationFailed(DeltaregError):
    """Something did not verify: a digest, the base model, a signature. CLI exit code 3."""

    code = "verification_failed"
    status_code = 400


class DigestMismatch(VerificationFailed):
    code = "digest_mismatch"


class BaseMismatch(VerificationFailed):
    code = "base_mismatch"


class ResultMismatch(VerificationFailed):
    """The merged model's fingerprint is not the one expected (``apply --expect``)."""

    code = "result_mismatch"


class AuditChainBroken(VerificationFailed):
    """The audit log's hash chain does not verify: an entry was changed, removed or reordered."""

    code = "audit_chain_broken"


class SignatureInvalid(VerificationFailed):
    """A signature does not verify, or a version lacks one a trust policy requires."""

    code = "signature_invalid"


class ServiceUnavailable(DeltaregError):
    code = "service_unavailable"
    status_code = 503


class ConnectionFailed(DeltaregError):
    code = "connection_failed"
    status_code = 503


def _all_subclasses(cls: type[DeltaregError]) -> list[type[DeltaregError]]:
    found: list[type[DeltaregError]] = []
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(_all_subclasses(sub))
    return found


_ALL_ERRORS: list[type[DeltaregError]] = [DeltaregError, *_all_subclasses(DeltaregError)]
ERRORS_BY_CODE: dict[str, type[DeltaregError]] = {cls.code: cls for cls in _ALL_ERRORS}


def error_for(code: str, status_code: int, message: str) -> DeltaregError:
    """The typed error for a wire code, falling back on the HTTP status when the code is unknown."""
    cls = ERRORS_BY_CODE.get(code)
    if cls is None:
        cls = next(
            (c for c in (NotFound, Conflict, PayloadTooLarge, InvalidInput) if c.status_code == status_code),
            ServiceUnavailable if status_code == 503 else DeltaregError,
        )
    return cls(message)
