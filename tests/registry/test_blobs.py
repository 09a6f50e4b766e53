"""Blob uploads and downloads through the HTTP API, on every backend (see conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.mark.backends("fs")
def test_upload_plan_says_what_is_missing_and_where_to_put_it(registry):
    data = b"hello blob"
    digest = registry.digest_of(data)
    plan = registry.client.post(
        "/api/v1/blobs/uploads", json={"blobs": [{"digest": digest, "size": len(data)}]}
    )
    assert plan.status_code == 200
    url = f"/api/v1/blobs/{digest}"
    assert plan.json() == {
        "blobs": [
            {
                "digest": digest,
                "size": len(data),
                "present": False,
                "upload_url": url,
                "upload": {"kind": "put", "url": url, "headers": {}},
            }
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
        "upload": None,
    }


def test_upload_plan_with_a_wrong_size_is_not_present(registry):
    data = b"0123456789"
    registry.put_blob(data)
    plan = registry.client.post(
        "/api/v1/blobs/uploads", json={"blobs": [{"digest": registry.digest_of(data), "size": 11}]}
    )
    assert plan.json()["blobs"][0]["present"] is False


def published_name(registry, digest: str) -> str:
    hex_digest = digest.removeprefix("sha256:")
    return f"{'blobs/' if registry.is_s3 else ''}sha256/{hex_digest[:2]}/{hex_digest}"


def test_put_stores_the_blob_under_its_digest(registry):
    data = b"some weights" * 1000
    digest = registry.digest_of(data)
    response = registry.put_blob(data)
    assert response.status_code == 201
    assert response.json() == {"digest": digest, "size": len(data), "created": True}
    assert registry.read_stored(digest) == data
    assert registry.stored_names() == [published_name(registry, digest)]  # no staging leftovers
    assert registry.count_rows()["blobs"] == 1


def test_second_upload_of_a_blob_stores_nothing_new(registry):
    data = b"only once"
    assert registry.put_blob(data).status_code == 201
    names_before = registry.stored_names()

    response = registry.put_blob(data)
    assert response.status_code == 200
    assert response.json() == {"digest": registry.digest_of(data), "size": len(data), "created": False}
    assert registry.stored_names() == names_before
    assert registry.count_rows()["blobs"] == 1


@pytest.mark.backends("fs")
def test_second_upload_does_not_rewrite_the_file(registry):
    data = b"only once"
    assert registry.put_blob(data).status_code == 201
    (stored,) = registry.stored_blob_files()
    mtime_before = stored.stat().st_mtime_ns
    assert registry.put_blob(data).status_code == 200
    assert stored.stat().st_mtime_ns == mtime_before


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


def test_put_with_an_invalid_digest_is_refused(registry):
    for digest in ["sha256:abc", "md5:" + "0" * 32, "sha256:" + "A" * 64, "nope"]:
        response = registry.client.put(f"/api/v1/blobs/{digest}", content=b"x")
        assert (response.status_code, response.json()["error"]) == (400, "invalid_input"), digest
    assert registry.stored_blob_files() == []


@pytest.fixture
def small_limit_registry(make_registry):
    with make_registry(max_blob_bytes=1000) as registry:
        yield registry


def test_blob_over_the_limit_by_content_length_is_413(small_limit_registry):
    registry = small_limit_registry
    data = b"x" * 1001
    response = registry.client.put(f"/api/v1/blobs/sha256:{'0' * 64}", content=data)
    assert response.status_code == 413
    assert response.json()["error"] == "payload_too_large"
    assert registry.stored_names() == []


def test_blob_over_the_limit_while_streaming_is_413_and_leaves_no_temp_file(small_limit_registry):
    registry = small_limit_registry

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while streaming
        for _ in range(20):
            yield b"y" * 100

    response = registry.client.put(f"/api/v1/blobs/sha256:{'0' * 64}", content=chunks())
    assert response.status_code == 413
    assert response.json()["error"] == "payload_too_large"
    assert registry.stored_names() == []


def test_streamed_upload_without_content_length_is_stored(registry):
    parts = [b"a" * 70_000, b"b" * 70_000, b"c" * 10]
    data = b"".join(parts)
    response = registry.client.put(f"/api/v1/blobs/{registry.digest_of(data)}", content=iter(parts))
    assert response.status_code == 201
    assert response.json()["size"] == len(data)


def test_upload_plan_refuses_a_blob_over_the_limit(small_limit_registry):
    body = {"blobs": [{"digest": "sha256:" + "1" * 64, "size": 1001}]}
    response = small_limit_registry.client.post("/api/v1/blobs/uploads", json=body)
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


def test_download_with_an_invalid_digest_never_reads_a_file(registry):
    cases = [
        ("sha256:..registry.db", 400, "invalid_input"),
        ("sha256:%2E%2E", 400, "invalid_input"),
        ("sha256:..%2F..%2Fregistry.db", 404, "not_found"),  # a '/' makes it another (unknown) route
    ]
    for digest, status, code in cases:
        response = registry.client.get(f"/api/v1/blobs/{digest}")
        assert (response.status_code, response.json()["error"]) == (status, code), digest


INVALID_PLAN_BODIES = [
    {"blobs": []},
    {"blobs": [{"digest": "sha256:xyz", "size": 1}]},
    {"blobs": [{"digest": "sha256:" + "0" * 64, "size": -1}]},
    {"blobs": [{"digest": "sha256:" + "0" * 64, "size": 1}] * 257},
    {"blobs": [{"digest": "sha256:" + "0" * 64, "size": 1, "extra": True}]},
    {"other": 1},
    [],
]


def test_invalid_upload_plan_requests_are_400(registry):
    for body in INVALID_PLAN_BODIES:
        response = registry.client.post("/api/v1/blobs/uploads", json=body)
        assert (response.status_code, response.json()["error"]) == (400, "invalid_input"), str(body)[:80]


def test_invalid_download_and_complete_requests_are_400(registry):
    bad_downloads = [
        {"digests": []},
        {"digests": ["sha256:xyz"]},
        {"digests": ["sha256:" + "0" * 64] * 257},
        {},
    ]
    for body in bad_downloads:
        response = registry.client.post("/api/v1/blobs/downloads", json=body)
        assert (response.status_code, response.json()["error"]) == (400, "invalid_input"), str(body)[:80]
    digest = registry.digest_of(b"x")
    for body in [{"parts": [{"number": 0, "etag": "x"}]}, {"upload_id": None, "extra": 1}, []]:
        response = registry.client.post(f"/api/v1/blobs/{digest}/complete", json=body)
        assert (response.status_code, response.json()["error"]) == (400, "invalid_input"), str(body)
    response = registry.client.post("/api/v1/blobs/sha256:nope/complete", json={})
    assert (response.status_code, response.json()["error"]) == (400, "invalid_input")


def test_upload_plan_body_that_is_not_json_is_400(registry):
    response = registry.client.post(
        "/api/v1/blobs/uploads", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_input"


def test_upload_plan_body_over_the_json_limit_is_413(make_registry):
    body = {"blobs": [{"digest": "sha256:" + "0" * 64, "size": 1}] * 3}
    with make_registry(max_json_bytes=100) as registry:
        response = registry.client.post("/api/v1/blobs/uploads", json=body)
    assert response.status_code == 413
    assert response.json()["error"] == "payload_too_large"


def test_download_plan_gives_a_url_per_blob_that_takes_ranges(registry):
    blobs = [b"first blob " * 50, b"second blob " * 70]
    for data in blobs:
        registry.upload(data)
    digests = [registry.digest_of(data) for data in blobs]
    plan = registry.client.post("/api/v1/blobs/downloads", json={"digests": digests})
    assert plan.status_code == 200
    targets = plan.json()["blobs"]
    assert [(t["digest"], t["size"]) for t in targets] == [(registry.digest_of(d), len(d)) for d in blobs]
    if not registry.is_s3:
        assert [t["url"] for t in targets] == [f"/api/v1/blobs/{digest}" for digest in digests]
    for target, data in zip(targets, blobs, strict=True):
        assert registry.transfer("GET", target["url"]).content == data
        tail = registry.transfer("GET", target["url"], headers={"Range": "bytes=100-"})
        assert (tail.status_code, tail.content) == (206, data[100:])


def test_download_plan_of_a_blob_that_is_not_recorded_is_404(registry):
    registry.upload(b"known")
    unknown = registry.digest_of(b"unknown")
    response = registry.client.post(
        "/api/v1/blobs/downloads", json={"digests": [registry.digest_of(b"known"), unknown]}
    )
    assert response.status_code == 404
    assert response.json() == {"error": "blob_not_found", "detail": f"blob {unknown} is not in the registry"}


def test_complete_after_an_upload_through_the_api_is_a_no_op(registry):
    # The filesystem plan's PUT stores and records the blob itself; complete then only confirms it.
    data = b"put then complete"
    registry.upload(data)
    response = registry.complete(registry.digest_of(data))
    assert response.json() == {"digest": registry.digest_of(data), "size": len(data), "created": False}
    assert registry.count_rows()["blobs"] == 1
