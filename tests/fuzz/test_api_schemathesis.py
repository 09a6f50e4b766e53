"""Bounded fuzzing of the registry API from its own OpenAPI schema, with schemathesis (issue 6, item 4).

Every operation of ``app.openapi()`` gets requests made from its schema, valid and invalid (schemathesis'
examples, coverage and fuzzing phases: wrong types, missing fields, out-of-range numbers, odd strings in
paths and queries), sent in-process to an app on the real PostgreSQL with the admin token. The property
is the one hostile input must keep: never a 5xx (``not_a_server_error``), whatever the request.

Random path parameters rarely name anything that exists, so the registry is seeded with a pushed version
and an alias first, and half of the examples aim at them (``fuzz/model``, version 1, alias ``prod``): the
handlers then get past "not found" into their real work with fuzzed bodies and queries.

Bounded and reproducible: deterministic generation, no example database, a few examples per operation.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from _support.auth import TEST_TOKEN, bearer
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error

from deltareg.client.manifest import Manifest
from deltareg.client.weights import encode_header
from deltareg.registry.config import Settings
from deltareg.registry.main import create_app

pytestmark = pytest.mark.slow  # about a minute on the real PostgreSQL; part of the default run

SEEDED = {"namespace": "fuzz", "name": "model", "number": 1, "alias": "prod"}
BASE_FINGERPRINT = "tmv1:" + "ab" * 32


def _openapi_document() -> dict[str, Any]:
    """The app's schema, from an app that is never started (the routes do not depend on the settings)."""
    with tempfile.TemporaryDirectory() as folder:
        document: dict[str, Any] = create_app(Settings(data_dir=Path(folder))).openapi()
    return document


schema = schemathesis.openapi.from_dict(_openapi_document())
schema.config.phases.update(phases=["examples", "coverage", "fuzzing"])
schema.config.generation.update(max_examples=20, deterministic=True, database="none")


class _WithoutLifespan:
    """The app as schemathesis calls it: the lifespan (migrations, database pool) is the fixture's
    TestClient's, started and stopped with the test; schemathesis would keep its own running until the
    process exits."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            raise RuntimeError("the lifespan is run by the test's TestClient")  # = "no lifespan support"
        await self.app(scope, receive, send)


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _seed(client: TestClient) -> None:
    """Push ``fuzz/model`` version 1 (a tiny LoRA adapter) and point the alias ``prod`` at it."""
    rank, width = 2, 4
    tensors = [
        ("base_model.model.layer.lora_A.weight", "F32", (rank, width)),
        ("base_model.model.layer.lora_B.weight", "F32", (width, rank)),
    ]
    files = {
        "adapter_config.json": json.dumps(
            {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["layer"]}
        ).encode(),
        "adapter_model.safetensors": encode_header(tensors) + bytes(4 * 2 * rank * width),
    }
    for data in files.values():
        response = client.put(
            f"/api/v1/blobs/{_digest(data)}",
            content=data,
            headers={"content-type": "application/octet-stream"},
        )
        assert response.status_code in (200, 201), response.text
    manifest = Manifest.parse(
        {
            "kind": "lora",
            "files": [
                {"path": path, "digest": _digest(data), "size": len(data)}
                for path, data in sorted(files.items())
            ],
            "base": {"fingerprint": BASE_FINGERPRINT},
            "params": {"rank": rank},
        }
    )
    repo = f"{SEEDED['namespace']}/{SEEDED['name']}"
    response = client.post(f"/api/v1/repos/{repo}/versions", json={"manifest": manifest.to_json_obj()})
    assert response.status_code in (200, 201), response.text
    response = client.put(
        f"/api/v1/repos/{repo}/aliases/{SEEDED['alias']}", json={"version": 1, "expected": None}
    )
    assert response.status_code == 200, response.text


@pytest.fixture
def seeded_client(tmp_path: Path, migrated_postgres_database: str) -> Iterator[TestClient]:
    """A TestClient (admin token) of a seeded registry on this test's own PostgreSQL database."""
    settings = Settings(data_dir=tmp_path / "data", database_url=migrated_postgres_database)
    with TestClient(create_app(settings), headers=bearer(TEST_TOKEN)) as client:
        _seed(client)
        yield client


@pytest.fixture
def fuzzed_app(seeded_client: TestClient) -> _WithoutLifespan:
    return _WithoutLifespan(seeded_client.app)  # type: ignore[arg-type]


def _aim_at_seeded(case: schemathesis.Case) -> None:
    """Point the path parameters the seeded data has values for at them (the others stay fuzzed)."""
    path = case.path_parameters or {}
    for name, value in SEEDED.items():
        if name in path:
            path[name] = value


