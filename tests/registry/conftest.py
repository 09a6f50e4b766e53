"""Fixtures for the registry tests: a real app over a SQLite file and a blob folder in tmp_path."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from safetensors.numpy import save as save_safetensors

from deltareg.client.manifest import Manifest
from deltareg.registry.config import Settings
from deltareg.registry.main import create_app

BASE_FINGERPRINT = "tmv1:" + "ab" * 32
OTHER_FINGERPRINT = "tmv1:" + "cd" * 32
TABLES = ("repos", "versions", "version_files", "blobs", "evals")


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
    """Drives the registry through its HTTP API the way the client does, and inspects what it stored."""

    # Builders, here so test modules reach them through the fixture (conftest is not importable).
    digest_of = staticmethod(digest_of)
    safetensors_bytes = staticmethod(safetensors_bytes)
    lora_files = staticmethod(lora_files)
    manifest_for = staticmethod(manifest_for)

    def __init__(self, client: TestClient, settings: Settings) -> None:
        self.client = client
        self.settings = settings

    @property
    def blob_root(self) -> Path:
        return Path(self.settings.storage_url.removeprefix("file://"))

    def stored_blob_files(self) -> list[Path]:
        """Every file in the store, staging area included (so leftovers are caught too)."""
        return sorted(p for p in self.blob_root.rglob("*") if p.is_file())

    def count_rows(self) -> dict[str, int]:
        database = self.settings.database_url.removeprefix("sqlite:///")
        with sqlite3.connect(database) as connection:
            return {
                table: connection.execute(f"SELECT count(*) FROM {table}").fetchone()[0] for table in TABLES
            }

    def put_blob(self, data: bytes, digest: str | None = None) -> Any:
        return self.client.put(
            f"/api/v1/blobs/{digest or digest_of(data)}",
            content=data,
            headers={"content-type": "application/octet-stream"},
        )

    def upload_all(self, files: dict[str, bytes]) -> None:
        """The client's upload step: ask which blobs are missing, PUT those."""
        wanted = [{"digest": digest_of(data), "size": len(data)} for data in files.values()]
        plan = self.client.post("/api/v1/blobs/uploads", json={"blobs": wanted})
        assert plan.status_code == 200, plan.text
        by_digest = {digest_of(data): data for data in files.values()}
        for blob in plan.json()["blobs"]:
            if not blob["present"]:
                response = self.client.put(blob["upload_url"], content=by_digest[blob["digest"]])
                assert response.status_code in (200, 201), response.text

    def create_version(self, repo: str, manifest: dict[str, Any]) -> Any:
        return self.client.post(f"/api/v1/repos/{repo}/versions", json={"manifest": manifest})

    def push(self, repo: str, files: dict[str, bytes], **manifest_options: Any) -> dict[str, Any]:
        """Upload and create a version; returns the response JSON (asserting success)."""
        self.upload_all(files)
        response = self.create_version(repo, manifest_for(files, **manifest_options))
        assert response.status_code in (200, 201), response.text
        body: dict[str, Any] = response.json()
        return body


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data")


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
def registry(client: TestClient, settings: Settings) -> RegistryHelper:
    return RegistryHelper(client, settings)


@pytest.fixture
def build() -> type[RegistryHelper]:
    """The test-data builders alone (digest_of, lora_files, manifest_for, ...), without an app."""
    return RegistryHelper
