"""The blob transfer protocol on S3 (moto): presigned uploads and downloads, verification at complete.

moto accepts any body on a presigned PUT and does not check x-amz-checksum-sha256, so these tests also
show that the server's own check (reading the upload back) catches what the store lets through.
"""

from __future__ import annotations

import base64
import hashlib
import os
import threading
import time
from urllib.parse import parse_qs, urlsplit

import pytest
from _support.checksums import part_crc32s

from deltareg.client.errors import MissingBlob
from deltareg.registry.config import MIB
from deltareg.registry.storage import s3 as s3_store
from deltareg.registry.storage.s3 import S3BlobStore, S3Location, _part_size, make_s3_client

pytestmark = pytest.mark.backends("s3")
REPO = "acme/bot"


def checksum_of(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def uploads_in_progress(registry) -> list[str]:
    return [name for name in registry.stored_blob_files() if name.startswith("multipart:")]


def test_a_small_blob_uploads_with_one_presigned_put_carrying_its_checksum(registry):
    data = b"small weights" * 100
    digest = registry.digest_of(data)
    (target,) = registry.plan([data])

    upload = target["upload"]
    assert target["present"] is False
    assert upload["kind"] == "put"
    assert target["upload_url"] == upload["url"]
    assert upload["url"].startswith(f"{registry.settings.s3_endpoint_url}/{registry.bucket}/")
    assert upload["headers"] == {
        "Content-Type": "application/octet-stream",
        "Content-Length": str(len(data)),
        "x-amz-checksum-sha256": checksum_of(data),
    }
    query = parse_qs(urlsplit(upload["url"]).query)
    assert query["X-Amz-Expires"] == ["900"]
    assert "x-amz-checksum-sha256" in query["X-Amz-SignedHeaders"][0]

    body = registry.send(target, data)
    assert registry.stored_names() != [f"blobs/sha256/{digest[7:9]}/{digest[7:]}"]  # staged, not published
    response = registry.complete(digest, body)
    assert response.status_code == 200, response.text
    assert response.json() == {"digest": digest, "size": len(data), "created": True}
    assert registry.stored_names() == [f"blobs/sha256/{digest[7:9]}/{digest[7:]}"]  # staging removed
    assert registry.read_stored(digest) == data
    assert registry.count_rows()["blobs"] == 1
    assert registry.plan([data])[0]["present"] is True


def test_presigned_urls_expire_after_the_configured_time(make_registry):
    with make_registry(presign_seconds=120) as registry:
        (target,) = registry.plan([b"x"])
    assert parse_qs(urlsplit(target["upload"]["url"]).query)["X-Amz-Expires"] == ["120"]


def test_complete_again_is_a_no_op(registry):
    data = b"complete me twice"
    registry.upload(data)
    again = registry.complete(registry.digest_of(data))
    assert again.status_code == 200
    assert again.json() == {"digest": registry.digest_of(data), "size": len(data), "created": False}
    assert registry.count_rows()["blobs"] == 1


def test_bytes_that_do_not_match_the_digest_are_refused_at_complete_and_removed(registry):
    claimed = b"what the client said"
    (target,) = registry.plan([claimed])
    sent = b"what the client sent"
    put = target["upload"]
    headers = {**put["headers"], "Content-Length": str(len(sent))}
    assert registry.transfer("PUT", put["url"], content=sent, headers=headers).status_code == 200  # moto

    response = registry.complete(target["digest"])
    assert response.status_code == 400
    assert response.json() == {
        "error": "digest_mismatch",
        "detail": f"uploaded bytes hash to {registry.digest_of(sent)}, not {target['digest']}",
    }
    assert registry.stored_names() == []
    assert registry.count_rows()["blobs"] == 0
    assert registry.plan([claimed])[0]["present"] is False


def lying_upload(registry, claimed: bytes, sent: bytes) -> str:
    """PUT ``sent`` to the URL planned for ``claimed``, telling the store it has ``claimed``'s checksum.

    moto records the declared checksum without checking it against the body.
    """
    (target,) = registry.plan([claimed])
    headers = {
        "x-amz-sdk-checksum-algorithm": "SHA256",
        "x-amz-checksum-sha256": checksum_of(claimed),
        "Content-Length": str(len(sent)),
    }
    assert registry.transfer("PUT", target["upload"]["url"], content=sent, headers=headers).status_code == 200
    return str(target["digest"])


def test_a_checksum_the_store_only_recorded_is_not_trusted_by_default(registry):
    digest = lying_upload(registry, b"the real adapter", b"something else")
    response = registry.complete(digest)
    assert response.status_code == 400
    assert response.json()["error"] == "digest_mismatch"
    assert registry.count_rows()["blobs"] == 0


def test_trusting_store_checksums_skips_the_read_back(make_registry):
    # For stores that verify x-amz-checksum-sha256 themselves (AWS S3, MinIO). moto does not, so the
    # lie gets through here: which is exactly why the default is to read the bytes back.
    with make_registry(s3_trust_checksums=True) as registry:
        digest = lying_upload(registry, b"the real adapter", b"something else")
        response = registry.complete(digest)
    assert response.status_code == 200
    assert response.json()["created"] is True


def test_complete_without_an_upload_is_missing_blob(registry):
    digest = registry.digest_of(b"never sent")
    response = registry.complete(digest)
    assert response.status_code == 400
    assert response.json()["error"] == "missing_blob"
    assert registry.count_rows()["blobs"] == 0


@pytest.fixture
def multipart_registry(make_registry):
    with make_registry(multipart_threshold=5 * MIB, multipart_part_size=5 * MIB) as registry:
        yield registry


def object_bytes(registry, digest: str) -> bytes:
    """The object at the blob's key, read from the bucket directly (not through the store's methods)."""
    store = registry.client.app.state.store
    body: bytes = store.client.get_object(Bucket=store.bucket, Key=store.blob_key(digest))["Body"].read()
    return body


def big_blob(seed: int = 0) -> bytes:
    return hashlib.sha256(bytes([seed])).digest() * ((5 * MIB + 4096) // 32)  # 2 parts, not 5 MiB aligned


def test_a_large_blob_uploads_in_presigned_parts(multipart_registry):
    registry = multipart_registry
    data = big_blob()
    (target,) = registry.plan([data])

    upload = target["upload"]
    assert upload["kind"] == "multipart" and target["upload_url"] is None
    assert upload["part_size"] == 5 * MIB
    assert [(p["number"], p["offset"], p["size"]) for p in upload["parts"]] == [
        (1, 0, 5 * MIB),
        (2, 5 * MIB, len(data) - 5 * MIB),
    ]
    assert all(p["url"].startswith(registry.settings.s3_endpoint_url) for p in upload["parts"])

    body = registry.send(target, data)
    response = registry.complete(target["digest"], body)
    assert response.status_code == 200, response.text
    assert response.json() == {"digest": target["digest"], "size": len(data), "created": True}
    assert registry.read_stored(target["digest"]) == data
    assert object_bytes(registry, target["digest"]) == data
    assert registry.stored_names() == [f"blobs/sha256/{target['digest'][7:9]}/{target['digest'][7:]}"]


def test_a_multipart_upload_of_the_wrong_bytes_is_refused_and_removed(multipart_registry):
    registry = multipart_registry
    data = big_blob()
    (target,) = registry.plan([data])
    body = registry.send(target, big_blob(seed=1))  # same size, other bytes
    response = registry.complete(target["digest"], body)
    assert response.status_code == 400
    assert response.json()["error"] == "digest_mismatch"
    assert registry.stored_blob_files() == []
    assert registry.count_rows()["blobs"] == 0


def test_completing_a_blob_that_is_already_there_aborts_the_upload(multipart_registry):
    registry = multipart_registry
    data = big_blob()
    (target,) = registry.plan([data])
    assert uploads_in_progress(registry)
    assert registry.put_blob(data).status_code == 201  # someone else stored it meanwhile

    response = registry.complete(target["digest"], {"upload_id": target["upload"]["upload_id"], "parts": []})
    assert response.status_code == 200
    assert response.json()["created"] is False
    assert uploads_in_progress(registry) == []


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ({"upload_id": "not-ours", "parts": [{"number": 1, "etag": "x"}]}, "invalid upload_id"),
        ({"upload_id": None, "parts": [{"number": 1, "etag": "x"}]}, "without the upload_id"),
        ({"upload_id": "0" * 32 + ".id", "parts": [{"number": 2, "etag": "x"}]}, "numbered 1..N"),
        ({"upload_id": "0" * 32 + ".id", "parts": []}, "ETag of every part"),
    ],
)
def test_invalid_complete_requests_are_400(registry, body, detail):
    response = registry.complete(registry.digest_of(b"whatever"), body)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_input"
    assert detail in response.json()["detail"]


