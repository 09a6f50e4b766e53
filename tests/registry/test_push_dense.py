"""Versions of kind "full" (dense deltas): the server checks that the params are a valid dense delta, equal
to the version's delta_config.json, and that delta.safetensors holds exactly the tensors they name."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load, load_file, save, save_file

from deltareg.client.diff import diff_models
from deltareg.client.manifest import Manifest

REPO = "acme/full"


@pytest.fixture(scope="module")
def dense_files(
    tiny_llama: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, bytes]:
    """The files of a dense delta between two tiny models (a fine-tune that also changed config.json)."""
    base = tiny_llama(dtype="bfloat16")
    tuned = tmp_path_factory.mktemp("tuned")
    tensors = {
        name: (t.float() * 1.01).to(t.dtype) for name, t in load_file(base / "model.safetensors").items()
    }
    save_file(tensors, tuned / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((base / "config.json").read_text())
    (tuned / "config.json").write_text(json.dumps({**config, "note": "tuned"}))
    out = tmp_path_factory.mktemp("dense") / "delta"
    diff_models(base, tuned, out)
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def manifest(registry: Any, files: dict[str, bytes], params: dict[str, Any] | None = None) -> dict[str, Any]:
    config = params if params is not None else json.loads(files["delta_config.json"])
    entries = [{"path": p, "digest": registry.digest_of(d), "size": len(d)} for p, d in sorted(files.items())]
    return Manifest.model_validate(
        {
            "kind": "full",
            "files": entries,
            "base": {"fingerprint": config["base_fingerprint"]},
            "params": config,
        }
    ).to_json_obj()


def refused(registry: Any, files: dict[str, bytes], params: dict[str, Any] | None = None) -> str:
    registry.upload_all(files)
    response = registry.create_version(REPO, manifest(registry, files, params))
    assert response.status_code == 400, response.text
    assert registry.count_rows()["versions"] == 0
    assert response.json()["error"] == "invalid_delta"
    return str(response.json()["detail"])


def test_a_dense_delta_is_accepted(registry, dense_files):
    registry.upload_all(dense_files)
    response = registry.create_version(REPO, manifest(registry, dense_files))
    assert response.status_code == 201, response.text
    assert response.json()["kind"] == "full"
    assert sorted(f["path"] for f in response.json()["manifest"]["files"]) == [
        "delta.safetensors",
        "delta_config.json",
        "files/config.json",
    ]


def test_params_that_differ_from_delta_config_json_are_refused(registry, dense_files):
    params = json.loads(dense_files["delta_config.json"])
    params["stats"]["stored_bytes"] += 1
    assert "does not hold the manifest's params" in refused(registry, dense_files, params)


def test_a_missing_config_an_unlisted_file_or_a_stowaway_tensor_is_refused(registry, dense_files):
    without_config = {p: d for p, d in dense_files.items() if p != "delta_config.json"}
    params = json.loads(dense_files["delta_config.json"])
    assert "needs the files delta_config.json" in refused(registry, without_config, params)

    assert "unexpected: notes.txt" in refused(registry, {**dense_files, "notes.txt": b"hello"})

    tensors = load(dense_files["delta.safetensors"])
    stowaway = save({**tensors, "stowaway": torch.zeros(2)}, metadata={"format": "pt"})
    assert "stowaway" in refused(registry, {**dense_files, "delta.safetensors": stowaway})


def test_inconsistent_params_are_refused(registry, dense_files):
    params = json.loads(dense_files["delta_config.json"])
    entry = next(iter(params["tensors"].values()))
    entry["data"]["dtype"] = "F32"  # an xor entry of a BF16 tensor stores I16
    assert "stores I16" in refused(registry, dense_files, params)
