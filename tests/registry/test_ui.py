"""The web UI's HTML routes through the app (every backend): pages show the registry's data, user text is
escaped, forms act with the API's rules (a policy refusal lists the failed rules and is audited), CSRF
tokens are required with the session cookie, and that cookie never authorizes an API call."""

from __future__ import annotations

import re
from typing import Any

import pytest
from _support.auth import TEST_TOKEN, bearer

from deltareg.registry.ui.svg import nice_ticks

REPO = "acme/bot"
PAGE = f"/ui/repos/{REPO}"
NO_BEARER = {"Authorization": ""}  # "": the request carries no token header (the cookie may)
HOSTILE = "<script>alert('x')</script>"


# ---- helpers --------------------------------------------------------------------------------------


def push(registry: Any, seed: int, evals: dict[str, float], *, parent: str | None = None, **meta: Any) -> Any:
    body = registry.push(REPO, registry.lora_files(seed), parent=parent, metadata=meta or None)
    if evals:
        scores = [{"name": name, "value": value} for name, value in evals.items()]
        response = registry.client.post(
            f"/api/v1/repos/{REPO}/versions/{body['number']}/evals", json={"evals": scores}
        )
        assert response.status_code == 201, response.text
    return body


def move(registry: Any, alias: str, version: int, expected: int | None, reason: str | None = None) -> None:
    body = {"version": version, "expected": expected, "reason": reason}
    response = registry.client.put(f"/api/v1/repos/{REPO}/aliases/{alias}", json=body)
    assert response.status_code == 200, response.text


def holder(registry: Any, alias: str) -> int:
    response = registry.client.get(f"/api/v1/repos/{REPO}/aliases/{alias}")
    assert response.status_code == 200, response.text
    return int(response.json()["version"])


def post(client: Any, path: str, data: dict[str, str], headers: dict[str, str] | None = None) -> Any:
    return client.post(path, data=data, headers=headers, follow_redirects=False)


def log_in(client: Any, token: str) -> None:
    response = client.post("/ui/login", data={"token": token}, headers=NO_BEARER, follow_redirects=False)
    assert response.status_code == 303, response.text
    cookie = response.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/ui" in cookie


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf" value="([0-9a-f]{64})"', html)
    assert match, "the page has no form with a CSRF token"
    return match.group(1)


def audit_actions(registry: Any) -> list[str]:
    response = registry.client.get("/api/v1/audit", params={"repo": REPO})
    return [entry["action"] for entry in response.json()["entries"]]


@pytest.fixture
def filled(registry: Any) -> Any:
    """Three versions with evals (2 stacked on 1), alias production on 1 then 2, a policy on staging."""
    first = push(registry, 1, {"accuracy": 0.7, "loss": 0.9})
    push(registry, 2, {"accuracy": 0.8, "loss": 0.5}, parent=first["digest"])
    push(registry, 3, {"accuracy": 0.6})
    move(registry, "production", 1, None)
    move(registry, "production", 2, 1, reason="better")
    policy = {"min": {"accuracy": 0.75}, "no_regression": [{"metric": "loss"}]}
    response = registry.client.put(f"/api/v1/repos/{REPO}/aliases/staging/policy", json=policy)
    assert response.status_code == 200, response.text
    return registry


# ---- pages ----------------------------------------------------------------------------------------


def test_pages_show_the_registry_data(filled):
    client = filled.client
    index = client.get("/ui", params={"q": "bo"})
    assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
    assert f'href="{PAGE}"' in index.text
    assert "No repositories" in client.get("/ui", params={"q": "nothing-like-it"}).text

    repo = client.get(PAGE).text
    assert repo.count('<tr class="version') == 3
    assert repo.count('<svg class="chart"') == 2  # accuracy and loss
    accuracy = repo.split('data-metric="accuracy"')[1].split("</svg>")[0]
    assert accuracy.count('<circle class="point"') == 3
    loss = repo.split('data-metric="loss"')[1].split("</svg>")[0]
    assert loss.count('<circle class="point"') == 2
    assert 'data-alias="production"' in repo and "better" in repo  # the alias and its history
    assert "accuracy ≥ 0.75" in repo  # the staging policy

    version = client.get(f"{PAGE}/versions/2").text
    assert 'data-role="ancestor" data-ref="acme/bot:1"' in version
    assert 'data-ref="acme/bot:2"' in version and 'class="base-node"' in version
    assert 'data-alias="acme/bot@production"' in version
    assert "adapter_model.safetensors" in version and "&#34;kind&#34;: &#34;lora&#34;" in version

    audit = client.get("/ui/audit", params={"repo": REPO}).text
    assert "alias.promote" in audit and "policy.set" in audit