def test_a_retried_complete_of_a_finished_multipart_upload_is_a_no_op(multipart_registry):
    # The client may not have seen the first answer (a timeout) and complete again with the same body.
    registry = multipart_registry
    data = big_blob()
    (target,) = registry.plan([data])
    body = registry.send(target, data)
    assert registry.complete(target["digest"], body).json()["created"] is True
    again = registry.complete(target["digest"], body)
    assert again.status_code == 200
    assert again.json() == {"digest": target["digest"], "size": len(data), "created": False}


def test_downloads_are_presigned_urls_that_take_ranges(registry):
    version = registry.push(REPO, registry.lora_files())
    files = {f["path"]: f for f in version["manifest"]["files"]}
    entry = files["adapter_model.safetensors"]
    plan = registry.client.post("/api/v1/blobs/downloads", json={"digests": [entry["digest"]]})
    assert plan.status_code == 200
    (target,) = plan.json()["blobs"]
    assert (target["digest"], target["size"]) == (entry["digest"], entry["size"])
    assert target["url"].startswith(f"{registry.settings.s3_endpoint_url}/{registry.bucket}/")

    data = registry.lora_files()["adapter_model.safetensors"]
    assert registry.transfer("GET", target["url"]).content == data
    part = registry.transfer("GET", target["url"], headers={"Range": "bytes=8-15"})
    assert part.status_code == 206 and part.content == data[8:16]


