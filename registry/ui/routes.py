"""The web UI's routes: HTML pages under /ui, and forms that act through the API's own services.

Authorization is the API's: each route has its line in registry/auth/rules.py (reading a repo page needs
``read`` on its namespace, moving aliases, approving and yanking need ``promote``), and a write audits
its refusal exactly as the matching API route does. A refused form shows the page it came from with the
reason (a policy violation: every failed rule); any other error on a /ui path is an HTML page too.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from typing import Annotated, Any

import anyio.to_thread
from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy.orm import Session

from deltareg.client.errors import DeltaregError
from deltareg.registry.aliases.schemas import MoveAliasRequest, RollbackRequest
from deltareg.registry.aliases.service import AliasService
from deltareg.registry.audit.refusals import RefusalsDep
from deltareg.registry.audit.routes import MAX_ID
from deltareg.registry.auth.principal import is_ui_path, principal_for_secret
from deltareg.registry.deps import SessionDep, StoreDep, VersionNumber
from deltareg.registry.policies.schemas import ApproveRequest
from deltareg.registry.policies.service import PolicyService
from deltareg.registry.storage import BlobStore
from deltareg.registry.ui import pages
from deltareg.registry.ui.pages import Problem
from deltareg.registry.ui.session import FormDep, ViewerDep, clear_session, parse_form, set_session, viewer_of
from deltareg.registry.versions.schemas import YankRequest
from deltareg.registry.versions.service import VersionService

router = APIRouter(prefix="/ui", include_in_schema=False)
REPO = "/repos/{namespace}/{name}"
ShowPage = Callable[[Session, BlobStore, Problem], Response]
Text = Annotated[str, Query(max_length=512)]


def mount_ui(app: FastAPI) -> None:
    """Add the UI to the app: its routes, its stylesheet, and HTML error pages on /ui paths.

    Call after the app's exception handlers are added (it wraps them).
    """
    app.include_router(router)
    app.mount("/ui/static", StaticFiles(directory=pages.HERE / "static"), name="ui-static")
    for error_class, handler in list(app.exception_handlers.items()):
        app.exception_handlers[error_class] = _html_on_ui(handler)


# ---- pages --------------------------------------------------------------------------------------


@router.get("")
def index(
    session: SessionDep,
    store: StoreDep,
    viewer: ViewerDep,
    q: Text = "",
    namespace: Annotated[str, Query(max_length=64)] = "",
    where: Text = "",
    alias: Annotated[str, Query(max_length=64)] = "",
) -> Response:
    """Repositories (of one namespace, if given) filtered by name; versions matching a search."""
    return pages.index_page(
        session, store, viewer, q=q, namespace=namespace or None, where=where, alias=alias
    )


@router.get(REPO)
def repo(namespace: str, name: str, session: SessionDep, store: StoreDep, viewer: ViewerDep) -> Response:
    return pages.repo_page(session, store, viewer, namespace, name)


@router.get(REPO + "/versions/{number}")
def version(
    namespace: str, name: str, number: VersionNumber, session: SessionDep, store: StoreDep, viewer: ViewerDep
) -> Response:
    return pages.version_page(session, store, viewer, namespace, name, number)


@router.get("/audit")
def audit(
    session: SessionDep,
    viewer: ViewerDep,
    repo: Annotated[str, Query(max_length=129)] = "",
    before_id: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
) -> Response:
    return pages.audit_page(session, viewer, repo or None, before_id)


# ---- forms that act (the API's services, the API's audit of refusals) ---------------------------


@router.post(REPO + "/promote")
def promote(
    namespace: str, name: str, request: Request, form: FormDep, session: SessionDep, refusals: RefusalsDep
) -> Response:
    """PUT .../aliases/{alias}: a compare-and-swap move judged by the alias's policy."""
    _show_refusals_on(request, _repo_page(request, namespace, name))
    alias = form.get("alias", "").strip()
    body = parse_form(MoveAliasRequest, form, ("version", "expected", "reason"))
    refusals.watch(
        "alias.promote", f"{namespace}/{name}@{alias}", repo=f"{namespace}/{name}", to=body.version
    )
    AliasService(session).move(namespace, name, alias, body, actor=refusals.actor)
    return _see(pages.repo_url(f"{namespace}/{name}"))


@router.post(REPO + "/rollback")
def rollback(
    namespace: str, name: str, request: Request, form: FormDep, session: SessionDep, refusals: RefusalsDep
) -> Response:
    """POST .../aliases/{alias}/rollback: back to the previous holder that is not yanked."""
    _show_refusals_on(request, _repo_page(request, namespace, name))
    alias = form.get("alias", "").strip()
    body = parse_form(RollbackRequest, form, ("to", "expected", "reason"))
    refusals.watch("alias.rollback", f"{namespace}/{name}@{alias}", repo=f"{namespace}/{name}", to=body.to)
    AliasService(session).rollback(namespace, name, alias, body, actor=refusals.actor)
    return _see(pages.repo_url(f"{namespace}/{name}"))


