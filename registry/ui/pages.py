"""What each page shows, read through the same services the API routes call, and rendered to HTML.

Templates are autoescaped (every name, metric, reason, audit detail and manifest text comes from users);
the pictures are escaped where they are drawn (``svg.py``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup
from sqlalchemy.orm import Session

from deltareg.registry.aliases.schemas import AliasOut
from deltareg.registry.aliases.service import AliasService
from deltareg.registry.audit.service import AuditService
from deltareg.registry.history.schemas import AliasMoveOut
from deltareg.registry.history.service import HistoryService
from deltareg.registry.lineage.schemas import LineageNode
from deltareg.registry.lineage.service import LineageService
from deltareg.registry.policies.schemas import PolicyOut
from deltareg.registry.policies.service import PolicyService
from deltareg.registry.results.service import ResultService
from deltareg.registry.search.schemas import MAX_PAGE, VersionHit
from deltareg.registry.search.service import SearchService
from deltareg.registry.signing.service import SigningService
from deltareg.registry.storage import BlobStore
from deltareg.registry.ui.session import CSRF_FIELD, Viewer
from deltareg.registry.ui.svg import Point, lineage_picture, metric_chart
from deltareg.registry.versions.service import VersionService

HERE = Path(__file__).parent
HISTORY_SHOWN = 20  # moves per alias on the repo page
LINEAGE_DEPTH = 4  # levels of descendants in the picture
AUDIT_PAGE = 50
SEARCH_PAGE = 100

templates = Environment(
    loader=FileSystemLoader(HERE / "templates"),
    autoescape=True,  # every template, whatever its name
    undefined=StrictUndefined,  # a misspelt variable is an error in the tests, not a blank
    trim_blocks=True,
    lstrip_blocks=True,
)
templates.filters["pretty_json"] = lambda value: json.dumps(value, indent=2, sort_keys=True)
templates.filters["url"] = lambda value: quote(str(value), safe="")


def repo_url(full_name: str) -> str:
    namespace, name = full_name.split("/", 1)
    return f"/ui/repos/{quote(namespace, safe='')}/{quote(name, safe='')}"


def version_url(full_name: str, number: int) -> str:
    return f"{repo_url(full_name)}/versions/{number}"


templates.globals.update(repo_url=repo_url, version_url=version_url, csrf_field=CSRF_FIELD)


def render(viewer: Viewer, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    html = templates.get_template(template).render(viewer=viewer, **context)
    return HTMLResponse(html, status_code=status_code, headers=SECURITY_HEADERS)


# Pages never need scripts, frames or other origins; a stray injection could run nothing.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self' data:; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


@dataclass
class Problem:
    """A refused form, shown on the page it came from: the error's message, and each failed policy rule."""

    status: int
    code: str
    message: str
    rules: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, status: int, body: Mapping[str, Any]) -> Problem:
        """The problem an error body (``{"error", "detail", ...}``) describes; a PolicyViolation's body
        lists its failed rules."""
        rules = body.get("failed_rules")
        listed = [str(rule) for rule in rules] if isinstance(rules, list) else []
        return cls(status, str(body.get("error")), str(body.get("detail")), listed)


# ---- the pages ----------------------------------------------------------------------------------


def index_page(
    session: Session,
    store: BlobStore,
    viewer: Viewer,
    *,
    q: str,
    namespace: str | None,
    where: str,
    alias: str,
) -> HTMLResponse:
    repos = VersionService(session, store).list_repos(namespace).repos
    needle = q.strip().lower()
    shown = [repo for repo in repos if needle in repo.name.lower()]
    hits: list[VersionHit] | None = None
    if where.strip() or alias.strip():
        found = SearchService(session).search(
            namespace=namespace,
            where=[where] if where.strip() else None,
            alias=alias.strip() or None,
            limit=SEARCH_PAGE,
        )
        hits = [hit for hit in found.versions if needle in hit.repo.lower()]
    return render(
        viewer, "index.html", repos=shown, hits=hits, q=q, namespace=namespace or "", where=where, alias=alias
    )