def test_user_text_is_escaped_everywhere(registry):
    client = registry.client
    push(registry, 1, {"accuracy": 0.5}, note=HOSTILE)
    move(registry, "production", 1, None, reason=HOSTILE)
    escaped = "&lt;script&gt;"
    for path in (PAGE, f"{PAGE}/versions/1", "/ui/audit"):
        page = client.get(path)
        assert page.status_code == 200 and HOSTILE not in page.text and escaped in page.text, path
    searched = client.get("/ui", params={"q": HOSTILE})
    assert HOSTILE not in searched.text and escaped in searched.text
    hostile_name = client.get(f"/ui/repos/acme/{HOSTILE}")
    assert hostile_name.status_code in (400, 404) and HOSTILE not in hostile_name.text
    assert hostile_name.headers["content-type"].startswith("text/html")
    assert "script-src" not in hostile_name.headers["content-security-policy"]  # default-src 'none'


# ---- forms ----------------------------------------------------------------------------------------


def test_a_promotion_through_a_form_moves_the_alias(filled):
    client = filled.client
    log_in(client, TEST_TOKEN)
    token = csrf_of(client.get(PAGE, headers=NO_BEARER).text)
    form = {"csrf": token, "alias": "production", "version": "3", "expected": "2", "reason": "via ui"}
    response = client.post(f"{PAGE}/promote", data=form, headers=NO_BEARER, follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == PAGE
    assert holder(filled, "production") == 3
    assert audit_actions(filled)[0] == "alias.promote"


def test_a_promotion_refused_by_policy_lists_the_failed_rules(filled):
    client = filled.client
    move(filled, "staging", 2, None)
    form = {"alias": "staging", "version": "3", "expected": "2"}  # the bearer header: no CSRF needed
    response = client.post(f"{PAGE}/promote", data=form)
    assert response.status_code == 403 and response.headers["content-type"].startswith("text/html")
    rules = re.findall(r'<li class="failed-rule">([^<]*)</li>', response.text)
    assert rules == ["version 3 lacks metric loss required by the policy", "accuracy 0.6 &lt; minimum 0.75"]
    assert '<h1 id="repo-name">acme/bot</h1>' in response.text  # the repo page, with the refusal on it
    assert holder(filled, "staging") == 2
    assert audit_actions(filled)[0] == "alias.promote.refused"


def test_rollback_yank_and_approve_forms(filled):
    client = filled.client
    rolled = post(client, f"{PAGE}/rollback", data={"alias": "production", "expected": "2"})
    assert rolled.status_code == 303 and holder(filled, "production") == 1
    by_pusher = post(client, f"{PAGE}/versions/3/approve", data={"alias": "staging"})
    assert by_pusher.status_code == 403 and "cannot approve" in by_pusher.text  # the API's rule
    form = {"alias": "staging", "comment": "ok"}
    approved = post(client, f"{PAGE}/versions/3/approve", data=form, headers=filled.act_as("carol"))
    assert approved.status_code == 303
    approvals = client.get(f"/api/v1/repos/{REPO}/versions/3/approvals").json()["approvals"]
    assert [(a["actor"], a["alias"], a["comment"]) for a in approvals] == [("carol", "staging", "ok")]
    refused = post(client, f"{PAGE}/versions/1/yank", data={"reason": "broken"})  # production is on it
    assert refused.status_code == 409 and "production" in refused.text and 'id="problem"' in refused.text
    yanked = post(client, f"{PAGE}/versions/1/yank", data={"reason": "broken", "rollback": "on"})
    assert yanked.status_code == 409  # nothing to roll back to: 1 is production's first holder
    assert post(client, f"{PAGE}/versions/3/yank", data={"reason": "broken"}).status_code == 303
    assert client.get(f"/api/v1/repos/{REPO}/versions/3").json()["yanked"]["reason"] == "broken"


def test_forms_posted_with_the_cookie_need_the_csrf_token(filled):
    client = filled.client
    log_in(client, TEST_TOKEN)
    form = {"alias": "production", "version": "3", "expected": "2"}
    for csrf in (None, "0" * 64):
        data = form if csrf is None else {**form, "csrf": csrf}
        refused = client.post(f"{PAGE}/promote", data=data, headers=NO_BEARER)
        assert refused.status_code == 403 and "CSRF" in refused.text
    assert holder(filled, "production") == 2
    assert "alias.promote.refused" not in audit_actions(filled)  # forged: never reached the write


def test_a_read_only_token_sees_no_forms_and_is_refused(filled):
    client = filled.client
    reader = _token(filled, "reader", ["read"])
    log_in(client, reader)
    page = client.get(PAGE, headers=NO_BEARER)
    assert page.status_code == 200 and "reader" in page.text
    assert (
        "promote-form" not in page.text
        and 'id="yank-form"' not in client.get(f"{PAGE}/versions/1", headers=NO_BEARER).text
    )
    token = csrf_of(page.text)  # the logout form's
    refused = client.post(
        f"{PAGE}/promote",
        data={"csrf": token, "alias": "production", "version": "3", "expected": "2"},
        headers=NO_BEARER,
    )
    assert refused.status_code == 403 and "needs &#39;promote&#39;" in refused.text
    assert holder(filled, "production") == 2


# ---- session --------------------------------------------------------------------------------------


def test_the_cookie_works_on_ui_pages_only(make_registry):
    with make_registry(anonymous_read=False) as registry:
        client = registry.client
        assert client.get("/ui", headers=NO_BEARER).status_code == 401
        log_in(client, TEST_TOKEN)
        assert client.get("/ui", headers=NO_BEARER).status_code == 200
        cookie = {**NO_BEARER, "Cookie": f"deltareg_session={TEST_TOKEN}"}
        api = client.get("/api/v1/repos", headers=cookie)
        assert api.status_code == 401 and api.headers["content-type"] == "application/json"
        assert client.get("/ui", headers=cookie).status_code == 200


def test_login_refuses_bad_tokens_and_logout_ends_the_session(make_registry):
    with make_registry(anonymous_read=False) as registry:
        client = registry.client
        bad = client.post("/ui/login", data={"token": "drg_" + "x" * 30}, headers=NO_BEARER)
        assert bad.status_code == 401 and "unknown API token" in bad.text and "set-cookie" not in bad.headers
        log_in(client, TEST_TOKEN)
        page = client.get("/ui", headers=NO_BEARER)
        out = client.post("/ui/logout", data={"csrf": csrf_of(page.text)}, headers=NO_BEARER)
        assert out.status_code == 200 and "Log in" in out.text  # redirected to the login page
        assert client.get("/ui", headers=NO_BEARER).status_code == 401
        off_site = client.post(
            "/ui/login",
            data={"token": TEST_TOKEN, "next": "//evil.example/ui"},
            headers=NO_BEARER,
            follow_redirects=False,
        )
        assert off_site.headers["location"] == "/ui"


def _token(registry: Any, name: str, scopes: list[str]) -> str:
    response = registry.client.post(
        "/api/v1/tokens",
        json={"name": name, "scopes": scopes, "namespaces": ["*"]},
        headers=bearer(TEST_TOKEN),
    )
    assert response.status_code == 201, response.text
    return str(response.json()["token"])


@pytest.mark.parametrize(
    ("low", "high", "labels"),
    [
        (0.58, 0.87, ["0.60", "0.65", "0.70", "0.75", "0.80", "0.85"]),
        (0.36, 0.94, ["0.4", "0.5", "0.6", "0.7", "0.8", "0.9"]),
        (4.5, 5.5, ["4.50", "4.75", "5.00", "5.25", "5.50"]),
        (12, 97, ["20", "40", "60", "80"]),
    ],
)
def test_chart_axes_use_round_ticks_inside_the_range(low, high, labels):
    ticks = nice_ticks(low, high)
    assert [label for _, label in ticks] == labels
    assert all(low <= value <= high for value, _ in ticks)
