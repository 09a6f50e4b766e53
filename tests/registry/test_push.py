"""Creating versions: the push flow, numbering, idempotency, and every way a push is refused."""

from __future__ import annotations

import json
import pickle
import struct

import pytest
from _support.auth import TEST_TOKEN, bearer
from fastapi.testclient import TestClient

from deltareg.registry.config import Settings
from deltareg.registry.main import create_app

REPO = "acme/support-bot"
NOTHING_RECORDED = {"repos": 0, "versions": 0, "version_files": 0}


def recorded(registry) -> dict[str, int]:
    counts = registry.count_rows()
    return {table: counts[table] for table in NOTHING_RECORDED}


def test_push_flow_creates_version_1(registry):
    files = registry.lora_files()
    registry.upload_all(files)
    manifest = registry.manifest_for(files)
    response = registry.create_version(REPO, manifest)

    assert response.status_code == 201, response.text
    body = response.json()
    assert body["created"] is True
    assert body["repo"] == REPO
    assert body["number"] == 1
    assert body["kind"] == "lora"
    assert body["base_fingerprint"] == manifest["base"]["fingerprint"]
    assert body["parent"] is None
    assert body["size"] == sum(len(data) for data in files.values())
    assert body["manifest"] == manifest
    assert body["created_at"].endswith(("Z", "+00:00"))
    # The digest is the client's: sha256 of the manifest's canonical JSON.
    from deltareg.client.manifest import Manifest

    assert body["digest"] == Manifest.parse(manifest).digest
    assert registry.count_rows() == {"repos": 1, "versions": 1, "version_files": 2, "blobs": 2, "evals": 0}


def test_versions_are_numbered_1_2_3(registry):
    numbers = [registry.push(REPO, registry.lora_files(seed))["number"] for seed in range(3)]
    assert numbers == [1, 2, 3]
    other = registry.push("acme/other", registry.lora_files(0))
    assert other["number"] == 1  # numbering is per repo


def test_pushing_the_same_manifest_again_returns_the_same_version(registry):
    files = registry.lora_files()
    first = registry.push(REPO, files)
    registry.upload_all(files)
    again = registry.create_version(REPO, registry.manifest_for(files))

    assert again.status_code == 200
    assert again.json() == {**first, "created": False}
    assert registry.count_rows()["versions"] == 1
    # The retry did not use up a number.
    assert registry.push(REPO, registry.lora_files(1))["number"] == 2


def test_the_same_manifest_may_be_a_version_of_two_repos(registry):
    files = registry.lora_files()
    first = registry.push(REPO, files)
    second = registry.push("acme/copy", files)
    assert second["created"] is True
    assert second["digest"] == first["digest"]


def test_blobs_are_shared_between_versions(registry):
    registry.push(REPO, registry.lora_files(0))
    registry.push(REPO, registry.lora_files(1))
    # adapter_config.json is identical in both: stored once.
    assert registry.count_rows()["blobs"] == 3
    assert len(registry.stored_blob_files()) == 3


def test_parent_in_any_repo_with_the_same_base_is_accepted(registry):
    parent = registry.push("acme/base-line", registry.lora_files(0))
    child = registry.push(REPO, registry.lora_files(1), parent=parent["digest"])
    assert child["parent"] == parent["digest"]


def test_parent_that_does_not_exist_is_refused(registry):
    files = registry.lora_files()
    registry.upload_all(files)
    response = registry.create_version(REPO, registry.manifest_for(files, parent="sha256:" + "f" * 64))
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_manifest"
    assert "parent" in response.json()["detail"]
    assert recorded(registry) == NOTHING_RECORDED


def test_parent_on_another_base_is_refused(registry):
    parent = registry.push("acme/base-line", registry.lora_files(0))
    files = registry.lora_files(1)
    registry.upload_all(files)
    manifest = registry.manifest_for(files, parent=parent["digest"], fingerprint="tmv1:" + "cd" * 32)
    response = registry.create_version(REPO, manifest)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_manifest"
    assert registry.count_rows()["versions"] == 1


