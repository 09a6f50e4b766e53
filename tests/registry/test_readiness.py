"""GET /readyz answers 503 naming the problem when the database or the store cannot be reached; the cases
test_faults.py and test_storage.py do not already cover (a bucket that does not exist, a PostgreSQL
database that went away, a blob folder that went away)."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import make_url


def assert_not_ready(response: Any, *fragments: str) -> None:
    assert response.status_code == 503, response.text
    body = response.json()
    assert body["error"] == "service_unavailable"
    for fragment in fragments:
        assert fragment in body["detail"], body["detail"]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.backends("s3")
def test_readyz_names_an_object_store_nobody_answers_at(make_registry):
    endpoint = f"http://127.0.0.1:{closed_port()}"
    overrides = {"s3_endpoint_url": endpoint, "s3_max_attempts": 1, "storage_url": "s3://nowhere/registry"}
    with make_registry(**overrides) as registry:
        assert_not_ready(registry.client.get("/readyz"), f"object store unreachable at {endpoint}")
        assert registry.client.get("/healthz").status_code == 200  # alive, only not ready


@pytest.mark.backends("sqlite")
def test_readyz_names_a_sqlite_database_whose_folder_went_away(registry):
    # The volume holding the database is gone: new connections cannot open the file.
    folder = Path(make_url(registry.settings.database_url).database or "").parent
    registry.client.app.state.database.engine.dispose()  # no pooled connection keeps the old file open
    shutil.rmtree(folder)
    assert_not_ready(
        registry.client.get("/readyz"), "database unavailable", "unable to open database file", str(folder)
    )
    assert registry.client.get("/healthz").status_code == 200
