"""The compatibility contract: the base's config as recorded at push is checked at apply together with the
tensors, every problem reported at once, nothing written or modified on a mismatch."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from _support.tensors import load_model

from deltareg.client.apply import apply_files, apply_to_module
from deltareg.client.compat import read_base_config
from deltareg.client.errors import BaseMismatch
from deltareg.client.fingerprint import fingerprint_path
from deltareg.client.manifest import Manifest


@pytest.fixture
def recorded(
    tiny_llama: Callable[..., Path], lora_adapter: Callable[..., Path], lora_manifest: Callable[..., Manifest]
) -> tuple[Path, Path, Manifest]:
    """(base, adapter, manifest) with the base's config recorded, as push records it."""
    base = tiny_llama(dtype="bfloat16")
    adapter = lora_adapter(base)
    manifest = lora_manifest(adapter, base)
    config = read_base_config(base)
    return (
        base,
        adapter,
        manifest.model_copy(update={"base": manifest.base.model_copy(update={"config": config})}),
    )


def edited_copy(base: Path, folder: Path, **changes: object) -> Path:
    """The same weights under another config.json."""
    shutil.copytree(base, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


def test_the_recorded_config_describes_the_base(recorded):
    base, _, manifest = recorded
    config = manifest.base.config
    assert config is not None
    assert (config.architecture, config.model_type, config.vocab_size) == ("LlamaForCausalLM", "llama", 256)
    assert config.digest.startswith("sha256:")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"architectures": ["MistralForCausalLM"]}, "architecture is 'MistralForCausalLM'"),
        ({"vocab_size": 300}, "vocab_size is 300, the delta was made for 256"),
        ({"rope_theta": 1234.0}, "config.json differs from the one the delta was made with"),
    ],
)
def test_a_base_with_the_same_weights_but_another_config_is_refused(recorded, tmp_path, changes, message):
    base, adapter, manifest = recorded
    other = edited_copy(base, tmp_path / "other", **changes)
    assert fingerprint_path(other).value == manifest.base.fingerprint  # the weights alone cannot tell

    with pytest.raises(BaseMismatch, match=message):
        apply_files(other, adapter, manifest, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_settings_that_change_with_tooling_do_not_count(recorded, tmp_path):
    base, adapter, manifest = recorded
    resaved = edited_copy(base, tmp_path / "resaved", transformers_version="9.9.9", dtype="float32")
    assert apply_files(resaved, adapter, manifest, tmp_path / "merged").tensors_changed > 0


def test_tensor_and_config_problems_are_reported_together(recorded, tmp_path, tiny_gpt2):
    _, adapter, manifest = recorded
    # GPT-2 has other tensor names and another architecture: every problem in one message.
    with pytest.raises(BaseMismatch) as refused:
        apply_files(tiny_gpt2(), adapter, manifest, tmp_path / "merged")
    message = str(refused.value)
    assert "model.layers.0.self_attn.q_proj.weight is missing" in message
    assert "architecture is 'GPT2LMHeadModel', the delta was made for 'LlamaForCausalLM'" in message
    assert "model_type is 'gpt2'" in message


def test_in_memory_the_models_config_is_checked_before_anything_changes(recorded):
    base, adapter, manifest = recorded
    model = load_model(base)
    model.config.vocab_size = 512
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with pytest.raises(BaseMismatch, match="vocab_size is 512"):
        apply_to_module(model, adapter, manifest)
    assert all(torch.equal(v.detach(), before[k]) for k, v in model.state_dict().items())

    model.config.vocab_size = 256
    apply_to_module(model, adapter, manifest)
    assert any(not torch.equal(v.detach(), before[k]) for k, v in model.state_dict().items())


def test_manifests_without_a_config_keep_their_json_and_digest(recorded):
    _, _, manifest = recorded
    without = manifest.model_copy(update={"base": manifest.base.model_copy(update={"config": None})})
    assert "config" not in without.to_json_obj()["base"]
    assert Manifest.parse(without.to_json_obj()).digest == without.digest
    assert "config" in manifest.to_json_obj()["base"] and manifest.digest != without.digest