# ---- refusals: each leaves no repo, version or file row


def test_missing_blob_is_refused_naming_the_file(registry):
    files = registry.lora_files()
    registry.upload_all({"adapter_config.json": files["adapter_config.json"]})
    response = registry.create_version(REPO, registry.manifest_for(files))
    assert response.status_code == 400
    assert response.json()["error"] == "missing_blob"
    assert "adapter_model.safetensors" in response.json()["detail"]
    assert recorded(registry) == NOTHING_RECORDED


def test_blob_missing_from_the_store_is_refused(registry):
    files = registry.lora_files()
    registry.upload_all(files)
    registry.delete_stored(registry.digest_of(files["adapter_model.safetensors"]))  # the row stays
    response = registry.create_version(REPO, registry.manifest_for(files))
    assert response.status_code == 400
    assert response.json()["error"] == "missing_blob"
    assert recorded(registry) == NOTHING_RECORDED


def test_declared_size_that_differs_from_the_blob_is_refused(registry):
    files = registry.lora_files()
    registry.upload_all(files)
    wrong = len(files["adapter_config.json"]) + 1
    response = registry.create_version(
        REPO, registry.manifest_for(files, sizes={"adapter_config.json": wrong})
    )
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_manifest"
    assert "adapter_config.json" in response.json()["detail"]
    assert recorded(registry) == NOTHING_RECORDED


@pytest.mark.parametrize("missing", ["adapter_config.json", "adapter_model.safetensors"])
def test_lora_without_its_required_files_is_refused(registry, missing):
    files = registry.lora_files()
    files["extra.safetensors"] = registry.safetensors_bytes(7)
    del files[missing]
    registry.upload_all(files)
    response = registry.create_version(REPO, registry.manifest_for(files))
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_adapter"
    assert missing in response.json()["detail"]
    assert recorded(registry) == NOTHING_RECORDED


@pytest.mark.parametrize(
    "config",
    [b"[1, 2]", b"not json", b"\xff\xfe", b"[" * 100_000, b'"a string"'],
    ids=["list", "not-json", "not-utf8", "deeply-nested", "string"],
)
def test_adapter_config_that_is_not_a_json_object_is_refused(registry, config):
    files = {**registry.lora_files(), "adapter_config.json": config}
    registry.upload_all(files)
    response = registry.create_version(REPO, registry.manifest_for(files))
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_adapter"
    assert recorded(registry) == NOTHING_RECORDED


def test_adapter_config_over_1_mib_is_refused(registry):
    big = json.dumps({"pad": "x" * (1 << 20)}).encode()
    files = {**registry.lora_files(), "adapter_config.json": big}
    registry.upload_all(files)
    response = registry.create_version(REPO, registry.manifest_for(files))
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_adapter"
    assert recorded(registry) == NOTHING_RECORDED


