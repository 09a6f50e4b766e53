"""The web UI's session: the token cookie, CSRF tokens, form bodies, and who is looking.

The cookie holds the API token itself (HttpOnly, SameSite=Strict, Path=/ui, Secure over https), and
``registry/auth/principal.py`` honours it on /ui paths only. A form posted with that cookie must carry
the CSRF token derived from it: an HMAC keyed by the session secret, so every replica computes the same
token without sharing a key, and no other site can compute it.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Annotated, TypeVar
from urllib.parse import parse_qs

from fastapi import Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError

from deltareg.client.errors import DeltaregError, InvalidInput, PermissionDenied
from deltareg.registry.auth.principal import (
    PROMOTE,
    UI_PREFIX,
    UI_SESSION_COOKIE,
    Principal,
    authenticate,
)
from deltareg.registry.body import describe_errors, read_limited
from deltareg.registry.deps import SettingsDep

CSRF_FIELD = "csrf"
_CSRF_MESSAGE = b"deltareg-ui-csrf-v1"
MAX_FORM_FIELDS = 32
FORM_TYPE = "application/x-www-form-urlencoded"
Model = TypeVar("Model", bound=BaseModel)


def csrf_token(session_secret: str) -> str:
    return hmac.new(session_secret.encode(), _CSRF_MESSAGE, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Viewer:
    """Who is looking at a page: their principal (None when their cookie is no good) and the form token."""

    principal: Principal | None
    csrf: str

    @property
    def signed_in(self) -> bool:
        return self.principal is not None and not self.principal.anonymous

    def may_promote(self, namespace: str) -> bool:
        """Whether the forms that move aliases, approve and yank are worth showing (the routes decide)."""
        principal = self.principal
        return principal is not None and PROMOTE in principal.scopes and principal.covers(namespace)


def viewer_of(request: Request) -> Viewer:
    try:
        principal: Principal | None = authenticate(request)
    except DeltaregError:
        principal = None  # a revoked or expired cookie: the page says so by offering to log in
    secret = request.cookies.get(UI_SESSION_COOKIE, "")
    return Viewer(principal, csrf_token(secret) if secret else "")


ViewerDep = Annotated[Viewer, Depends(viewer_of)]


async def form_fields(request: Request, settings: SettingsDep) -> dict[str, str]:
    """A posted form (url-encoded, at most ``max_json_bytes``): field -> its first value.

    A form posted with the session cookie must carry its CSRF token; one authorized by an
    ``Authorization`` header instead is no CSRF risk (a browser never adds that header by itself).

    Raises:
        InvalidInput: not a url-encoded form, or text that is not UTF-8 or holds NUL characters.
        PermissionDenied: the CSRF token is missing or wrong.
    """
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type != FORM_TYPE:
        raise InvalidInput(f"expected a form ({FORM_TYPE}), got {content_type or 'no content type'}")
    raw = await read_limited(request, settings.max_json_bytes)
    try:
        parsed = parse_qs(
            raw.decode("ascii"), keep_blank_values=True, max_num_fields=MAX_FORM_FIELDS, errors="strict"
        )
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidInput(f"the form could not be read: {exc}") from None
    fields = {name: values[0] for name, values in parsed.items()}
    if any("\x00" in text for pair in fields.items() for text in pair):
        raise InvalidInput("form fields may not contain NUL characters")
    _check_csrf(request, fields.get(CSRF_FIELD, ""))
    return fields


FormDep = Annotated[dict[str, str], Depends(form_fields)]


def _check_csrf(request: Request, given: str) -> None:
    if request.headers.get("authorization", "").strip():
        return
    secret = request.cookies.get(UI_SESSION_COOKIE, "")
    if secret and not hmac.compare_digest(given.encode(), csrf_token(secret).encode()):
        raise PermissionDenied(
            "this form has no valid CSRF token (it did not come from this registry's pages); "
            "reload the page and submit it again"
        )


def parse_form(model: type[Model], fields: dict[str, str], names: tuple[str, ...]) -> Model:
    """The API's request ``model`` from form ``fields`` (blank means null), with the API's validation."""
    data = {name: (fields.get(name, "").strip() or None) for name in names}
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidInput(f"invalid form: {describe_errors(exc.errors())}") from None


def set_session(response: Response, request: Request, secret: str) -> None:
    response.set_cookie(
        UI_SESSION_COOKIE,
        secret,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path=UI_PREFIX,
    )


def clear_session(response: Response, request: Request) -> None:
    response.delete_cookie(
        UI_SESSION_COOKIE,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path=UI_PREFIX,
    )