@router.post(REPO + "/versions/{number}/yank")
def yank(
    namespace: str,
    name: str,
    number: VersionNumber,
    request: Request,
    form: FormDep,
    session: SessionDep,
    store: StoreDep,
    refusals: RefusalsDep,
) -> Response:
    """POST .../versions/{number}/yank (``rollback`` ticked: move the aliases on it back first)."""
    _show_refusals_on(request, _version_page(request, namespace, name, number))
    ticked = "true" if form.get("rollback", "") in ("on", "true") else "false"
    body = parse_form(YankRequest, {**form, "rollback": ticked}, ("reason", "rollback"))
    refusals.watch("yank", f"{namespace}/{name}:{number}", repo=f"{namespace}/{name}", rollback=body.rollback)
    VersionService(session, store).yank(namespace, name, number, body, actor=refusals.actor)
    return _see(pages.version_url(f"{namespace}/{name}", number))


@router.post(REPO + "/versions/{number}/approve")
def approve(
    namespace: str,
    name: str,
    number: VersionNumber,
    request: Request,
    form: FormDep,
    session: SessionDep,
    refusals: RefusalsDep,
) -> Response:
    """POST .../versions/{number}/approvals: the signed-in token approves moving an alias here."""
    _show_refusals_on(request, _version_page(request, namespace, name, number))
    body = parse_form(ApproveRequest, form, ("alias", "comment"))
    refusals.watch("approve", f"{namespace}/{name}:{number}", repo=f"{namespace}/{name}", alias=body.alias)
    PolicyService(session).approve(namespace, name, number, body, actor=refusals.actor)
    return _see(pages.version_url(f"{namespace}/{name}", number))


# ---- session ------------------------------------------------------------------------------------


@router.get("/login")
def login_form(viewer: ViewerDep, next: Text = "/ui") -> Response:
    return pages.login_page(viewer, _local_next(next))


@router.post("/login")
def login(request: Request, form: FormDep, viewer: ViewerDep) -> Response:
    """Check the token and keep it in the session cookie (HttpOnly, SameSite=Strict, /ui only)."""
    secret = form.get("token", "").strip()
    try:
        principal_for_secret(request, secret)
    except DeltaregError as error:
        problem = Problem.of(error.status_code, error.to_body())
        return pages.login_page(viewer, _local_next(form.get("next", "")), problem, 401)
    response = _see(_local_next(form.get("next", "")))
    set_session(response, request, secret)
    return response


@router.post("/logout")
def logout(request: Request, form: FormDep) -> Response:
    response = _see("/ui/login")
    clear_session(response, request)
    return response


def _local_next(target: str) -> str:
    """Where to go after logging in: a UI page of this registry, never another site."""
    if is_ui_path(target.split("?", 1)[0]) and not target.startswith("//") and "\\" not in target:
        return target
    return "/ui"


def _see(url: str) -> Response:
    return RedirectResponse(url, status_code=303)  # after a POST: the browser GETs the page


# ---- refused forms and errors as pages ----------------------------------------------------------


def _repo_page(request: Request, namespace: str, name: str) -> ShowPage:
    def show(session: Session, store: BlobStore, problem: Problem) -> Response:
        return pages.repo_page(session, store, viewer_of(request), namespace, name, problem)

    return show


def _version_page(request: Request, namespace: str, name: str, number: int) -> ShowPage:
    def show(session: Session, store: BlobStore, problem: Problem) -> Response:
        return pages.version_page(session, store, viewer_of(request), namespace, name, number, problem)

    return show


def _show_refusals_on(request: Request, show: ShowPage) -> None:
    """A refusal of this form is shown on ``show``'s page (by the error handler, once the write's
    transaction has been rolled back and its refusal audited)."""
    request.state.ui_show_refusal = show


def _html_on_ui(handler: Callable[..., Any]) -> Callable[..., Any]:
    """The app's error handler, answering with an HTML page instead of JSON on /ui paths."""

    async def on_error(request: Request, exc: Exception) -> Response:
        answer = handler(request, exc)
        response: Response = await answer if inspect.isawaitable(answer) else answer
        if not is_ui_path(request.url.path) or not isinstance(response, JSONResponse):
            return response
        body = json.loads(bytes(response.body))
        problem = Problem.of(response.status_code, body)
        return await anyio.to_thread.run_sync(_problem_page, request, problem)

    return on_error


def _problem_page(request: Request, problem: Problem) -> Response:
    show: ShowPage | None = getattr(request.state, "ui_show_refusal", None)
    if show is not None and 400 <= problem.status < 500 and problem.status != 401:
        database = request.app.state.database
        try:
            with database.read_sessions() as session:
                return show(session, request.app.state.store, problem)
        except DeltaregError:
            pass  # the page itself cannot be shown (no such repo): the plain error page says why
    return pages.error_page(viewer_of(request), problem, request)