def _header_file(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


HOSTILE_SAFETENSORS = {
    "truncated": lambda valid: valid[:-3],
    "header-length-beyond-file": lambda valid: struct.pack("<Q", 10**6) + b'{"a": 1}',
    "overlapping-offsets": lambda valid: _header_file(
        {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
        },
        b"\0" * 12,
    ),
    "pickle-renamed": lambda valid: pickle.dumps({"weights": [1.0, 2.0]}, protocol=4),
    "tiny": lambda valid: b"\x01\x02",
    "header-not-json": lambda valid: struct.pack("<Q", 4) + b"{{{{",
}


@pytest.mark.parametrize("make", HOSTILE_SAFETENSORS.values(), ids=HOSTILE_SAFETENSORS.keys())
def test_invalid_safetensors_is_refused(registry, make):
    files = {**registry.lora_files(), "adapter_model.safetensors": make(registry.safetensors_bytes())}
    registry.upload_all(files)
    response = registry.create_version(REPO, registry.manifest_for(files))
    assert response.status_code == 400
    body = response.json()
    assert body["error"] == "invalid_safetensors"
    assert body["detail"].startswith("adapter_model.safetensors: ")
    assert recorded(registry) == NOTHING_RECORDED


def test_pickle_renamed_safetensors_is_named_as_such(registry):
    files = {**registry.lora_files(), "adapter_model.safetensors": pickle.dumps([1, 2], protocol=4)}
    registry.upload_all(files)
    response = registry.create_version(REPO, registry.manifest_for(files))
    assert "pickle" in response.json()["detail"]


def test_every_safetensors_file_is_checked_not_only_the_adapter(registry):
    files = {**registry.lora_files(), "extra/weights.safetensors": b"\x80\x04junk" * 4}
    registry.upload_all(files)
    response = registry.create_version(REPO, registry.manifest_for(files))
    assert response.status_code == 400
    assert response.json()["detail"].startswith("extra/weights.safetensors: ")


INVALID_MANIFEST_CHANGES = {
    "dotdot": {
        "files": [{"path": "../adapter_model.safetensors", "digest": "sha256:" + "0" * 64, "size": 1}]
    },
    "absolute": {"files": [{"path": "/etc/passwd", "digest": "sha256:" + "0" * 64, "size": 1}]},
    "pickle-suffix": {"files": [{"path": "adapter_model.bin", "digest": "sha256:" + "0" * 64, "size": 1}]},
    "no-files": {"files": []},
    "kind": {"kind": "mystery"},
    "fingerprint": {"base": {"fingerprint": "not-a-fingerprint"}},
    "parent": {"parent": "sha256:short"},
    "extra": {"unexpected": True},
    "schema": {"schema": "deltareg.manifest.v0"},
}


def test_invalid_manifests_are_refused(registry):
    # One registry for every case (built once per backend); each refusal must leave nothing behind.
    files = registry.lora_files()
    registry.upload_all(files)
    for case, change in INVALID_MANIFEST_CHANGES.items():
        manifest = {**registry.manifest_for(files), **change}
        response = registry.create_version(REPO, manifest)
        assert (response.status_code, response.json()["error"]) == (400, "invalid_manifest"), case
        assert recorded(registry) == NOTHING_RECORDED, case


@pytest.mark.parametrize(
    "body",
    [{}, {"manifest": "text"}, {"manifest": {}, "extra": 1}, [1]],
    ids=["empty", "not-object", "extra-key", "list"],
)
def test_malformed_push_body_is_refused(registry, body):
    response = registry.client.post(f"/api/v1/repos/{REPO}/versions", json=body)
    assert response.status_code == 400
    assert response.json()["error"] in ("invalid_input", "invalid_manifest")
    assert recorded(registry) == NOTHING_RECORDED


INVALID_REPO_PATHS = [
    "Acme/Bot",
    "acme/Bot",
    "%2E%2E/x",
    "acme/%2E%2E",
    "a/b/c",
    "bad%0Aname/x",
    "acme/caf%C3%A9",
    "-x/y",
    "acme/a%00b",
]


def test_invalid_repo_names_are_refused_and_nothing_stored(registry):
    files = registry.lora_files()
    registry.upload_all(files)
    for repo_path in INVALID_REPO_PATHS:
        response = registry.client.post(
            f"/api/v1/repos/{repo_path}/versions", json={"manifest": registry.manifest_for(files)}
        )
        assert 400 <= response.status_code < 500, repo_path
        assert response.json()["error"] in ("invalid_name", "not_found"), repo_path
        assert recorded(registry) == NOTHING_RECORDED, repo_path


def test_manifest_body_over_the_limit_is_413(tmp_path):
    settings = Settings(data_dir=tmp_path / "d", max_manifest_bytes=2000)
    with TestClient(create_app(settings), headers=bearer(TEST_TOKEN)) as client:
        manifest = {"kind": "lora", "metadata": {"notes": "x" * 3000}}
        response = client.post(f"/api/v1/repos/{REPO}/versions", json={"manifest": manifest})
    assert response.status_code == 413
    assert response.json()["error"] == "payload_too_large"