def repo_page(
    session: Session,
    store: BlobStore,
    viewer: Viewer,
    namespace: str,
    name: str,
    problem: Problem | None = None,
) -> HTMLResponse:
    detail = VersionService(session, store).show_repo(namespace, name)
    found = SearchService(session).search(repo=detail.name, include_yanked=True, limit=MAX_PAGE)
    evals = {hit.number: hit for hit in found.versions}
    aliases = AliasService(session).list(namespace, name).aliases
    history = HistoryService(session)
    moves: dict[str, list[AliasMoveOut]] = {
        alias.name: history.moves(namespace, name, alias.name, limit=HISTORY_SHOWN).moves for alias in aliases
    }
    policies: dict[str, PolicyOut] = {
        p.alias: p for p in PolicyService(session).list(namespace, name).policies
    }
    return render(
        viewer,
        "repo.html",
        status_code=problem.status if problem else 200,
        repo=detail,
        namespace=namespace,
        evals=evals,
        charts=metric_charts(found.versions),
        more_versions=found.next_cursor is not None,
        aliases=aliases,
        aliases_by_version=_aliases_by_version(aliases),
        moves=moves,
        policies=policies,
        can_promote=viewer.may_promote(namespace),
        problem=problem,
    )


def metric_charts(hits: list[VersionHit]) -> list[Markup]:
    """One chart per metric: each version's newest value of it (the one a policy judges)."""
    series: dict[str, dict[int, float]] = {}
    for hit in hits:
        for row in hit.evals:  # oldest first: a newer value of a metric replaces an older one
            series.setdefault(row.name, {})[hit.number] = row.value
    return [
        metric_chart(metric, [Point(number, value) for number, value in values.items()])
        for metric, values in sorted(series.items())
    ]


def _aliases_by_version(aliases: list[AliasOut]) -> dict[int, list[str]]:
    found: dict[int, list[str]] = {}
    for alias in aliases:
        found.setdefault(alias.version, []).append(alias.name)
    return found


def version_page(
    session: Session,
    store: BlobStore,
    viewer: Viewer,
    namespace: str,
    name: str,
    number: int,
    problem: Problem | None = None,
) -> HTMLResponse:
    version = VersionService(session, store).get_version(namespace, name, number)
    graph = LineageService(session).graph(f"{version.repo}:{number}", depth=LINEAGE_DEPTH)

    def link_of(node: LineageNode) -> str:
        return version_url(node.repo, node.number)

    return render(
        viewer,
        "version.html",
        status_code=problem.status if problem else 200,
        version=version,
        namespace=namespace,
        files=version.manifest.get("files", []),
        signatures=SigningService(session).list_signatures(namespace, name, number).signatures,
        results=ResultService(session).list(namespace, name, number).results,
        approvals=PolicyService(session).list_approvals(namespace, name, number).approvals,
        aliases=AliasService(session).list(namespace, name).aliases,
        lineage=graph,
        lineage_svg=lineage_picture(graph, link_of),
        can_promote=viewer.may_promote(namespace),
        problem=problem,
    )


def audit_page(session: Session, viewer: Viewer, repo: str | None, before_id: int | None) -> HTMLResponse:
    page = AuditService(session).list(repo, before_id=before_id, limit=AUDIT_PAGE)
    return render(viewer, "audit.html", page=page, repo=repo or "", before_id=before_id)


def login_page(
    viewer: Viewer, next_page: str, problem: Problem | None = None, status_code: int = 200
) -> HTMLResponse:
    return render(viewer, "login.html", status_code=status_code, problem=problem, next_page=next_page)


def error_page(viewer: Viewer, problem: Problem, request: Request) -> HTMLResponse:
    return render(viewer, "error.html", status_code=problem.status, problem=problem, path=request.url.path)
