"""Application wiring: health, error rendering, settings and startup."""

from __future__ import annotations

import gc
import hashlib
import logging

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from deltareg.registry.config import Settings
from deltareg.registry.db import make_engine
from deltareg.registry.main import create_app
from deltareg.registry.storage import UnsupportedStorageURL


def test_healthz(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_unknown_route_is_404_json(client):
    response = client.get("/api/v1/nothing-here")
    assert response.status_code == 404
    assert response.json() == {"error": "not_found", "detail": "no such endpoint: GET /api/v1/nothing-here"}


def test_wrong_method_is_405_json(client):
    response = client.delete("/api/v1/repos")
    assert response.status_code == 405
    assert response.json()["error"] == "invalid_input"


def test_openapi_documents_the_routes(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/v1/blobs/uploads", "/api/v1/blobs/{digest}", "/api/v1/resolve"} <= paths.keys()
    assert {"get", "head", "put"} <= paths["/api/v1/blobs/{digest}"].keys()
    upload_body = paths["/api/v1/blobs/uploads"]["post"]["requestBody"]["content"]["application/json"]
    assert "blobs" in upload_body["schema"]["properties"]
    assert client.get("/docs").status_code == 200


def test_unhandled_error_is_a_generic_500_and_logged(client, settings, caplog):
    # Break the database under the running app: a genuine unexpected failure, not an unavailable one.
    engine = make_engine(settings.database_url)
    with engine.begin() as connection:
        dependents = ("aliases", "alias_moves", "approvals", "evals", "expected_results", "signatures")
        for table in (*dependents, "version_files", "versions"):
            connection.execute(text(f"DROP TABLE {table}"))
    engine.dispose()
    with caplog.at_level(logging.ERROR, logger="deltareg.registry"):
        response = client.get("/api/v1/versions")  # a search reads the versions table
    assert response.status_code == 500
    assert response.json() == {
        "error": "internal_error",
        "detail": "internal server error; the server log has the details "
        f"(request id {response.headers['x-request-id']})",
    }
    assert "Traceback" not in response.text and "versions" not in response.text
    assert any(record.exc_info for record in caplog.records)


def test_settings_defaults_derive_from_the_data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("DELTAREG_DATABASE_URL", raising=False)
    monkeypatch.delenv("DELTAREG_STORAGE_URL", raising=False)
    monkeypatch.setenv("DELTAREG_DATA_DIR", str(tmp_path / "d"))
    settings = Settings()
    assert settings.database_url == f"sqlite:///{tmp_path / 'd' / 'registry.db'}"
    assert settings.storage_url == (tmp_path / "d" / "blobs").as_uri()
    assert settings.auto_migrate is True
    assert settings.max_blob_bytes == 256 << 30
    assert settings.max_manifest_bytes == settings.max_json_bytes == 1 << 20


def test_auto_migrate_defaults_off_for_a_server_database(monkeypatch):
    monkeypatch.setenv("DELTAREG_DATABASE_URL", "postgresql+psycopg://u@db/registry")
    assert Settings().auto_migrate is False
    monkeypatch.setenv("DELTAREG_AUTO_MIGRATE", "true")
    assert Settings().auto_migrate is True


@pytest.mark.parametrize("url", ["s3:///no-bucket", "http://example.com/blobs", "relative/folder"])
def test_unsupported_storage_url_fails_at_startup(tmp_path, url):
    settings = Settings(data_dir=tmp_path, storage_url=url)
    with pytest.raises(UnsupportedStorageURL, match="DELTAREG_STORAGE_URL"):
        create_app(settings)


def test_data_survives_a_restart(make_registry):
    with make_registry() as registry:
        data = b"persistent"
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        assert registry.put_blob(data).status_code == 201
    with make_registry() as registry:
        assert registry.client.get(f"/api/v1/blobs/{digest}").content == data


def test_a_running_app_keeps_its_startup_objects_out_of_the_garbage_collector(settings):
    # gc.freeze: a full collection no longer walks the ~10^5 objects of the app itself (tens of ms,
    # the resolve p99 in BENCHMARKS.md); gc.unfreeze at shutdown hands them back.
    with TestClient(create_app(settings)) as client:
        assert client.get("/healthz").status_code == 200
        assert gc.get_freeze_count() > 10_000
    assert gc.get_freeze_count() == 0
