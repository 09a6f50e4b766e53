"""The whole loop through the real CLI against a real uvicorn server: push -> pull -> verify -> apply."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from _support.auth import TEST_TOKEN, bearer

pytestmark = pytest.mark.slow


def _json(result) -> dict:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _stored_blob(server, digest: str) -> Path:
    hexdigest = digest.removeprefix("sha256:")
    return server.data_dir / "blobs" / "sha256" / hexdigest[:2] / hexdigest


def _leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith(".") or p.suffix in (".partial", ".tmp")]


def test_push_pull_verify_apply_round_trip(cli, tiny_llama, lora_adapter, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = tiny_llama()
    adapter = lora_adapter(base)

    pushed = _json(
        cli(
            "push",
            adapter,
            "acme/round-trip",
            "--base",
            base,
            "--eval",
            "accuracy=0.9",
            "--meta",
            "dataset=tickets-v3",
            "--json",
        )
    )
    assert (pushed["created"], pushed["number"]) == (True, 1)
    assert pushed["base_fingerprint"] == cli("hash", base).stdout.strip()

    shown = _json(cli("show", "acme/round-trip:1", "--json"))
    assert shown["digest"] == pushed["digest"]
    assert [(e["name"], e["value"]) for e in shown["evals"]] == [("accuracy", 0.9)]
    assert shown["manifest"]["metadata"] == {"dataset": "tickets-v3"}
    assert shown["manifest"]["base"]["tensors"], "touched base tensors' digests are recorded"

    pulled = Path(cli("pull", "acme/round-trip").stdout.strip())
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (pulled / name).read_bytes() == (adapter / name).read_bytes()
    assert cli("verify", "acme/round-trip:1", "--base", base).returncode == 0
    assert cli("verify", pulled).returncode == 0

    out = tmp_path / "merged"
    assert cli("apply", "acme/round-trip@" + pushed["digest"], "--base", base, "-o", out).returncode == 0
    merged = AutoModelForCausalLM.from_pretrained(out).state_dict()
    expected = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base), pulled
    ).merge_and_unload()
    for name, tensor in expected.state_dict().items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=1e-6)
    assert not torch.equal(
        merged["model.layers.0.self_attn.q_proj.weight"],
        AutoModelForCausalLM.from_pretrained(base).state_dict()["model.layers.0.self_attn.q_proj.weight"],
    )


def test_a_cached_version_is_reused_without_a_download(cli, server, tiny_llama, lora_adapter):
    base = tiny_llama()
    pushed = _json(cli("push", lora_adapter(base, seed=11), "acme/cached", "--base", base, "--json"))
    first = _json(cli("pull", "acme/cached:1", "--json"))
    assert first["cached"] is False
    # Take the blobs away from the server: a second pull can only succeed from the cache.
    for entry in _json(cli("show", "acme/cached:1", "--json"))["manifest"]["files"]:
        moved = _stored_blob(server, entry["digest"])
        moved.rename(moved.with_suffix(".away"))
    try:
        second = _json(cli("pull", "acme/cached:1", "--json"))
        assert (second["cached"], second["path"], second["digest"]) == (True, first["path"], pushed["digest"])
        assert cli("pull", "acme/cached:1", "-o", cli.cache_dir.parent / "copy").returncode == 0
    finally:
        for away in (server.data_dir / "blobs").rglob("*.away"):
            away.rename(away.with_suffix(""))


def test_a_corrupted_blob_fails_pull_with_exit_3_and_keeps_nothing(
    cli, server, tiny_llama, lora_adapter, tmp_path
):
    base = tiny_llama()
    _json(cli("push", lora_adapter(base, seed=12), "acme/corrupt", "--base", base, "--json"))
    manifest = _json(cli("show", "acme/corrupt", "--json"))["manifest"]
    weights = next(f for f in manifest["files"] if f["path"].endswith(".safetensors"))
    stored = _stored_blob(server, weights["digest"])
    data = bytearray(stored.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes
    stored.write_bytes(bytes(data))

    result = cli("pull", "acme/corrupt", "-o", tmp_path / "out")
    assert result.returncode == 3, result.stderr
    assert "adapter_model.safetensors" in result.stderr and "sha256" in result.stderr
    assert not (tmp_path / "out").exists()
    versions = cli.cache_dir / "versions"
    assert not versions.exists() or list(versions.iterdir()) == []
    assert cli("apply", "acme/corrupt", "--base", base, "-o", tmp_path / "merged").returncode == 3
    assert not (tmp_path / "merged").exists()


def test_a_wrong_base_is_refused_with_exit_3_and_no_output(cli, tiny_llama, lora_adapter, tmp_path):
    base, other = tiny_llama(), tiny_llama(seed=5)
    _json(cli("push", lora_adapter(base, seed=13), "acme/wrong-base", "--base", base, "--json"))
    out = tmp_path / "out" / "merged"
    result = cli("apply", "acme/wrong-base", "--base", other, "-o", out)
    assert result.returncode == 3, result.stderr
    assert "wrong base" in result.stderr or "base" in result.stderr
    assert not out.exists()
    assert not out.parent.exists() or _leftovers(out.parent) == []
    assert cli("verify", "acme/wrong-base", "--base", other).returncode == 3
    assert cli("apply", "acme/wrong-base", "--base", other, "-o", out, "--fast").returncode == 3
    assert not out.exists()


def test_repushing_identical_files_stores_no_new_blob(cli, server, tiny_llama, lora_adapter):
    base = tiny_llama()
    adapter = lora_adapter(base, seed=14)
    first = _json(cli("push", adapter, "acme/dedup", "--base", base, "--json"))
    blobs = server.blob_files()
    again = _json(cli("push", adapter, "acme/dedup", "--base", base, "--json"))
    assert (again["created"], again["number"], again["uploaded_blobs"]) == (False, 1, 0)
    # New metadata is a new version, but its files are the same blobs: nothing is uploaded or stored.
    new = _json(cli("push", adapter, "acme/dedup", "--base", base, "--meta", "run=2", "--json"))
    assert (new["created"], new["number"], new["uploaded_blobs"]) == (True, 2, 0)
    # And the same files in another repo too.
    other = _json(cli("push", adapter, "other/dedup", "--base", base, "--json"))
    assert (other["uploaded_blobs"], other["digest"]) == (0, first["digest"])
    assert server.blob_files() == blobs


@pytest.mark.parametrize("repo", ["Acme/Bot", "../etc", "acme/bot/extra", "acme/bo\tt", "acme/bőt", "acme"])
def test_invalid_repo_names_exit_1_and_store_nothing(cli, server, tiny_llama, lora_adapter, repo):
    base = tiny_llama()
    blobs = server.blob_files()
    result = cli("push", lora_adapter(base, seed=15), repo, "--base", base)
    assert result.returncode == 1
    assert "invalid repository" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert server.blob_files() == blobs


def _edited_adapter(adapter: Path, tmp_path: Path, edit) -> Path:
    folder = tmp_path / "edited"
    shutil.copytree(adapter, folder)
    edit(folder)
    return folder


def _truncate(folder: Path) -> None:
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])


def _header_beyond_file(folder: Path) -> None:
    weights = folder / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[0:8] = (len(data) * 2).to_bytes(8, "little")
    weights.write_bytes(bytes(data))


def _pickle_renamed(folder: Path) -> None:
    import pickle

    (folder / "adapter_model.safetensors").write_bytes(pickle.dumps({"lora_A": [1.0, 2.0]}))


def _pickle_only(folder: Path) -> None:
    weights = folder / "adapter_model.safetensors"
    weights.rename(folder / "adapter_model.bin")


@pytest.mark.parametrize("edit", [_truncate, _header_beyond_file, _pickle_renamed, _pickle_only])
def test_hostile_adapter_files_exit_1_and_store_nothing(
    cli, server, tiny_llama, lora_adapter, tmp_path, edit
):
    base = tiny_llama()
    folder = _edited_adapter(lora_adapter(base, seed=16), tmp_path, edit)
    blobs = server.blob_files()
    result = cli("push", folder, "acme/hostile", "--base", base)
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("error: ")
    assert server.blob_files() == blobs
    assert cli("show", "acme/hostile").returncode == 1


def test_usage_errors_exit_2(cli, tiny_llama, lora_adapter):
    result = cli("push", lora_adapter(tiny_llama()), "acme/x")
    assert result.returncode == 2
    assert "--base" in result.stderr
    assert cli("push", "/nonexistent/adapter", "acme/x", "--base", "tmv1:" + "0" * 64).returncode == 2
    assert (
        cli("push", lora_adapter(tiny_llama()), "acme/x", "--base", "b", "--eval", "acc=nan").returncode == 2
    )


def test_an_unreachable_registry_is_one_clear_line_and_exit_1(cli):
    result = cli("show", "acme/anything", "--url", "http://127.0.0.1:9")
    assert result.returncode == 1
    assert result.stderr.splitlines()[0].startswith("error: cannot reach the registry at http://127.0.0.1:9")


def test_unknown_versions_and_aliases_are_not_found(cli, tiny_llama, lora_adapter):
    base = tiny_llama()
    _json(cli("push", lora_adapter(base, seed=17), "acme/refs", "--base", base, "--json"))
    for ref, words in [
        ("acme/refs:9", "no version 9"),
        ("acme/refs@production", "alias 'production'"),
        ("nobody/refs", "does not exist"),
    ]:
        result = cli("pull", ref)
        assert result.returncode == 1
        assert words in result.stderr
    listed = _json(cli("list", "acme", "--json"))["repos"]
    assert "acme/refs" in [r["name"] for r in listed]


def test_a_push_whose_blobs_are_collected_before_its_commit_uploads_them_again(
    cli, server, tiny_llama, lora_adapter, tmp_path
):
    """Garbage collection (grace 0) runs between the upload plan and the commit: the push still lands."""
    import httpx

    from deltareg.client import Registry

    cli.env["DELTAREG_DATA_DIR"] = str(server.data_dir)  # `deltareg gc` runs with the server's settings
    collected: list[dict] = []

    def collect_before_the_first_commit(request: httpx.Request) -> None:
        if request.url.path.endswith("/versions") and not collected:
            collected.append(_json(cli("gc", "--grace", "0", "--json")))

    base = tiny_llama()
    adapter = lora_adapter(base, seed=18)
    http = httpx.Client(
        base_url=server.url,
        headers=bearer(TEST_TOKEN),
        event_hooks={"request": [collect_before_the_first_commit]},
    )
    with Registry(server.url, cache_dir=tmp_path / "cache", http=http, progress=False) as registry:
        result = registry.push(adapter, "acme/collected", base=base)
        assert (result.created, result.version.number) == (True, 1)
        # Blobs other versions reference stay; this push's own weights were unreferenced and went.
        taken = {blob["name"] for blob in collected[0]["blobs"]} & {
            f.digest for f in result.version.manifest.files
        }
        weights = next(f for f in result.version.manifest.files if f.path.endswith(".safetensors"))
        assert weights.digest in taken
        assert result.uploaded_blobs >= 2 * len(taken), "each collected blob was uploaded, then again"
        registry.pull("acme/collected:1").verify(base)
