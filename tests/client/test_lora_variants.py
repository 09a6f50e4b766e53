"""LoRA variants (embedding LoRA, LoRA bias, modules_to_save): equality with PEFT's merge_and_unload and
refusals that leave everything untouched. Adapters are made with real PEFT on tiny local models."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from _support.tensors import load_model, max_ulp

from deltareg.client.apply import apply_files, apply_to_module
from deltareg.client.errors import BaseMismatch, InvalidAdapter
from deltareg.client.fingerprint import fingerprint_path
from deltareg.client.lora import (
    BiasTarget,
    LoraTarget,
    ReplaceTarget,
    check_against_base,
    read_peft_adapter,
    targets_from_params,
)
from deltareg.client.manifest import BaseModelRef, FileEntry, Manifest

PREFIX = "base_model.model."
LLAMA_DIMS: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 256,
    "max_position_embeddings": 128,
}
DTYPES = ["float32", "bfloat16"]
# Measured differences, printed at the end of each comparison (run with -s to see them).


# --------------------------------------------------------------------------------------------------
# helpers


def peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel

    merged = PeftModel.from_pretrained(load_model(base), adapter).merge_and_unload()
    return {name: tensor.detach().clone() for name, tensor in merged.state_dict().items()}


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def assert_matches_peft(
    base: Path, adapter: Path, manifest: Manifest, out: Path, label: str
) -> dict[str, torch.Tensor]:
    """Apply in memory and file to file; both must be bit-identical to PEFT. Returns PEFT's state dict."""
    expected = peft_merged(base, adapter)
    model = load_model(base)
    before = snapshot(model)
    apply_to_module(model, adapter, manifest)
    in_memory = max_ulp(model.state_dict(), expected)
    files = max_ulp(load_model(apply_files(base, adapter, manifest, out).output).state_dict(), expected)
    print(f"{label}: max {in_memory} ulp in memory, {files} ulp file to file")
    assert in_memory == 0 and files == 0
    changed = {n for n, t in model.state_dict().items() if not torch.equal(t, before[n])}
    assert changed  # the comparison can fail: the adapter changes the model
    assert changed <= set(manifest.base.tensors) | tied_names(model, manifest)
    return expected


def tied_names(model: torch.nn.Module, manifest: Manifest) -> set[str]:
    """Names sharing storage with a touched tensor (GPT-2's lm_head is its wte)."""
    state = model.state_dict()
    pointers = {state[n].untyped_storage().data_ptr() for n in manifest.base.tensors if n in state}
    return {n for n, t in state.items() if t.untyped_storage().data_ptr() in pointers}