@schema.parametrize()
@schema.given(aim=st.booleans())
@settings(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
def test_no_request_gets_a_server_error(case: schemathesis.Case, aim: bool, fuzzed_app: Any) -> None:
    if aim:
        _aim_at_seeded(case)
    response = case.call(app=fuzzed_app, headers=bearer(TEST_TOKEN))
    case.validate_response(response, checks=[not_a_server_error])


# ---------------------------------------------------------------------------------------------------
# What schemathesis does not send: bodies that are not JSON, or JSON that only Python reads (NaN).

JSON_BODY_OPERATIONS = [
    (path, method)
    for path, methods in schema.raw_schema["paths"].items()
    for method, operation in methods.items()
    if "application/json" in operation.get("requestBody", {}).get("content", {})
]
# Values for the path parameters the seeded data has none for: well-formed, naming nothing.
OTHER_PATH_VALUES = {
    "digest": "sha256:" + "0" * 64,
    "token_id": 1,
    "key_id": "ed25519:" + "0" * 32,
    "base_dtype": "BF16",
}
DEEP = 100_000
HOSTILE_BODIES = {
    "empty": b"",
    "truncated": b'{"manifest": {',
    "deeply nested": b"[" * DEEP + b"]" * DEEP,
    "deeply nested object": b'{"a":' * DEEP + b"1" + b"}" * DEEP,
    "not UTF-8": b'{"name": "\xff\xfe"}',
    "lone surrogate": b'{"name": "\\ud800", "version": 1}',
    "NaN": b'{"version": NaN, "value": NaN}',
    "huge number": b'{"version": 1e999999, "to": ' + b"9" * 5000 + b"}",
    "NUL": b'{"name": "a\\u0000b"}',
}


def _url(path: str) -> str:
    values = {**OTHER_PATH_VALUES, **SEEDED}
    return path.format(**{name: values[name] for name in values if "{" + name + "}" in path})


@pytest.mark.parametrize("path, method", JSON_BODY_OPERATIONS)
def test_hostile_json_bodies_get_a_client_error(seeded_client: TestClient, path: str, method: str) -> None:
    for label, body in HOSTILE_BODIES.items():
        response = seeded_client.request(
            method, _url(path), content=body, headers={"content-type": "application/json"}
        )
        assert 400 <= response.status_code < 500, f"{label}: {response.status_code} {response.text[:300]}"


def _with_nan(value: Any) -> Any:
    """``value`` with every number NaN and every free-form object given a NaN member."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return math.nan
    if isinstance(value, list):
        return [_with_nan(item) for item in value]
    return {**{key: _with_nan(item) for key, item in value.items()}, "nan": math.nan}


@pytest.mark.parametrize("path, method", JSON_BODY_OPERATIONS)
@settings(
    max_examples=8,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_nan_in_valid_bodies_gets_a_client_error(
    seeded_client: TestClient, path: str, method: str, data: st.DataObject
) -> None:
    """NaN is not JSON, but Python's and pydantic's parsers read it: it must be refused (or dropped), not
    reach a database that refuses it."""
    seeded = {name: value for name, value in SEEDED.items() if "{" + name + "}" in path}
    case = data.draw(schema[path][method.upper()].as_strategy(path_parameters=seeded))
    body = json.dumps(_with_nan(case.body), allow_nan=True).encode()
    response = seeded_client.request(
        method, case.formatted_path, content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code < 500, f"{body[:300]!r}: {response.status_code} {response.text[:300]}"


# Requests that once got a 500 (found by this fuzzing), kept as fixed examples.
KNOWN_HOSTILE_REQUESTS = [
    ("POST", f"/api/v1/tokens/{2**37}/revoke"),  # beyond the INTEGER column
    ("GET", f"/api/v1/audit?before_id={2**57}"),
    ("GET", "/api/v1/versions?cursor=99999999999"),
    ("GET", "/api/v1/versions?cursor=%C2%B2"),  # "²": isdigit() but not int()
    (
        "GET",
        "/api/v1/repos/fuzz/model/aliases/prod/at?time=0001-01-01T01%3A00%3A00%2B01%3A01",
    ),  # < year 1 in UTC
]


@pytest.mark.parametrize("method, url", KNOWN_HOSTILE_REQUESTS)
def test_known_hostile_requests_get_a_client_error(seeded_client: TestClient, method: str, url: str) -> None:
    response = seeded_client.request(method, url)
    assert 400 <= response.status_code < 500, f"{response.status_code} {response.text[:300]}"
    assert response.json()["error"]  # our error body, with its code
