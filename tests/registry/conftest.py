"""Fixtures for the registry tests: a real app on each backend pair of the test matrix.

Every test that uses ``settings`` (and so ``client`` / ``registry``) runs on four backends:
``sqlite-fs``, ``sqlite-s3``, ``postgres-fs``, ``postgres-s3`` (database - blob store). PostgreSQL is the
real server (a database of the test's own, see tests/conftest.py); S3 is moto's server on loopback (a
bucket of the test's own). A test about one kind of backend says so with a marker naming backends or
groups of them: ``@pytest.mark.backends("fs")`` (both filesystem pairs), ``"s3"``, ``"sqlite"``,
``"postgres"``, or full names like ``"postgres-s3"``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from _support.auth import TEST_TOKEN, act_as, bearer
from _support.checksums import part_crc32s
from fastapi.testclient import TestClient
from safetensors.numpy import save as save_safetensors
from sqlalchemy import text
from starlette import testclient as starlette_testclient

from deltareg.client.manifest import Manifest
from deltareg.registry.config import Settings
from deltareg.registry.db import make_engine
from deltareg.registry.main import create_app

BASE_FINGERPRINT = "tmv1:" + "ab" * 32
OTHER_FINGERPRINT = "tmv1:" + "cd" * 32
TABLES = ("repos", "versions", "version_files", "blobs", "evals")

ALL_BACKENDS = ("sqlite-fs", "sqlite-s3", "postgres-fs", "postgres-s3")
S3_PREFIX = "registry"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "backends(*names): run this registry test only on these backends (default: all four)"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("backends")
        chosen = _backends(marker.args) if marker else list(ALL_BACKENDS)
        metafunc.parametrize("backend", chosen, indirect=True)


def _backends(names: tuple[str, ...]) -> list[str]:
    """Backends named (``sqlite-fs``) or by group (``fs``, ``s3``, ``sqlite``, ``postgres``), in order."""
    chosen = [b for b in ALL_BACKENDS if any(name == b or name in b.split("-") for name in names)]
    unknown = [n for n in names if not any(n == b or n in b.split("-") for b in ALL_BACKENDS)]
    assert chosen and not unknown, (
        f"unknown backends {unknown}; use {ALL_BACKENDS} or fs, s3, sqlite, postgres"
    )
    return chosen


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def safetensors_bytes(seed: int = 0, rank: int = 2) -> bytes:
    """A tiny, valid LoRA-shaped safetensors file (different bytes for each seed)."""
    rng = np.random.default_rng(seed)
    tensors = {
        "base_model.model.layer.lora_A.weight": rng.standard_normal((rank, 4)).astype(np.float32),
        "base_model.model.layer.lora_B.weight": rng.standard_normal((4, rank)).astype(np.float32),
    }
    return save_safetensors(tensors, metadata={"format": "pt"})


def adapter_config_bytes(rank: int = 2) -> bytes:
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["layer"]}
    return json.dumps(config).encode()


def lora_files(seed: int = 0) -> dict[str, bytes]:
    return {
        "adapter_config.json": adapter_config_bytes(),
        "adapter_model.safetensors": safetensors_bytes(seed),
    }


def manifest_for(
    files: dict[str, bytes],
    *,
    fingerprint: str = BASE_FINGERPRINT,
    parent: str | None = None,
    metadata: dict[str, Any] | None = None,
    sizes: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Manifest JSON as the client produces it (Manifest.to_json_obj)."""
    entries = [
        {"path": path, "digest": digest_of(data), "size": (sizes or {}).get(path, len(data))}
        for path, data in sorted(files.items())
    ]
    manifest = Manifest.model_validate(
        {
            "kind": "lora",
            "files": entries,
            "base": {"fingerprint": fingerprint},
            "parent": parent,
            "params": {"rank": 2},
            "metadata": metadata or {},
        }
    )
    return manifest.to_json_obj()


