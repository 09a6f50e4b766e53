"""DoRA (use_dora=True): equality with PEFT's merge_and_unload on real PEFT adapters (nn.Linear on a tiny
Llama, Conv1D with fan_in_fan_out on a tiny GPT-2, fp32 and bf16, in memory and file to file), in a chain
after a plain LoRA parent, and refusals (wrong base, DoRA on an embedding, inconsistent files) that leave
everything untouched."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from _support.tensors import load_model, max_ulp
from safetensors.torch import load_file, save_file

from deltareg.client.apply import (
    Step,
    apply_files,
    apply_steps_files,
    apply_steps_to_state_dict,
    apply_to_module,
)
from deltareg.client.errors import BaseMismatch, InvalidAdapter, InvalidManifest
from deltareg.client.lora import LoraTarget, read_peft_adapter, targets_from_params
from deltareg.client.manifest import Manifest

pytestmark = pytest.mark.slow

PREFIX = "base_model.model."
Q0 = "model.layers.0.self_attn.q_proj"
V0 = "model.layers.0.self_attn.v_proj"  # (32, 64): rectangular, so a transposed norm would show
DTYPES = ["float32", "bfloat16"]
DORA = {"target_modules": ("q_proj", "v_proj", "down_proj"), "use_dora": True, "seed": 41}
GPT2_DORA = {"target_modules": ("c_attn", "c_fc"), "fan_in_fan_out": True, "use_dora": True, "seed": 42}
PARENT = {"target_modules": ("q_proj", "k_proj"), "seed": 43}
CHILD_DORA = {"target_modules": ("q_proj", "v_proj"), "r": 4, "alpha": 8, "use_dora": True, "seed": 44}


# --------------------------------------------------------------------------------------------------
# helpers


def snapshot(module: Any) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def peft_chain(base: Path, *adapters: Path) -> dict[str, torch.Tensor]:
    """PEFT merges each adapter (merge_and_unload), then loads the next onto the merged model."""
    from peft import PeftModel

    model = load_model(base)
    for adapter in adapters:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return snapshot(model)


def with_parent(manifest: Manifest, parent: Manifest) -> Manifest:
    return Manifest.parse({**manifest.to_json_obj(), "parent": parent.digest})


def assert_matches_peft(base: Path, adapter: Path, manifest: Manifest, out: Path, label: str) -> None:
    """In memory and file to file, compared with PEFT; prints the measured differences (run with -s)."""
    expected = peft_chain(base, adapter)
    model = load_model(base)
    before = snapshot(model)
    apply_to_module(model, adapter, manifest)
    in_memory = max_ulp(model.state_dict(), expected)
    files = max_ulp(load_model(apply_files(base, adapter, manifest, out).output).state_dict(), expected)
    print(f"DoRA {label}: max {in_memory} ulp in memory, {files} ulp file to file")
    assert in_memory == 0 and files == 0
    changed = {n for n, t in model.state_dict().items() if not torch.equal(t, before[n])}
    dora_tensors = {t.base_tensor for t in targets_from_params(manifest.params) if isinstance(t, LoraTarget)}
    assert changed == dora_tensors  # the comparison can fail: every DoRA tensor changed, nothing else


def edited_adapter(copy_folder: Callable[[Path], Path], adapter: Path, **changes: Any) -> Path:
    """A copy of ``adapter`` whose tensors (key -> tensor, or None to drop it) and config are changed."""
    folder = copy_folder(adapter)
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(weights)
    for key, tensor in changes.pop("tensors", {}).items():
        if tensor is None:
            del tensors[key]
        else:
            tensors[key] = tensor
    save_file(tensors, weights, metadata={"format": "pt"})
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


# --------------------------------------------------------------------------------------------------
# reading and the manifest


def test_dora_params_record_the_magnitude_vector_and_round_trip(
    tiny_llama: Callable[..., Path], lora_adapter: Callable[..., Path]
) -> None:
    adapter = lora_adapter(tiny_llama(), **DORA)
    read = read_peft_adapter(adapter)
    params = read.params()
    assert params["modules"][V0] == {
        "r": 8,
        "alpha": 16.0,
        "scale": 2.0,
        "base_tensor": f"{V0}.weight",
        "shape": [32, 64],
        "lora_A": f"{PREFIX}{V0}.lora_A.weight",
        "lora_B": f"{PREFIX}{V0}.lora_B.weight",
        "lora_magnitude_vector": f"{PREFIX}{V0}.lora_magnitude_vector",  # PEFT drops the ".weight"
    }
    assert all("lora_magnitude_vector" in entry for entry in params["modules"].values())
    assert targets_from_params(params) == read.targets
    # A plain LoRA adapter's entries keep exactly the seven keys of earlier versions.
    plain = read_peft_adapter(lora_adapter(tiny_llama(), target_modules=DORA["target_modules"], seed=41))
    assert all(len(entry) == 7 for entry in plain.params()["modules"].values())


def test_a_manifest_cannot_put_a_magnitude_vector_where_dora_does_not_apply(
    tiny_llama: Callable[..., Path], lora_adapter: Callable[..., Path]
) -> None:
    params = read_peft_adapter(lora_adapter(tiny_llama(), **DORA)).params()
    entry = params["modules"][Q0]
    bad_entries = [
        ({**entry, "lora_magnitude_vector": ""}, "must be a tensor name"),
        ({**entry, "lora_magnitude_vector": 3}, "must be a tensor name"),
        ({**entry, "layer": "embedding"}, "only valid on a linear layer"),
    ]
    for bad, match in bad_entries:
        with pytest.raises(InvalidManifest, match=match):
            targets_from_params({**params, "modules": {**params["modules"], Q0: bad}})


# --------------------------------------------------------------------------------------------------
# equality with PEFT


@pytest.mark.parametrize("dtype", DTYPES)
def test_dora_on_linear_layers_is_bit_identical_to_peft(
    tiny_llama: Callable[..., Path],
    lora_adapter: Callable[..., Path],
    lora_manifest: Callable[..., Manifest],
    dtype: str,
    tmp_path: Path,
) -> None:
    base = tiny_llama(dtype=dtype)
    adapter = lora_adapter(base, **DORA)
    assert_matches_peft(base, adapter, lora_manifest(adapter, base), tmp_path / "out", f"llama {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_dora_on_gpt2_conv1d_with_fan_in_fan_out_is_bit_identical_to_peft(
    tiny_gpt2: Callable[..., Path],
    lora_adapter: Callable[..., Path],
    lora_manifest: Callable[..., Manifest],
    tmp_path_factory: pytest.TempPathFactory,
    dtype: str,
    tmp_path: Path,
) -> None:
    base = tiny_gpt2()
    if dtype != "float32":
        base = tmp_path_factory.mktemp(f"gpt2-{dtype}")
        load_model(tiny_gpt2()).to(getattr(torch, dtype)).save_pretrained(base)
    adapter = lora_adapter(base, **GPT2_DORA)
    manifest = lora_manifest(adapter, base)
    c_attn = manifest.params["modules"]["transformer.h.0.attn.c_attn"]
    assert c_attn["shape"] == [64, 192]  # Conv1D stores (in, out); the magnitude is per output: (192,)
    assert_matches_peft(base, adapter, manifest, tmp_path / "out", f"gpt2 {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_dora_child_on_a_plain_lora_parent_is_bit_identical_to_peft_merging_one_by_one(
    tiny_llama: Callable[..., Path],
    lora_adapter: Callable[..., Path],
    lora_manifest: Callable[..., Manifest],
    dtype: str,
    tmp_path: Path,
) -> None:
    base = tiny_llama(dtype=dtype)
    parent, child = lora_adapter(base, **PARENT), lora_adapter(base, **CHILD_DORA)
    parent_manifest = lora_manifest(parent, base)
    steps = [
        Step(parent, parent_manifest),
        Step(child, with_parent(lora_manifest(child, base), parent_manifest)),
    ]
    expected = peft_chain(base, parent, child)

    model = load_model(base)
    apply_steps_to_state_dict(model.state_dict(keep_vars=True), steps)
    in_memory = max_ulp(model.state_dict(), expected)
    merged = load_model(apply_steps_files(base, steps, tmp_path / "out").output)
    files = max_ulp(merged.state_dict(), expected)
    print(f"DoRA chain llama {dtype}: max {in_memory} ulp in memory, {files} ulp file to file")
    assert in_memory == 0 and files == 0
    # The order matters (DoRA's norm is taken on the parent-merged q_proj): the child alone, on the
    # pristine base, then the parent, gives a different q_proj.
    assert not torch.equal(
        model.state_dict()[f"{Q0}.weight"], peft_chain(base, child, parent)[f"{Q0}.weight"]
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_dora_with_modules_to_save_is_bit_identical_to_peft(
    tiny_llama: Callable[..., Path],
    lora_adapter: Callable[..., Path],
    lora_manifest: Callable[..., Manifest],
    dtype: str,
    tmp_path: Path,
) -> None:
    base = tiny_llama(dtype=dtype)
    adapter = lora_adapter(
        base, target_modules=("q_proj", "o_proj"), use_dora=True, modules_to_save=("lm_head",)
    )
    manifest = lora_manifest(adapter, base)
    assert "replace" in manifest.params["modules"]["lm_head"]
    expected = peft_chain(base, adapter)
    applied = load_model(base)
    apply_to_module(applied, adapter, manifest)
    in_memory = max_ulp(applied.state_dict(), expected)
    files = max_ulp(
        load_model(apply_files(base, adapter, manifest, tmp_path / "out").output).state_dict(), expected
    )
    print(f"DoRA + modules_to_save llama {dtype}: max {in_memory} ulp in memory, {files} ulp file to file")
    assert in_memory == 0 and files == 0
    assert not torch.equal(
        applied.state_dict()["lm_head.weight"], load_model(base).state_dict()["lm_head.weight"]
    )


# --------------------------------------------------------------------------------------------------
# refusals


@pytest.mark.parametrize("verify", ["full", "touched"])
def test_a_wrong_base_is_refused_with_the_model_untouched_and_nothing_written(
    tiny_llama: Callable[..., Path],
    lora_adapter: Callable[..., Path],
    lora_manifest: Callable[..., Manifest],
    verify: str,
    tmp_path: Path,
) -> None:
    base = tiny_llama()
    adapter = lora_adapter(base, **DORA)
    manifest = lora_manifest(adapter, base)
    other = tiny_llama(seed=7)  # same architecture, other values: DoRA would silently compute garbage
    model = load_model(other)
    before = snapshot(model)
    with pytest.raises(BaseMismatch, match="wrong base model"):
        apply_to_module(model, adapter, manifest, verify=verify)
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())
    with pytest.raises(BaseMismatch, match="wrong base model"):
        apply_files(other, adapter, manifest, tmp_path / "out", verify=verify)
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary folder left


def test_dora_on_an_embedding_is_refused_by_name(
    tiny_llama: Callable[..., Path], lora_adapter: Callable[..., Path]
) -> None:
    adapter = lora_adapter(tiny_llama(), target_modules=("q_proj", "embed_tokens"), use_dora=True, seed=45)
    with pytest.raises(
        InvalidAdapter, match=r"DoRA on an embedding \(model\.embed_tokens\) is not supported"
    ):
        read_peft_adapter(adapter)


def test_inconsistent_dora_files_are_refused(
    tiny_llama: Callable[..., Path], lora_adapter: Callable[..., Path], copy_folder: Callable[[Path], Path]
) -> None:
    adapter = lora_adapter(tiny_llama(), **DORA)
    key = f"{PREFIX}{Q0}.lora_magnitude_vector"
    cases = [
        ({"use_dora": False}, f"{key}: a DoRA magnitude vector, but the config has use_dora=false"),
        ({"tensors": {key: None}}, f"{Q0}: use_dora is true but {key} is missing"),
        ({"tensors": {key: torch.ones(32)}}, rf"{key}: shape \[32\], expected \[64\]"),
        ({"tensors": {key: torch.ones(64, dtype=torch.int32)}}, f"{key}: dtype I32 is not supported"),
        ({"use_dora": "yes"}, "use_dora must be true or false"),
        ({"lora_bias": True}, "lora_bias is not supported with DoRA"),  # PEFT's LoraConfig refuses it too
    ]
    for changes, match in cases:
        with pytest.raises(InvalidAdapter, match=match):
            read_peft_adapter(edited_adapter(copy_folder, adapter, **changes))


def test_a_non_finite_magnitude_is_refused_before_anything_changes(
    tiny_llama: Callable[..., Path],
    lora_adapter: Callable[..., Path],
    lora_manifest: Callable[..., Manifest],
    copy_folder: Callable[[Path], Path],
    tmp_path: Path,
) -> None:
    base = tiny_llama()
    key = f"{PREFIX}{V0}.lora_magnitude_vector"
    magnitude = load_file(lora_adapter(base, **DORA) / "adapter_model.safetensors")[key]
    magnitude[3] = float("nan")
    adapter = edited_adapter(copy_folder, lora_adapter(base, **DORA), tensors={key: magnitude})
    manifest = lora_manifest(adapter, base)
    model = load_model(base)
    before = snapshot(model)
    with pytest.raises(InvalidAdapter, match=f"the tensors of {V0} hold NaN"):
        apply_to_module(model, adapter, manifest)
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())
    outputs = tmp_path / "outputs"  # tmp_path also holds the edited adapter
    outputs.mkdir()
    with pytest.raises(InvalidAdapter, match="NaN"):
        apply_files(base, adapter, manifest, outputs / "out")
    assert list(outputs.iterdir()) == []
