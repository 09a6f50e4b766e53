"""Text holding a NUL character, in any JSON body or query parameter: a 400 naming it, never a 500
(PostgreSQL text cannot store NUL), and nothing written."""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = pytest.mark.backends("sqlite-fs", "postgres-fs")

REPO = "acme/bot"


@pytest.fixture
def one_version(registry: Any) -> None:
    registry.push(REPO, registry.lora_files(0))


WRITES = [
    ("PUT", f"/api/v1/repos/{REPO}/aliases/prod", {"version": 1, "expected": None, "reason": "a\x00b"}),
    (
        "POST",
        f"/api/v1/repos/{REPO}/versions/1/evals",
        {"evals": [{"name": "acc", "value": 1.0, "dataset": "d\x00"}]},
    ),
    ("POST", f"/api/v1/repos/{REPO}/versions/1/approvals", {"alias": "prod", "comment": "x\x00"}),
    ("POST", f"/api/v1/repos/{REPO}/versions/1/yank", {"reason": "r\x00"}),
    ("PUT", f"/api/v1/repos/{REPO}/aliases/prod/policy", {"min": {"acc": 0.5}, "approvals": 1, "x\x00": 1}),
]


@pytest.mark.parametrize("method, path, body", WRITES, ids=[w[1].rsplit("/", 1)[-1] for w in WRITES])
def test_a_nul_in_a_json_body_is_refused(registry, one_version, settings, method, path, body):
    before = registry.count_rows()
    response = registry.client.request(method, path, json=body, headers=registry.act_as("bob"))
    assert response.status_code == 400, response.text
    assert "NUL" in response.json()["detail"]
    assert registry.count_rows() == before


def test_a_nul_in_pushed_metadata_is_refused(registry):
    files = registry.lora_files(1)
    registry.upload_all(files)
    response = registry.create_version(REPO, registry.manifest_for(files, metadata={"note": "a\x00"}))
    assert response.status_code == 400 and "NUL" in response.json()["detail"], response.text
    assert registry.client.get(f"/api/v1/repos/{REPO}").status_code == 404


def test_an_escaped_backslash_before_u0000_is_plain_text(registry, one_version):
    body = {"version": 1, "expected": None, "reason": "literally \\u0000"}
    response = registry.client.put(f"/api/v1/repos/{REPO}/aliases/prod", json=body)
    assert response.status_code == 200, response.text
    history = registry.client.get(f"/api/v1/repos/{REPO}/aliases/prod/history").json()
    assert history["moves"][0]["reason"] == "literally \\u0000"


@pytest.mark.parametrize(
    "path, params",
    [
        ("/api/v1/versions", {"dataset": "d\x00"}),
        ("/api/v1/versions", {"where": "acc>=0.5\x00"}),
        ("/api/v1/resolve", {"ref": "acme/bot\x00"}),
        ("/api/v1/audit", {"repo": "acme/bot", "x\x00": "1"}),
    ],
)
def test_a_nul_in_a_query_parameter_is_refused(registry, one_version, path, params):
    response = registry.client.get(path, params=params)
    assert response.status_code == 400, response.text
