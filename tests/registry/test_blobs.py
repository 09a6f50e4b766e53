"""Blob uploads and downloads through the HTTP API, against a real blob folder and database."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from deltareg.registry.config import Settings
from deltareg.registry.main import create_app


def test_upload_plan_says_what_is_missing_and_where_to_put_it(registry):
    data = b"hello blob"
    digest = registry.digest_of(data)
    plan = registry.client.post(
        "/api/v1/blobs/uploads", json={"blobs": [{"digest": digest, "size": len(data)}]}
    )
    assert plan.status_code == 200
    assert plan.json() == {
        "blobs": [
            {"digest": digest, "size": len(data), "present": False, "upload_url": f"/api/v1/blobs/{digest}"}
        ]
    }

    assert registry.put_blob(data).status_code == 201
    again = registry.client.post(
        "/api/v1/blobs/uploads", json={"blobs": [{"digest": digest, "size": len(data)}]}
    )
    assert again.json()["blobs"][0] == {
        "digest": digest,
        "size": len(data),
        "present": True,
        "upload_url": None,
    }


def test_upload_plan_with_a_wrong_size_is_not_present(registry):
    data = b"0123456789"
    registry.put_blob(data)
    plan = registry.client.post(
        "/api/v1/blobs/uploads", json={"blobs": [{"digest": registry.digest_of(data), "size": 11}]}
    )
    assert plan.json()["blobs"][0]["present"] is False


def test_put_stores_the_blob_under_its_digest(registry):
    data = b"some weights" * 1000
    response = registry.put_blob(data)
    assert response.status_code == 201
    assert response.json() == {"digest": registry.digest_of(data), "size": len(data), "created": True}
    hex_digest = registry.digest_of(data).removeprefix("sha256:")
    stored = registry.blob_root / "sha256" / hex_digest[:2] / hex_digest
    assert stored.read_bytes() == data
    assert registry.stored_blob_files() == [stored]
    assert registry.count_rows()["blobs"] == 1


def test_second_upload_of_a_blob_stores_nothing_new(registry):
    data = b"only once"
    assert registry.put_blob(data).status_code == 201
    files_before = registry.stored_blob_files()
    mtime_before = files_before[0].stat().st_mtime_ns

    response = registry.put_blob(data)
    assert response.status_code == 200
    assert response.json() == {"digest": registry.digest_of(data), "size": len(data), "created": False}
    assert registry.stored_blob_files() == files_before
    assert files_before[0].stat().st_mtime_ns == mtime_before
    assert registry.count_rows()["blobs"] == 1


def test_digest_mismatch_leaves_no_file_and_no_row(registry):
    claimed = registry.digest_of(b"what the client said")
    response = registry.put_blob(b"what the client sent", digest=claimed)
    assert response.status_code == 400
    actual = registry.digest_of(b"what the client sent")
    assert response.json() == {
        "error": "digest_mismatch",
        "detail": f"uploaded bytes hash to {actual}, not {claimed}",
    }
    assert registry.stored_blob_files() == []
    assert registry.count_rows()["blobs"] == 0


@pytest.mark.parametrize("digest", ["sha256:abc", "md5:" + "0" * 32, "sha256:" + "A" * 64, "nope"])
def test_put_with_an_invalid_digest_is_refused(registry, digest):
    response = registry.client.put(f"/api/v1/blobs/{digest}", content=b"x")
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_input"
    assert registry.stored_blob_files() == []


@pytest.fixture
def small_limit_registry(tmp_path):
    settings = Settings(data_dir=tmp_path / "small", max_blob_bytes=1000)
    with TestClient(create_app(settings)) as client:
        yield client, settings


def _blob_files(settings: Settings) -> list:
    root = settings.data_dir.resolve() / "blobs"
    return [p for p in root.rglob("*") if p.is_file()]


def test_blob_over_the_limit_by_content_length_is_413(small_limit_registry):
    client, settings = small_limit_registry
    data = b"x" * 1001
    response = client.put(f"/api/v1/blobs/sha256:{'0' * 64}", content=data)
    assert response.status_code == 413
    assert response.json()["error"] == "payload_too_large"
    assert _blob_files(settings) == []


def test_blob_over_the_limit_while_streaming_is_413_and_leaves_no_temp_file(small_limit_registry):
    client, settings = small_limit_registry

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while streaming
        for _ in range(20):
            yield b"y" * 100

    response = client.put(f"/api/v1/blobs/sha256:{'0' * 64}", content=chunks())
    assert response.status_code == 413
    assert response.json()["error"] == "payload_too_large"
    assert _blob_files(settings) == []


def test_streamed_upload_without_content_length_is_stored(registry):
    parts = [b"a" * 70_000, b"b" * 70_000, b"c" * 10]
    data = b"".join(parts)
    response = registry.client.put(f"/api/v1/blobs/{registry.digest_of(data)}", content=iter(parts))
    assert response.status_code == 201
    assert response.json()["size"] == len(data)


def test_upload_plan_refuses_a_blob_over_the_limit(small_limit_registry):
    client, _ = small_limit_registry
    body = {"blobs": [{"digest": "sha256:" + "1" * 64, "size": 1001}]}
    response = client.post("/api/v1/blobs/uploads", json=body)
    assert response.status_code == 413


def test_download_returns_the_bytes(registry):
    data = bytes(range(256)) * 40
    registry.put_blob(data)
    response = registry.client.get(f"/api/v1/blobs/{registry.digest_of(data)}")
    assert response.status_code == 200
    assert response.content == data
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.headers["content-length"] == str(len(data))


def test_head_gives_the_size_without_the_body(registry):
    data = b"z" * 1234
    registry.put_blob(data)
    response = registry.client.head(f"/api/v1/blobs/{registry.digest_of(data)}")
    assert response.status_code == 200
    assert response.headers["content-length"] == "1234"
    assert response.content == b""


def test_range_request_returns_the_right_bytes(registry):
    data = bytes(range(256)) * 40
    registry.put_blob(data)
    url = f"/api/v1/blobs/{registry.digest_of(data)}"

    middle = registry.client.get(url, headers={"Range": "bytes=100-199"})
    assert middle.status_code == 206
    assert middle.content == data[100:200]
    assert middle.headers["content-range"] == f"bytes 100-199/{len(data)}"

    tail = registry.client.get(url, headers={"Range": f"bytes={len(data) - 10}-"})
    assert tail.status_code == 206
    assert tail.content == data[-10:]


def test_download_of_an_unknown_blob_is_404(registry):
    response = registry.client.get(f"/api/v1/blobs/sha256:{'e' * 64}")
    assert response.status_code == 404
    assert response.json()["error"] == "blob_not_found"


@pytest.mark.parametrize(
    ("digest", "status", "code"),
    [
        ("sha256:..registry.db", 400, "invalid_input"),
        ("sha256:%2E%2E", 400, "invalid_input"),
        ("sha256:..%2F..%2Fregistry.db", 404, "not_found"),  # a '/' makes it another (unknown) route
    ],
)
def test_download_with_an_invalid_digest_never_reads_a_file(registry, digest, status, code):
    response = registry.client.get(f"/api/v1/blobs/{digest}")
    assert response.status_code == status
    assert response.json()["error"] == code


@pytest.mark.parametrize(
    "body",
    [
        {"blobs": []},
        {"blobs": [{"digest": "sha256:xyz", "size": 1}]},
        {"blobs": [{"digest": "sha256:" + "0" * 64, "size": -1}]},
        {"blobs": [{"digest": "sha256:" + "0" * 64, "size": 1}] * 257},
        {"blobs": [{"digest": "sha256:" + "0" * 64, "size": 1, "extra": True}]},
        {"other": 1},
        [],
    ],
)
def test_invalid_upload_plan_requests_are_400(registry, body):
    response = registry.client.post("/api/v1/blobs/uploads", json=body)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_input"


def test_upload_plan_body_that_is_not_json_is_400(registry):
    response = registry.client.post(
        "/api/v1/blobs/uploads", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_input"


def test_upload_plan_body_over_the_json_limit_is_413(tmp_path):
    settings = Settings(data_dir=tmp_path / "d", max_json_bytes=100)
    body = {"blobs": [{"digest": "sha256:" + "0" * 64, "size": 1}] * 3}
    with TestClient(create_app(settings)) as client:
        response = client.post("/api/v1/blobs/uploads", json=body)
    assert response.status_code == 413
    assert response.json()["error"] == "payload_too_large"
