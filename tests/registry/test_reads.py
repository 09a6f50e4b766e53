"""Listing repos, showing a repo, getting a version, and resolving every reference form."""

from __future__ import annotations

import pytest

REPO = "acme/support-bot"


@pytest.fixture
def three_versions(registry):
    return [registry.push(REPO, registry.lora_files(seed)) for seed in range(3)]


def _summary(version: dict) -> dict:
    return {key: value for key, value in version.items() if key not in ("manifest", "created", "evals")}


def _out(version: dict) -> dict:
    return {key: value for key, value in version.items() if key != "created"}


def test_list_repos_sorted_by_name_with_counts(registry, three_versions):
    registry.push("zeta/one", registry.lora_files(9))
    registry.push("acme/alpha", registry.lora_files(8))

    repos = registry.client.get("/api/v1/repos").json()["repos"]
    assert [r["name"] for r in repos] == ["acme/alpha", "acme/support-bot", "zeta/one"]
    bot = repos[1]
    assert (bot["versions"], bot["latest"]) == (3, 3)
    assert bot["created_at"]

    only_acme = registry.client.get("/api/v1/repos", params={"namespace": "acme"}).json()["repos"]
    assert [r["name"] for r in only_acme] == ["acme/alpha", "acme/support-bot"]
    assert registry.client.get("/api/v1/repos", params={"namespace": "nobody"}).json() == {"repos": []}


def test_list_repos_when_empty(registry):
    assert registry.client.get("/api/v1/repos").json() == {"repos": []}


def test_list_repos_validates_the_namespace(registry):
    response = registry.client.get("/api/v1/repos", params={"namespace": "Bad Name"})
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_name"


def test_show_repo_lists_versions_newest_first(registry, three_versions):
    body = registry.client.get(f"/api/v1/repos/{REPO}").json()
    assert body["name"] == REPO
    assert body["created_at"]
    assert body["versions"] == [_summary(v) for v in reversed(three_versions)]


def test_show_unknown_repo_is_404(registry):
    response = registry.client.get("/api/v1/repos/acme/nothing")
    assert response.status_code == 404
    assert response.json()["error"] == "repo_not_found"


def test_get_version_by_number(registry, three_versions):
    response = registry.client.get(f"/api/v1/repos/{REPO}/versions/2")
    assert response.status_code == 200
    assert response.json() == _out(three_versions[1])


@pytest.mark.parametrize(
    ("number", "status", "code"), [(4, 404, "version_not_found"), (0, 400, "invalid_input")]
)
def test_get_missing_or_invalid_version_number(registry, three_versions, number, status, code):
    response = registry.client.get(f"/api/v1/repos/{REPO}/versions/{number}")
    assert response.status_code == status
    assert response.json()["error"] == code


def test_get_version_number_that_is_not_a_number_is_400(registry, three_versions):
    response = registry.client.get(f"/api/v1/repos/{REPO}/versions/latest")
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_input"
    assert "number" in response.json()["detail"]


def resolve(registry, ref: str):
    return registry.client.get("/api/v1/resolve", params={"ref": ref})


def test_resolve_every_reference_form(registry, three_versions):
    first, second, third = (_out(v) for v in three_versions)
    assert resolve(registry, REPO).json() == third
    assert resolve(registry, f"{REPO}:1").json() == first
    assert resolve(registry, f"{REPO}:2").json() == second
    assert resolve(registry, f"{REPO}@{second['digest']}").json() == second


RESOLVE_ERRORS = [
    (f"{REPO}:9", 404, "version_not_found"),
    (f"{REPO}@sha256:{'0' * 64}", 404, "version_not_found"),
    (f"{REPO}@production", 404, "alias_not_found"),
    ("acme/unknown", 404, "repo_not_found"),
    ("acme/unknown@production", 404, "repo_not_found"),
    (f"{REPO}:0", 400, "invalid_reference"),
    (f"{REPO}:x", 400, "invalid_reference"),
    (f"{REPO}@sha256:abc", 400, "invalid_reference"),
    (f"{REPO}@Prod!", 400, "invalid_name"),
    ("Acme/Bot", 400, "invalid_name"),
    ("a/b/c", 400, "invalid_name"),
    ("../x", 400, "invalid_name"),
    ("", 400, "invalid_name"),
]


def test_resolve_errors(registry, three_versions):
    # One registry for every case (each backend builds it once): none of them changes anything.
    for ref, status, code in RESOLVE_ERRORS:
        response = resolve(registry, ref)
        assert (response.status_code, response.json()["error"]) == (status, code), (ref, response.text)


def test_alias_error_names_the_alias_and_repo(registry, three_versions):
    response = resolve(registry, f"{REPO}@production")
    assert response.json()["detail"] == f"alias 'production' is not defined on {REPO}"


def test_resolve_without_ref_is_400(registry):
    response = registry.client.get("/api/v1/resolve")
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_input"


def test_resolve_in_an_empty_registry_is_repo_not_found(registry):
    response = resolve(registry, REPO)
    assert response.json()["error"] == "repo_not_found"