def assert_refused_untouched(
    base: Path, adapter: Path, manifest: Manifest, tmp_path: Path, match: str
) -> None:
    model = load_model(base)
    before = snapshot(model)
    with pytest.raises(BaseMismatch, match=match):
        apply_to_module(model, adapter, manifest)
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())
    with pytest.raises(BaseMismatch, match=match):
        apply_files(base, adapter, manifest, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary folder left


def manifest_without_digests(adapter: Path, base: Path) -> Manifest:
    """A manifest as a push with only the base fingerprint would make (no tensor digests)."""
    read = read_peft_adapter(adapter)
    files = [
        FileEntry(
            path=rel,
            digest="sha256:" + hashlib.sha256((adapter / rel).read_bytes()).hexdigest(),
            size=(adapter / rel).stat().st_size,
        )
        for rel in read.files
    ]
    fingerprint = fingerprint_path(base, use_cache=False).value
    return Manifest(
        kind="lora", files=files, base=BaseModelRef(fingerprint=fingerprint), params=read.params()
    )


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The tiny GPT-2 (Conv1D, tied lm_head) in a dtype."""
    built: dict[str, Path] = {}

    def build(dtype: str) -> Path:
        if dtype == "float32":
            return tiny_gpt2()
        if dtype not in built:
            folder = tmp_path_factory.mktemp(f"gpt2-{dtype}")
            load_model(tiny_gpt2()).to(getattr(torch, dtype)).save_pretrained(folder)
            built[dtype] = folder
        return built[dtype]

    return build


@pytest.fixture(scope="module")
def llama_with_bias(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """A tiny Llama whose attention and MLP projections have biases (attention_bias, mlp_bias)."""
    built: dict[str, Path] = {}

    def build(dtype: str) -> Path:
        if dtype not in built:
            from transformers import LlamaConfig, LlamaForCausalLM

            torch.manual_seed(5)
            config = LlamaConfig(**LLAMA_DIMS, attention_bias=True, mlp_bias=True, tie_word_embeddings=False)
            model = LlamaForCausalLM(config)
            with torch.no_grad():  # random biases (they are zero at init), so a wrong merge shows
                for name, parameter in model.named_parameters():
                    if name.endswith(".bias"):
                        parameter.normal_(0, 0.02)
            folder = tmp_path_factory.mktemp(f"llama-bias-{dtype}")
            model.to(getattr(torch, dtype)).save_pretrained(folder)
            built[dtype] = folder
        return built[dtype]

    return build


# --------------------------------------------------------------------------------------------------
# 1. embedding LoRA


def test_embedding_lora_params(
    tiny_llama: Callable[..., Path], lora_adapter: Callable[..., Path], lora_manifest: Callable[..., Manifest]
) -> None:
    base = tiny_llama(dtype="bfloat16")
    adapter = lora_adapter(base, target_modules=("q_proj", "embed_tokens"))
    read = read_peft_adapter(adapter)
    entry = read.params()["modules"]["model.embed_tokens"]
    assert entry == {
        "r": 8,
        "alpha": 16.0,
        "scale": 2.0,
        "base_tensor": "model.embed_tokens.weight",
        "shape": [256, 64],  # (num_embeddings, embedding_dim), as the base stores it
        "lora_A": f"{PREFIX}model.embed_tokens.lora_embedding_A",  # (r, num_embeddings)
        "lora_B": f"{PREFIX}model.embed_tokens.lora_embedding_B",  # (embedding_dim, r)
        "layer": "embedding",
        # PEFT saves the embedding itself (save_embedding_layers="auto") and loads it over the base
        "replace": {
            "model.embed_tokens.weight": {
                "tensor": f"{PREFIX}model.embed_tokens.base_layer.weight",
                "shape": [256, 64],
                "dtype": "BF16",
            }
        },
    }
    assert "layer" not in read.params()["modules"]["model.layers.0.self_attn.q_proj"]
    assert targets_from_params(read.params()) == read.targets
    manifest = lora_manifest(adapter, base)
    assert Manifest.parse(manifest.to_json_obj()).digest == manifest.digest
    assert "model.embed_tokens.weight" in manifest.base.tensors
    check_against_base(read.targets, fingerprint_path(base, use_cache=False).tensors)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding_lora_on_llama_matches_peft(
    tiny_llama: Callable[..., Path],
    lora_adapter: Callable[..., Path],
    lora_manifest: Callable[..., Manifest],
    tmp_path: Path,
    dtype: str,
) -> None:
    base = tiny_llama(dtype=dtype)
    adapter = lora_adapter(base, target_modules=("q_proj", "embed_tokens"), use_rslora=True)
    assert_matches_peft(base, adapter, lora_manifest(adapter, base), tmp_path, f"embedding llama {dtype}")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding_lora_on_tied_gpt2_matches_peft(
    gpt2: Callable[[str], Path],
    lora_adapter: Callable[..., Path],
    lora_manifest: Callable[..., Manifest],
    tmp_path: Path,
    dtype: str,
) -> None:
    base = gpt2(dtype)
    adapter = lora_adapter(base, target_modules=("wte", "c_attn"), fan_in_fan_out=True)
    manifest = lora_manifest(adapter, base)
    assert manifest.params["modules"]["transformer.wte"]["layer"] == "embedding"
    expected = assert_matches_peft(base, adapter, manifest, tmp_path, f"embedding gpt2 {dtype}")
    assert torch.equal(expected["lm_head.weight"], expected["transformer.wte.weight"])  # tied: both changed


def test_embedding_lora_with_a_missing_factor_is_refused(
    tiny_llama: Callable[..., Path], lora_adapter: Callable[..., Path], copy_folder: Callable[[Path], Path]
) -> None:
    from safetensors.torch import load_file, save_file

    folder = copy_folder(lora_adapter(tiny_llama(), target_modules=("q_proj", "embed_tokens")))
    tensors = load_file(folder / "adapter_model.safetensors")
    del tensors[f"{PREFIX}model.embed_tokens.lora_embedding_B"]
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InvalidAdapter, match="model.embed_tokens: lora_embedding_B is missing"):
        read_peft_adapter(folder)


# --------------------------------------------------------------------------------------------------
# 2. LoRA bias


def test_lora_bias_params(gpt2: Callable[[str], Path], lora_adapter: Callable[..., Path]) -> None:
    read = read_peft_adapter(
        lora_adapter(gpt2("float32"), target_modules=("c_attn",), fan_in_fan_out=True, lora_bias=True)
    )
    module = "transformer.h.0.attn.c_attn"
    assert read.params()["modules"][module]["lora_B_bias"] == f"{PREFIX}{module}.lora_B.bias"
    biases = [t for t in read.targets if isinstance(t, BiasTarget)]
    assert [t.base_tensor for t in biases] == [f"transformer.h.{i}.attn.c_attn.bias" for i in range(2)]
    assert all(t.shape == (192,) and t.scale == 2.0 for t in biases)
    assert targets_from_params(read.params()) == read.targets


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_bias_on_gpt2_conv1d_matches_peft(
    gpt2: Callable[[str], Path],
    lora_adapter: Callable[..., Path],
    lora_manifest: Callable[..., Manifest],
    tmp_path: Path,
    dtype: str,
) -> None:
    base = gpt2(dtype)
    adapter = lora_adapter(base, target_modules=("c_attn", "c_fc"), fan_in_fan_out=True, lora_bias=True)
    manifest = lora_manifest(adapter, base)
    assert "transformer.h.1.mlp.c_fc.bias" in manifest.base.tensors
    assert_matches_peft(base, adapter, manifest, tmp_path, f"lora_bias gpt2 {dtype}")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_bias_on_llama_with_biases_matches_peft(
    llama_with_bias: Callable[[str], Path],
    lora_adapter: Callable[..., Path],
    lora_manifest: Callable[..., Manifest],
    tmp_path: Path,
    dtype: str,
) -> None:
    base = llama_with_bias(dtype)
    adapter = lora_adapter(base, target_modules=("q_proj", "v_proj", "down_proj"), lora_bias=True)
    assert_matches_peft(base, adapter, lora_manifest(adapter, base), tmp_path, f"lora_bias llama {dtype}")


@pytest.mark.slow
def test_lora_bias_on_a_layer_without_bias_is_refused_like_peft(
    tiny_llama: Callable[..., Path],
    lora_adapter: Callable[..., Path],
    tmp_path: Path,
) -> None:
    from peft import PeftModel

    base = tiny_llama()  # q_proj has no bias
    with pytest.warns(UserWarning, match="has no bias"):
        adapter = lora_adapter(base, r=4, target_modules=("q_proj",), lora_bias=True)
    with pytest.raises(RuntimeError, match="base layer has no bias"):
        PeftModel.from_pretrained(load_model(base), adapter).merge_and_unload()
    reason = (
        r"model\.layers\.0\.self_attn\.q_proj\.bias is missing: the adapter has a LoRA bias \(lora_bias\)"
    )
    targets = read_peft_adapter(adapter).targets
    with pytest.raises(BaseMismatch, match=reason):  # at push
        check_against_base(targets, fingerprint_path(base, use_cache=False).tensors)
    assert_refused_untouched(base, adapter, manifest_without_digests(adapter, base), tmp_path, reason)


@pytest.mark.parametrize(
    ("lora_bias", "drop_bias", "reason"),
    [
        (False, False, "a LoRA bias, but the config has lora_bias=false"),
        (
            True,
            True,
            "lora_bias is true but base_model.model.transformer.h.0.attn.c_attn.lora_B.bias is missing",
        ),
    ],
)
def test_lora_bias_disagreeing_with_the_config_is_refused(
    gpt2: Callable[[str], Path],
    lora_adapter: Callable[..., Path],
    copy_folder: Callable[[Path], Path],
    lora_bias: bool,
    drop_bias: bool,
    reason: str,
) -> None:
    import json

    from safetensors.torch import load_file, save_file

    folder = copy_folder(
        lora_adapter(gpt2("float32"), target_modules=("c_attn",), fan_in_fan_out=True, lora_bias=True)
    )
    config = json.loads((folder / "adapter_config.json").read_text())
    config["lora_bias"] = lora_bias
    (folder / "adapter_config.json").write_text(json.dumps(config))
    if drop_bias:
        tensors = load_file(folder / "adapter_model.safetensors")
        del tensors[f"{PREFIX}transformer.h.0.attn.c_attn.lora_B.bias"]
        save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InvalidAdapter, match=reason.replace(".", r"\.")):
        read_peft_adapter(folder)


# --------------------------------------------------------------------------------------------------
# 3. modules_to_save


def test_modules_to_save_params(tiny_llama: Callable[..., Path], lora_adapter: Callable[..., Path]) -> None:
    base = tiny_llama(dtype="bfloat16")
    adapter = lora_adapter(base, modules_to_save=("lm_head", "norm"))
    read = read_peft_adapter(adapter)
    modules = read.params()["modules"]
    assert modules["lm_head"] == {
        "replace": {
            "lm_head.weight": {"tensor": f"{PREFIX}lm_head.weight", "shape": [256, 64], "dtype": "BF16"}
        }
    }
    # exactly what the installed PEFT matched ("norm": every layernorm before 0.22, model.norm since)
    replaced = sorted(t.base_tensor for t in read.targets if isinstance(t, ReplaceTarget))
    assert replaced == _modules_peft_saves(base, adapter)
    assert "model.norm.weight" in replaced
    assert len([t for t in read.targets if isinstance(t, LoraTarget)]) == 4
    assert targets_from_params(read.params()) == read.targets


def test_modules_to_save_by_either_peft_rule_are_read(
    tiny_llama: Callable[..., Path], lora_adapter: Callable[..., Path], tmp_path: Path
) -> None:
    """An adapter from PEFT < 0.22, whose plain suffix rule also saved every input_layernorm for "norm",
    applies as it was trained: those saved tensors replace the base's too."""
    from safetensors.torch import load_file, save_file

    base = tiny_llama(dtype="bfloat16")
    folder = tmp_path / "adapter"
    shutil.copytree(lora_adapter(base, modules_to_save=("lm_head", "norm")), folder)
    tensors = load_file(folder / "adapter_model.safetensors")
    layernorms = [f"model.layers.{i}.input_layernorm.weight" for i in range(2)]
    for name in layernorms:
        tensors.setdefault(f"{PREFIX}{name}", torch.full((64,), 0.5, dtype=torch.bfloat16))
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    replaced = {t.base_tensor for t in read_peft_adapter(folder).targets if isinstance(t, ReplaceTarget)}
    assert {"lm_head.weight", "model.norm.weight", *layernorms} <= replaced


def _modules_peft_saves(base: Path, adapter: Path) -> list[str]:
    """The base tensors PEFT itself replaces when it loads ``adapter``: its ModulesToSaveWrapper modules."""
    from peft import PeftModel
    from peft.utils.other import ModulesToSaveWrapper
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    wrapped = [name for name, module in model.named_modules() if isinstance(module, ModulesToSaveWrapper)]
    return sorted(name.removeprefix("base_model.model.") + ".weight" for name in wrapped)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_modules_to_save_on_llama_matches_peft(
    tiny_llama: Callable[..., Path],
    lora_adapter: Callable[..., Path],
    lora_manifest: Callable[..., Manifest],
    tmp_path: Path,
    dtype: str,
) -> None:
    base = tiny_llama(dtype=dtype)
    adapter = lora_adapter(base, modules_to_save=("lm_head", "norm"))
    assert_matches_peft(
        base, adapter, lora_manifest(adapter, base), tmp_path, f"modules_to_save llama {dtype}"
    )


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_modules_to_save_on_gpt2_matches_peft(
    gpt2: Callable[[str], Path],
    lora_adapter: Callable[..., Path],
    lora_manifest: Callable[..., Manifest],
    tmp_path: Path,
    dtype: str,
) -> None:
    base = gpt2(dtype)
    adapter = lora_adapter(base, target_modules=("c_attn",), fan_in_fan_out=True, modules_to_save=("ln_f",))
    manifest = lora_manifest(adapter, base)
    assert set(manifest.params["modules"]["transformer.ln_f"]["replace"]) == {
        "transformer.ln_f.weight",
        "transformer.ln_f.bias",
    }
    assert_matches_peft(base, adapter, manifest, tmp_path, f"modules_to_save gpt2 {dtype}")


@pytest.mark.slow
def test_modules_to_save_of_a_tied_lm_head_is_refused(
    tiny_llama: Callable[..., Path],
    lora_adapter: Callable[..., Path],
    lora_manifest: Callable[..., Manifest],
    tmp_path: Path,
) -> None:
    untied = tiny_llama()
    adapter = lora_adapter(untied, modules_to_save=("lm_head",))
    manifest = lora_manifest(adapter, untied, with_tensors=False)
    tied = tiny_llama(tie_word_embeddings=True)
    model = load_model(tied)
    before = snapshot(model)
    with pytest.raises(BaseMismatch, match=r"lm_head\.weight is tied to model\.embed_tokens\.weight"):
        apply_to_module(model, adapter, manifest)
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())
    with pytest.raises(BaseMismatch, match=r"lm_head\.weight is missing"):  # the tied file stores it once
        apply_files(tied, adapter, manifest, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_modules_to_save_in_another_dtype_than_the_base_is_refused(
    tiny_llama: Callable[..., Path], lora_adapter: Callable[..., Path]
) -> None:
    targets = read_peft_adapter(lora_adapter(tiny_llama(), modules_to_save=("lm_head",))).targets  # F32 copy
    bf16 = fingerprint_path(tiny_llama(dtype="bfloat16"), use_cache=False).tensors
    with pytest.raises(
        BaseMismatch, match=r"lm_head\.weight has dtype BF16, but the adapter saved its replacement"
    ):
        check_against_base(targets, bf16)
