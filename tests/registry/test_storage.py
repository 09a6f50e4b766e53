"""The store interface garbage collection and operators rely on, on both stores: listing, deleting,
cleaning abandoned uploads, the readiness check."""

from __future__ import annotations

from datetime import timedelta

import pytest

from deltareg.registry.models import utcnow


def store_of(registry):
    return registry.client.app.state.store


def test_iter_blobs_lists_published_blobs_with_size_and_time(registry):
    before = utcnow() - timedelta(minutes=5)
    registry.push("acme/bot", registry.lora_files())
    listed = {blob.digest: blob for blob in store_of(registry).iter_blobs()}
    files = registry.lora_files()
    assert {d: b.size for d, b in listed.items()} == {registry.digest_of(v): len(v) for v in files.values()}
    assert all(b.modified is not None and b.modified > before for b in listed.values())


def test_delete_removes_a_blob_and_tolerates_a_missing_one(registry):
    data = b"to be deleted"
    registry.put_blob(data)
    store = store_of(registry)
    store.delete(registry.digest_of(data))
    store.delete(registry.digest_of(data))
    assert store.size_of(registry.digest_of(data)) is None
    assert registry.stored_names() == []


def abandon_an_upload(registry) -> None:
    """Leave a staged upload behind, the way a client that gave up would."""
    data = b"abandoned half way"
    (target,) = registry.plan([data])
    if registry.is_s3:
        registry.send(target, data)  # uploaded, never completed
    else:
        (registry.blob_root / "tmp" / "upload-abandoned").write_bytes(data[:5])


def test_clean_staging_removes_only_uploads_older_than_the_cutoff(registry):
    registry.put_blob(b"published")
    abandon_an_upload(registry)
    names = registry.stored_names()
    store = store_of(registry)

    assert store.clean_staging(utcnow() - timedelta(hours=1)) == 0
    assert registry.stored_names() == names
    assert store.clean_staging(utcnow() + timedelta(minutes=1)) == 1
    assert [name.rsplit("/", 1)[1] for name in registry.stored_names()] == [
        registry.digest_of(b"published")[7:]
    ]


@pytest.mark.backends("s3")
def test_clean_staging_aborts_unfinished_multipart_uploads(make_registry):
    with make_registry(multipart_threshold=1) as registry:
        registry.plan([b"a multipart upload nobody finishes"])
        assert [n for n in registry.stored_blob_files() if n.startswith("multipart:")]
        assert store_of(registry).clean_staging(utcnow() + timedelta(minutes=1)) == 1
        assert registry.stored_blob_files() == []


def test_readyz_checks_the_database_and_the_store(client):
    assert client.get("/readyz").json() == {"status": "ready"}


@pytest.mark.backends("fs")
def test_readyz_names_a_blob_folder_that_went_away(registry):
    (registry.blob_root / "tmp").rmdir()
    response = registry.client.get("/readyz")
    assert response.status_code == 503
    assert response.json() == {
        "error": "service_unavailable",
        "detail": f"blob folder {registry.blob_root} is missing or not writable",
    }