class RegistryHelper:
    """Drives the registry through its HTTP API the way the client does, and inspects what it stored.

    Uploads follow the upload plan: a relative URL is the registry's own, an absolute one a presigned S3
    URL (the test client sends those to moto for real, see ``app_client``), and direct uploads are
    finished with ``POST /api/v1/blobs/<digest>/complete``.
    """

    # Builders, here so test modules reach them through the fixture (conftest is not importable).
    digest_of = staticmethod(digest_of)
    safetensors_bytes = staticmethod(safetensors_bytes)
    lora_files = staticmethod(lora_files)
    manifest_for = staticmethod(manifest_for)

    def act_as(self, name: str) -> dict[str, str]:
        """Headers of a request made by ``name`` (an admin token of that name; see _support.auth)."""
        return act_as(self.client, name)

    def __init__(self, client: TestClient, settings: Settings, moto: Any = None) -> None:
        self.client = client
        self.settings = settings
        self.moto = moto

    @property
    def is_s3(self) -> bool:
        return self.settings.storage_url.startswith("s3://")

    @property
    def bucket(self) -> str:
        return self.settings.storage_url.removeprefix("s3://").split("/", 1)[0]

    @property
    def blob_root(self) -> Path:
        """The blob folder (filesystem backends only)."""
        if self.is_s3:
            raise AssertionError(
                'blob_root is a filesystem notion: mark the test @pytest.mark.backends("fs")'
            )
        return Path(self.settings.storage_url.removeprefix("file://"))

    # ---- what the store holds

    def stored_blob_files(self) -> list[Any]:
        """Everything in the store, staging and unfinished multipart uploads included (so leftovers are
        caught too): paths on the filesystem, keys (and ``multipart:<key>``) on S3."""
        if not self.is_s3:
            return sorted(p for p in self.blob_root.rglob("*") if p.is_file())
        s3 = self.moto.client()
        keys = [
            item["Key"]
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket)
            for item in page.get("Contents", [])
        ]
        uploads = s3.list_multipart_uploads(Bucket=self.bucket).get("Uploads", [])
        return sorted(keys + [f"multipart:{upload['Key']}" for upload in uploads])

    def stored_names(self) -> list[str]:
        """``stored_blob_files`` relative to the store's root, as strings: ``sha256/ab/<hex>``,
        ``tmp/...`` (filesystem) or ``blobs/sha256/ab/<hex>``, ``uploads/...`` (S3)."""
        if not self.is_s3:
            return [str(p.relative_to(self.blob_root)) for p in self.stored_blob_files()]
        return [name.replace(f"{S3_PREFIX}/", "", 1) for name in self.stored_blob_files()]

    def published(self) -> dict[str, int]:
        """The store's published blobs: digest -> size."""
        return {blob.digest: blob.size for blob in self.client.app.state.store.iter_blobs()}  # type: ignore[attr-defined]

    def read_stored(self, digest: str) -> bytes:
        store = self.client.app.state.store  # type: ignore[attr-defined]
        size = store.size_of(digest)
        assert size is not None, f"{digest} is not stored"
        data: bytes = store.read_range(digest, 0, size) if size else b""
        return data

    def delete_stored(self, digest: str) -> None:
        """Remove the bytes of a blob behind the registry's back (its row stays)."""
        self.client.app.state.store.delete(digest)  # type: ignore[attr-defined]

    def count_rows(self) -> dict[str, int]:
        engine = make_engine(self.settings.database_url)
        try:
            with engine.connect() as connection:
                return {
                    table: connection.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()
                    for table in TABLES
                }
        finally:
            engine.dispose()

    # ---- the client's side of the protocol

    def put_blob(self, data: bytes, digest: str | None = None) -> Any:
        """PUT the bytes through the registry API (works on every store)."""
        return self.client.put(
            f"/api/v1/blobs/{digest or digest_of(data)}",
            content=data,
            headers={"content-type": "application/octet-stream"},
        )

    def plan(
        self, blobs: dict[str, bytes] | list[bytes], *, part_size: int | None = None
    ) -> list[dict[str, Any]]:
        """The upload plan; with ``part_size``, each blob comes with that part layout and its CRC32s."""
        values = list(blobs.values()) if isinstance(blobs, dict) else blobs
        wanted = [{"digest": digest_of(data), "size": len(data)} for data in values]
        if part_size is not None:
            for blob, data in zip(wanted, values, strict=True):
                blob["parts"] = {"part_size": part_size, "crc32": part_crc32s(data, part_size)}
        response = self.client.post("/api/v1/blobs/uploads", json={"blobs": wanted})
        assert response.status_code == 200, response.text
        targets: list[dict[str, Any]] = response.json()["blobs"]
        return targets

    def send(self, target: dict[str, Any], data: bytes) -> dict[str, Any]:
        """Transfer ``data`` as the plan ``target`` says, without completing; returns the complete body."""
        upload = target["upload"]
        if upload["kind"] == "put":
            response = self.transfer("PUT", upload["url"], content=data, headers=upload["headers"])
            assert response.status_code in (200, 201), response.text
            return {"upload_id": None, "parts": []}
        parts = []
        for part in upload["parts"]:
            chunk = data[part["offset"] : part["offset"] + part["size"]]
            response = self.transfer("PUT", part["url"], content=chunk, headers=part.get("headers") or {})
            assert response.status_code == 200, response.text
            listed = {"number": part["number"], "etag": response.headers["etag"]}
            if part.get("checksum_crc32"):
                listed["checksum_crc32"] = part["checksum_crc32"]
            parts.append(listed)
        return {"upload_id": upload["upload_id"], "parts": parts}

    def complete(self, digest: str, body: dict[str, Any] | None = None) -> Any:
        return self.client.post(
            f"/api/v1/blobs/{digest}/complete", json=body or {"upload_id": None, "parts": []}
        )

    def transfer(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """A request to a URL from the registry: relative ones to the registry, absolute ones (presigned)
        straight to the store."""
        response: httpx.Response = self.client.request(method, url, **kwargs)
        return response

    def upload(self, data: bytes) -> dict[str, Any]:
        """Plan, transfer and complete one blob; returns the complete (or PUT) response JSON."""
        (target,) = self.plan([data])
        if target["present"]:
            return {"digest": target["digest"], "size": target["size"], "created": False}
        body = self.send(target, data)
        response = self.complete(target["digest"], body)
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    def upload_all(self, files: dict[str, bytes]) -> None:
        """The client's upload step: ask which blobs are missing, transfer and complete those."""
        by_digest = {digest_of(data): data for data in files.values()}
        for target in self.plan(files):
            if not target["present"]:
                body = self.send(target, by_digest[target["digest"]])
                response = self.complete(target["digest"], body)
                assert response.status_code == 200, response.text

    def download(self, digest: str, headers: dict[str, str] | None = None) -> httpx.Response:
        """Follow the download plan for one blob."""
        plan = self.client.post("/api/v1/blobs/downloads", json={"digests": [digest]})
        assert plan.status_code == 200, plan.text
        return self.transfer("GET", plan.json()["blobs"][0]["url"], headers=headers or {})

    def create_version(self, repo: str, manifest: dict[str, Any]) -> Any:
        return self.client.post(f"/api/v1/repos/{repo}/versions", json={"manifest": manifest})

    def push(self, repo: str, files: dict[str, bytes], **manifest_options: Any) -> dict[str, Any]:
        """Upload and create a version; returns the response JSON (asserting success)."""
        self.upload_all(files)
        response = self.create_version(repo, manifest_for(files, **manifest_options))
        assert response.status_code in (200, 201), response.text
        body: dict[str, Any] = response.json()
        return body


# The HTTP library Starlette's TestClient is built on (httpx2 when installed, else httpx).
_TESTCLIENT_HTTP: Any = starlette_testclient.httpx


class _RegistryOrStore(_TESTCLIENT_HTTP.BaseTransport):  # type: ignore[misc]
    """Requests to the test client's own host go to the app; any other URL (a presigned S3 URL, or a
    redirect to one) goes over the network, as a real client's would."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.network = _TESTCLIENT_HTTP.HTTPTransport()

    def handle_request(self, request: Any) -> Any:
        if request.url.host == "testserver":
            return self.app.handle_request(request)
        return self.network.handle_request(request)

    def close(self) -> None:
        self.network.close()


@contextmanager
def app_client(settings: Settings) -> Iterator[TestClient]:
    """A TestClient of an app for ``settings`` that also reaches the S3 store (see _RegistryOrStore)."""
    with TestClient(create_app(settings), headers=bearer(TEST_TOKEN)) as client:
        client._transport = _RegistryOrStore(client._transport)  # no public hook for this in httpx
        yield client


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    """``<database>-<store>`` of this test run (parametrized by pytest_generate_tests)."""
    name: str = request.param
    return name


@pytest.fixture
def make_settings(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Callable[..., Settings]:
    """Settings for this test's backend with ``overrides``; every call shares the test's database and
    bucket (so two apps made from them see the same registry)."""
    database, store = backend.split("-")
    shared: dict[str, Any] = {"data_dir": tmp_path / "data"}
    if database == "postgres":
        shared["database_url"] = request.getfixturevalue("migrated_postgres_database")
    if store == "s3":
        moto = request.getfixturevalue("moto_s3")
        shared["storage_url"] = f"s3://{moto.make_bucket()}/{S3_PREFIX}"
        shared["s3_endpoint_url"] = moto.endpoint_url

    def make(**overrides: Any) -> Settings:
        return Settings(**{**shared, **overrides})

    return make


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with app_client(settings) as client:
        yield client


@pytest.fixture
def registry(client: TestClient, settings: Settings, request: pytest.FixtureRequest) -> RegistryHelper:
    moto = request.getfixturevalue("moto_s3") if settings.storage_url.startswith("s3://") else None
    return RegistryHelper(client, settings, moto)


@pytest.fixture
def make_registry(
    make_settings: Callable[..., Settings], request: pytest.FixtureRequest
) -> Callable[..., Any]:
    """``with make_registry(**settings_overrides) as registry:`` another app on this test's backend."""

    @contextmanager
    def make(**overrides: Any) -> Iterator[RegistryHelper]:
        settings = make_settings(**overrides)
        s3 = settings.storage_url.startswith("s3://")
        moto = request.getfixturevalue("moto_s3") if s3 else None
        with app_client(settings) as client:
            yield RegistryHelper(client, settings, moto)

    return make


@pytest.fixture
def build() -> type[RegistryHelper]:
    """The test-data builders alone (digest_of, lora_files, manifest_for, ...), without an app."""
    return RegistryHelper