def test_get_redirects_to_a_presigned_url(registry):
    data = b"redirected" * 10
    registry.upload(data)
    url = f"/api/v1/blobs/{registry.digest_of(data)}"

    response = registry.client.get(url, follow_redirects=False)
    assert response.status_code == 307
    assert response.headers["location"].startswith(registry.settings.s3_endpoint_url)
    assert registry.client.get(url).content == data  # followed

    head = registry.client.head(url, follow_redirects=False)
    assert head.status_code == 307 and head.headers["location"] != response.headers["location"]
    assert registry.client.head(url).headers["content-length"] == str(len(data))


def test_get_of_a_blob_that_is_not_recorded_is_404_even_if_the_object_exists(registry):
    store = registry.client.app.state.store
    key = store.blob_key(registry.digest_of(b"planted"))
    registry.moto.client().put_object(Bucket=registry.bucket, Key=key, Body=b"planted")
    response = registry.client.get(f"/api/v1/blobs/{registry.digest_of(b'planted')}", follow_redirects=False)
    assert response.status_code == 404
    assert response.json()["error"] == "blob_not_found"


def test_large_uploads_through_the_api_and_large_copies_go_in_parts(moto_s3, settings):
    # The server streams an API upload to S3 in parts, then copies it to its key in parts (as it must
    # above 5 GiB); small limits here make both happen with 11 MiB.
    bucket = moto_s3.make_bucket()
    store = S3BlobStore(
        make_s3_client(settings, moto_s3.endpoint_url),
        S3Location(bucket, "parts/"),
        endpoint_url=moto_s3.endpoint_url,
        max_single_copy_bytes=6 * MIB,
        copy_part_bytes=5 * MIB,
        stream_part_bytes=5 * MIB,
    )
    data = os.urandom(11 * MIB)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert store.receive(digest, (data[i : i + MIB] for i in range(0, len(data), MIB))) == len(data)
    assert store.read_range(digest, 0, len(data)) == data
    keys = [item["Key"] for item in moto_s3.client().list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == [store.blob_key(digest)]
    assert moto_s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_a_proposed_part_layout_is_used_with_each_parts_crc32_signed_into_its_url(multipart_registry):
    registry = multipart_registry
    data = big_blob() * 2  # 10 MiB + 8 KiB: 2 parts of 6 MiB as proposed (the server's own: 3 of 5 MiB)
    (target,) = registry.plan([data], part_size=6 * MIB)
    upload = target["upload"]
    assert upload["part_size"] == 6 * MIB
    layout = [(p["offset"], p["size"]) for p in upload["parts"]]
    assert layout == [(0, 6 * MIB), (6 * MIB, len(data) - 6 * MIB)]
    expected = part_crc32s(data, 6 * MIB)
    for part, crc32 in zip(upload["parts"], expected, strict=True):
        assert (part["checksum_crc32"], part["headers"]) == (crc32, {"x-amz-checksum-crc32": crc32})
        assert "x-amz-checksum-crc32" in parse_qs(urlsplit(part["url"]).query)["X-Amz-SignedHeaders"][0]

    response = registry.complete(target["digest"], registry.send(target, data))
    assert response.status_code == 200, response.text
    assert registry.read_stored(target["digest"]) == data


@pytest.mark.parametrize(
    ("part_size", "crc32s", "detail"),
    [
        (6 * MIB, 3, "are 2 parts, but 3 part checksums were sent"),
        (6 * MIB, 1, "are 2 parts, but 1 part checksums were sent"),
        (1 * MIB, 11, "S3 needs 5242880 to"),
    ],
)
def test_a_part_layout_the_store_cannot_take_is_400_and_starts_no_upload(
    multipart_registry, part_size, crc32s, detail
):
    registry = multipart_registry
    data = big_blob() * 2
    blob = {"digest": registry.digest_of(data), "size": len(data)}
    blob["parts"] = {"part_size": part_size, "crc32": (part_crc32s(data, part_size) * 3)[:crc32s]}
    response = registry.client.post("/api/v1/blobs/uploads", json={"blobs": [blob]})
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_input"
    assert detail in response.json()["detail"]
    assert uploads_in_progress(registry) == []


def test_a_part_size_larger_than_the_blob_is_one_part(multipart_registry):
    data = big_blob()
    (target,) = multipart_registry.plan([data], part_size=8 << 30)  # 8 GiB: over S3's largest part
    assert [(p["offset"], p["size"]) for p in target["upload"]["parts"]] == [(0, len(data))]
    response = multipart_registry.complete(target["digest"], multipart_registry.send(target, data))
    assert response.status_code == 200, response.text


def test_a_malformed_part_checksum_is_400(multipart_registry):
    data = big_blob()
    blob = {"digest": multipart_registry.digest_of(data), "size": len(data)}
    blob["parts"] = {"part_size": 6 * MIB, "crc32": ["not a crc"]}
    response = multipart_registry.client.post("/api/v1/blobs/uploads", json={"blobs": [blob]})
    assert response.status_code == 400, response.text
    assert "crc32" in response.json()["detail"]


def test_with_part_checksums_off_a_proposed_layout_is_ignored(make_registry):
    with make_registry(
        multipart_threshold=5 * MIB, multipart_part_size=5 * MIB, s3_part_checksums=False
    ) as registry:
        data = big_blob() * 2
        (target,) = registry.plan([data], part_size=6 * MIB)
        upload = target["upload"]
        assert upload["part_size"] == 5 * MIB and len(upload["parts"]) == 3
        assert all(p["checksum_crc32"] is None and p["headers"] == {} for p in upload["parts"])
        response = registry.complete(target["digest"], registry.send(target, data))
        assert response.status_code == 200, response.text


def test_part_size_grows_so_that_no_upload_needs_more_than_10000_parts():
    assert _part_size(10 * MIB, 16 * MIB) == 16 * MIB
    assert _part_size(10_000 * 16 * MIB, 16 * MIB) == 16 * MIB
    grown = _part_size(10_000 * 16 * MIB + 1, 16 * MIB)
    assert grown % MIB == 0 and grown > 16 * MIB
    assert -(-(10_000 * 16 * MIB + 1) // grown) <= 10_000


def test_presigned_urls_use_the_public_endpoint_when_one_is_set(make_registry):
    # The server reaches the store at one address (a compose network), clients at another.
    public = "http://s3.public.example:9000"
    with make_registry(s3_public_endpoint_url=public) as registry:
        data = b"signed for the public address"
        (target,) = registry.plan([data])
        assert target["upload"]["url"].startswith(f"{public}/{registry.bucket}/")
        registry.put_blob(data)  # the server itself still uses the internal endpoint
        response = registry.client.get(f"/api/v1/blobs/{registry.digest_of(data)}", follow_redirects=False)
        assert response.headers["location"].startswith(f"{public}/{registry.bucket}/")


def _plant_unverified_object(registry, digest: str, data: bytes) -> None:
    """What a crash between a multipart completion and its verification leaves: bytes at the blob's key."""
    store = registry.client.app.state.store
    store.client.put_object(Bucket=store.bucket, Key=store.blob_key(digest), Body=data)


def test_an_unverified_object_at_a_blob_key_is_never_recorded(multipart_registry):
    registry = multipart_registry
    data = big_blob()
    (target,) = registry.plan([data])
    _plant_unverified_object(registry, target["digest"], big_blob(seed=1))  # same size, other bytes

    body = registry.send(target, data)  # an honest upload of the right bytes
    response = registry.complete(target["digest"], body)
    assert response.status_code == 409, response.text
    assert "being verified" in response.json()["detail"]
    assert registry.count_rows()["blobs"] == 0
    assert (
        registry.client.post("/api/v1/blobs/downloads", json={"digests": [target["digest"]]}).status_code
        == 404
    )


def test_a_stale_unverified_object_is_removed_so_the_blob_can_be_uploaded_again(make_registry):
    with make_registry(
        multipart_threshold=5 * MIB, multipart_part_size=5 * MIB, presign_seconds=1
    ) as registry:
        data = big_blob()
        (target,) = registry.plan([data])
        _plant_unverified_object(registry, target["digest"], big_blob(seed=1))
        time.sleep(2.5)  # older than twice the lifetime of a presigned URL: nobody is verifying it
        response = registry.complete(target["digest"], registry.send(target, data))
        assert response.status_code == 400 and response.json()["error"] == "missing_blob", response.text
        assert registry.stored_blob_files() == []

        (again,) = registry.plan([data])
        assert registry.complete(again["digest"], registry.send(again, data)).json()["created"] is True
        assert registry.read_stored(again["digest"]) == data


def test_the_start_of_a_verified_blob_is_served_from_what_the_read_back_saw(multipart_registry):
    # The version commit reads each safetensors header right after the upload's complete: the first bytes
    # of the read-back are kept, so that needs no second GET. Replacing the object behind the store's back
    # shows where each answer comes from: the verified start, and the store past it.
    registry = multipart_registry
    store = registry.client.app.state.store
    data = big_blob()
    (target,) = registry.plan([data])
    digest = target["digest"]
    assert registry.complete(digest, registry.send(target, data)).status_code == 200
    other = big_blob(seed=1)
    store.client.put_object(Bucket=store.bucket, Key=store.blob_key(digest), Body=other)

    head = s3_store.HEAD_CACHE_BYTES
    assert store.read_range(digest, 0, 64 * 1024) == data[: 64 * 1024]
    assert store.read_range(digest, head - 10, 10) == data[head - 10 : head]
    assert store.read_range(digest, head - 10, 20) == other[head - 10 : head + 10]  # past the kept start
    assert store.read_range(digest, 2 * MIB, 100) == other[2 * MIB : 2 * MIB + 100]

    store.delete(digest)  # garbage collection: nothing kept is served any more
    with pytest.raises(MissingBlob):
        store.read_range(digest, 0, 100)


def test_a_small_verified_blob_is_kept_whole_and_ranges_past_its_end_are_empty(registry):
    data = b"adapter_config" * 100
    digest = registry.upload(data)["digest"]
    store = registry.client.app.state.store
    store.client.delete_object(Bucket=store.bucket, Key=store.blob_key(digest))  # behind the store's back
    assert store.read_range(digest, 0, len(data)) == data
    assert store.read_range(digest, 10, 10 * len(data)) == data[10:]
    assert store.read_range(digest, len(data), 10) == b""


def test_bytes_refused_at_complete_are_not_kept(multipart_registry):
    registry = multipart_registry
    store = registry.client.app.state.store
    (target,) = registry.plan([big_blob()])
    response = registry.complete(target["digest"], registry.send(target, big_blob(seed=1)))
    assert response.json()["error"] == "digest_mismatch"
    with pytest.raises(MissingBlob):
        store.read_range(target["digest"], 0, 100)


@pytest.mark.parametrize("sizes", [[], [1], [7, 0, 3 * MIB, 5], [MIB] * 20, [s3_store.HEAD_CACHE_BYTES + 1]])
def test_the_read_back_hash_and_start_match_the_bytes_read(sizes):
    chunks = [os.urandom(size) for size in sizes]
    whole = b"".join(chunks)
    digest, head = s3_store._hash_chunks(iter(chunks))
    assert digest == "sha256:" + hashlib.sha256(whole).hexdigest()
    assert head == whole[: s3_store.HEAD_CACHE_BYTES]


def test_a_read_back_that_fails_midway_raises_and_leaves_no_hashing_thread():
    def failing():
        yield from [os.urandom(MIB)] * (s3_store.HASH_QUEUE_CHUNKS * 3)
        raise ConnectionError("the store hung up")

    with pytest.raises(ConnectionError, match="hung up"):
        s3_store._hash_chunks(failing())
    assert not [t for t in threading.enumerate() if t.name == "deltareg-s3-hash"]
