"""Reading PEFT LoRA adapters: resolved params, PEFT's pattern rules, refusals, fit against a base."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import rfc8785
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from deltareg.client.errors import BaseMismatch, InvalidAdapter, InvalidManifest, UnsafeFile
from deltareg.client.fingerprint import TensorInfo, fingerprint_path
from deltareg.client.lora import (
    LoraAdapter,
    check_against_base,
    read_peft_adapter,
    resolve_rank_alpha,
    targets_from_params,
)

Q0 = "model.layers.0.self_attn.q_proj"
V0 = "model.layers.0.self_attn.v_proj"
Q1 = "model.layers.1.self_attn.q_proj"
V1 = "model.layers.1.self_attn.v_proj"


@pytest.fixture(scope="module")
def base(tiny_llama: Callable[..., Path]) -> Path:
    return tiny_llama()


@pytest.fixture(scope="module")
def adapter(base: Path, lora_adapter: Callable[..., Path]) -> Path:
    return lora_adapter(base, r=8, alpha=16)


def _edit_config(folder: Path, **changes: Any) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config, indent=2, sort_keys=True))


def _edit_tensors(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    path = folder / "adapter_model.safetensors"
    with safe_open(path, framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open API)
        metadata = handle.metadata()
    edit(tensors)
    save_file(tensors, path, metadata=metadata)


# --------------------------------------------------------------------------------------------------
# params


def test_params_of_a_plain_adapter(adapter: Path) -> None:
    read = read_peft_adapter(adapter)
    params = read.params()

    assert read.files == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert params["peft_type"] == "LORA"
    assert params["use_rslora"] is False and params["fan_in_fan_out"] is False
    assert params["weights"] == "adapter_model.safetensors"
    assert sorted(params["modules"]) == [Q0, V0, Q1, V1]
    assert params["modules"][Q0] == {
        "r": 8,
        "alpha": 16.0,
        "scale": 2.0,  # alpha / r
        "base_tensor": f"{Q0}.weight",
        "shape": [64, 64],
        "lora_A": f"base_model.model.{Q0}.lora_A.weight",
        "lora_B": f"base_model.model.{Q0}.lora_B.weight",
    }
    assert params["modules"][V0]["shape"] == [32, 64]  # 2 KV heads of 16


def test_params_are_json_safe_deterministic_and_invert(adapter: Path) -> None:
    first, second = read_peft_adapter(adapter), read_peft_adapter(adapter)
    assert rfc8785.dumps(first.params()) == rfc8785.dumps(second.params())
    through_json = json.loads(json.dumps(first.params()))
    assert targets_from_params(through_json) == first.targets
    assert targets_from_params(first.params()) == first.targets


def test_rslora_scale_is_alpha_over_sqrt_r(base: Path, lora_adapter: Callable[..., Path]) -> None:
    read = read_peft_adapter(lora_adapter(base, r=8, alpha=16, use_rslora=True))
    assert read.params()["use_rslora"] is True
    assert {t.scale for t in read.targets} == {16 / math.sqrt(8)}


def test_rank_and_alpha_patterns_resolve_per_module(base: Path, lora_adapter: Callable[..., Path]) -> None:
    folder = lora_adapter(
        base,
        r=8,
        alpha=16,
        rank_pattern={"v_proj": 4, Q1: 2},
        alpha_pattern={"layers.0.self_attn.q_proj": 3},
    )
    modules = read_peft_adapter(folder).params()["modules"]
    assert (modules[Q0]["r"], modules[Q0]["alpha"], modules[Q0]["scale"]) == (8, 3.0, 3 / 8)
    assert (modules[Q1]["r"], modules[Q1]["alpha"], modules[Q1]["scale"]) == (2, 16.0, 8.0)
    assert (modules[V0]["r"], modules[V0]["scale"]) == (4, 4.0)
    assert (modules[V1]["r"], modules[V1]["scale"]) == (4, 4.0)


def test_pattern_resolution_matches_peft_first_match_rule() -> None:
    from peft.utils.other import get_pattern_key as peft_get_pattern_key

    patterns = [
        {"q_proj": 4, r"layers\.1\.self_attn\.q_proj": 2},  # both match layer 1: the first wins
        {r"layers\.1\.self_attn\.q_proj": 2, "q_proj": 4},
        {"proj": 3},  # not a whole name part: never matches
        {r".*attn\.(q|v)_proj": 6, "v_proj": 1},
        {"model.layers.0.self_attn.q_proj": 5},
    ]
    modules = [Q0, Q1, V0, "model.layers.1.mlp.down_proj", "q_proj"]
    for rank_pattern in patterns:
        config = {"r": 8, "lora_alpha": 16, "rank_pattern": rank_pattern, "alpha_pattern": rank_pattern}
        for module in modules:
            key = peft_get_pattern_key(list(rank_pattern), module)
            expected = rank_pattern.get(key, 8)
            r, alpha = resolve_rank_alpha(config, module)
            assert r == expected, (rank_pattern, module)
            assert alpha == rank_pattern.get(key, 16)


def test_pointing_at_the_weights_file_reads_the_folder(adapter: Path) -> None:
    read = read_peft_adapter(adapter / "adapter_model.safetensors")
    assert read.folder == adapter
    assert isinstance(read, LoraAdapter) and len(read.targets) == 4


def test_other_non_pickle_files_are_ignored(adapter: Path, copy_folder: Callable[[Path], Path]) -> None:
    folder = copy_folder(adapter)
    (folder / "tokenizer.json").write_text("{}")
    (folder / "README.md").unlink()
    assert read_peft_adapter(folder).files == ["adapter_config.json", "adapter_model.safetensors"]


def test_library_imports_without_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now raises ImportError
        "import deltareg.client.lora, deltareg.client.manifest, deltareg.client.weights\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------------------------------
# refusals: each made by editing one thing of a real adapter


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"peft_type": "IA3"}, "peft_type is 'IA3'"),
        (
            {"use_dora": True},
            "use_dora is true but base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
        ),
        ({"use_dora": "yes"}, "use_dora must be true or false"),
        (
            {"lora_bias": True},
            "lora_bias is true but base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias",
        ),
        ({"layer_replication": [[0, 1]]}, "layer replication (layer_replication) is not supported"),
        ({"target_parameters": ["mlp.experts.gate_up_proj"]}, "target_parameters"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa' changes the base weights"),
        ({"init_lora_weights": "pissa_niter_4"}, "init_lora_weights='pissa_niter_4' changes the base"),
        ({"init_lora_weights": "olora"}, "init_lora_weights='olora' changes the base weights"),
        ({"init_lora_weights": "corda"}, "init_lora_weights='corda' changes the base weights"),
        ({"init_lora_weights": "loftq"}, "init_lora_weights='loftq' changes the base weights"),
        ({"init_lora_weights": "mica"}, "init_lora_weights='mica' is not supported"),
        ({"bias": "all"}, "bias='all'"),
        ({"rank_pattern": {"v_proj": 4}}, "have rank 8 but the config resolves r=4"),
        ({"rank_pattern": {"v_proj(": 4}}, "not a valid regular expression"),
        ({"r": 0}, "r must be a positive integer"),
    ],
)
def test_refuses_unsupported_config(
    adapter: Path, copy_folder: Callable[[Path], Path], changes: dict[str, Any], reason: str
) -> None:
    folder = copy_folder(adapter)
    _edit_config(folder, **changes)
    with pytest.raises(InvalidAdapter, match=re.escape(reason)):
        read_peft_adapter(folder)


def test_lists_every_config_problem_at_once(adapter: Path, copy_folder: Callable[[Path], Path]) -> None:
    folder = copy_folder(adapter)
    _edit_config(folder, use_dora="yes", layer_replication=[[0, 1]])
    with pytest.raises(InvalidAdapter) as caught:
        read_peft_adapter(folder)
    assert "use_dora" in caught.value.message and "layer_replication" in caught.value.message


def _add(key: str, shape: tuple[int, ...]) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors[key] = torch.zeros(shape)

    return edit


def _replace(key: str, value: torch.Tensor) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors[key] = value

    return edit


def _drop(key: str) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        del tensors[key]

    return edit


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (
            _add("base_model.model.model.embed_tokens.lora_embedding_A", (8, 256)),
            "model.embed_tokens: lora_embedding_B is missing",
        ),
        (
            _add(f"base_model.model.{Q0}.lora_magnitude_vector", (64,)),
            "a DoRA magnitude vector, but the config has use_dora=false",
        ),
        (
            _add(f"base_model.model.{Q0}.lora_B.bias", (64,)),
            "a LoRA bias, but the config has lora_bias=false",
        ),
        (_add(f"base_model.model.{Q0}.lora_A.bias", (8,)), "a bias on lora_A (PEFT never writes one)"),
        (_add(f"base_model.model.{Q0}.lora_embedding_A", (8, 64)), "holds both linear"),
        (
            _add("base_model.model.model.norm.base_layer.weight", (64,)),
            "a saved base layer is only understood",
        ),
        (_add("base_model.model.model.norm.weight", (64,)), "not a LoRA factor this version understands"),
        (_add(f"base_model.model.{Q0}.lora_A.default.weight", (8, 64)), "not a LoRA factor"),
        (_replace(f"base_model.model.{Q0}.lora_A.weight", torch.zeros(7, 64)), "disagree on the rank"),
        (_replace(f"base_model.model.{Q0}.lora_A.weight", torch.zeros(8, 64, 1)), "must be matrices"),
        (
            _replace(f"base_model.model.{Q0}.lora_A.weight", torch.zeros(8, 64, dtype=torch.int32)),
            "dtype I32 is not supported",
        ),
        (_drop(f"base_model.model.{V1}.lora_B.weight"), f"{V1}: lora_B.weight is missing"),
    ],
)
def test_refuses_unsupported_tensors(
    adapter: Path,
    copy_folder: Callable[[Path], Path],
    edit: Callable[[dict[str, torch.Tensor]], None],
    reason: str,
) -> None:
    folder = copy_folder(adapter)
    _edit_tensors(folder, edit)
    with pytest.raises(InvalidAdapter, match=re.escape(reason)):
        read_peft_adapter(folder)


def test_modules_to_save_weights_need_the_config_to_list_them(
    adapter: Path, copy_folder: Callable[[Path], Path]
) -> None:
    folder = copy_folder(adapter)
    _edit_tensors(folder, _add("base_model.model.lm_head.weight", (256, 64)))
    with pytest.raises(InvalidAdapter, match=re.escape("lm_head.weight: not a LoRA factor")):
        read_peft_adapter(folder)  # not listed in modules_to_save: PEFT would not load it
    _edit_config(folder, modules_to_save=["lm_head"])
    replaced = [t for t in read_peft_adapter(folder).targets if t.module == "lm_head"]
    assert [t.base_tensor for t in replaced] == ["lm_head.weight"]
    _edit_config(folder, modules_to_save=["q_proj"])  # a module with LoRA factors cannot also be saved whole
    _edit_tensors(folder, _add(f"base_model.model.{Q0}.weight", (64, 64)))
    with pytest.raises(InvalidAdapter, match="has both LoRA factors and full modules_to_save weights"):
        read_peft_adapter(folder)


def test_refuses_an_adapter_without_lora_weights(adapter: Path, copy_folder: Callable[[Path], Path]) -> None:
    folder = copy_folder(adapter)
    save_file({}, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InvalidAdapter, match="holds no LoRA weights"):
        read_peft_adapter(folder)


@pytest.mark.parametrize("missing", ["adapter_config.json", "adapter_model.safetensors"])
def test_refuses_a_folder_missing_a_file(
    adapter: Path, copy_folder: Callable[[Path], Path], missing: str
) -> None:
    folder = copy_folder(adapter)
    (folder / missing).unlink()
    with pytest.raises(InvalidAdapter, match=re.escape(f"{missing} missing")):
        read_peft_adapter(folder)


def test_refuses_pickle_only_weights(adapter: Path, copy_folder: Callable[[Path], Path]) -> None:
    folder = copy_folder(adapter)
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    with pytest.raises(UnsafeFile, match="adapter_model.bin, a pickle"):
        read_peft_adapter(folder)


def test_refuses_a_folder_holding_pickles(adapter: Path, copy_folder: Callable[[Path], Path]) -> None:
    folder = copy_folder(adapter)
    (folder / "training_args.bin").write_bytes(b"\x80\x04N.")
    with pytest.raises(UnsafeFile, match="training_args.bin"):
        read_peft_adapter(folder)


def test_points_at_a_named_adapter_subfolder(adapter: Path, tmp_path: Path) -> None:
    import shutil

    shutil.copytree(adapter, tmp_path / "my_adapter")
    with pytest.raises(InvalidAdapter, match="sub-folders: my_adapter"):
        read_peft_adapter(tmp_path)


# --------------------------------------------------------------------------------------------------
# targets_from_params: manifest params are checked


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda p: p["modules"][Q0].update(scale=2.5), "scale 2.5 is not alpha/r"),
        (lambda p: p["modules"][Q0].update(base_tensor="lm_head.weight"), "base_tensor must be"),
        (lambda p: p["modules"][Q0].update(shape=[64]), "shape must be two positive integers"),
        (lambda p: p["modules"][Q0].update(r=True), "r must be a positive integer"),
        (lambda p: p["modules"][Q0].pop("lora_A"), "expected the keys"),
        (lambda p: p["modules"][Q0].update(extra=1), "expected the keys"),
        (lambda p: p["modules"][Q0].update(layer="conv"), "layer must be 'embedding'"),
        (
            lambda p: p["modules"][Q0].update(layer="embedding", lora_B_bias="k"),
            "only valid on a linear layer",
        ),
        (lambda p: p["modules"].update(x={"lora_B_bias": "k"}), "need the LoRA keys"),
        (lambda p: p["modules"].update(x={"replace": {}}), "replace must be a non-empty object"),
        (
            lambda p: p["modules"].update(
                x={"replace": {"y.weight": {"tensor": "t", "shape": [1], "dtype": "F32"}}}
            ),
            "'y.weight' is not a tensor of this module",
        ),
        (
            lambda p: p["modules"].update(
                x={"replace": {"x.weight": {"tensor": "t", "shape": [1], "dtype": "I8"}}}
            ),
            "dtype must be one of",
        ),
        (
            lambda p: p.update(
                modules={"x": {"replace": {"x.w": {"tensor": "t", "shape": [], "dtype": "F32"}}}}
            ),
            "no module has LoRA factors",
        ),
        (lambda p: p.update(use_rslora="yes"), "use_rslora must be true or false"),
        (lambda p: p.update(weights="../x.safetensors"), "weights must be"),
        (lambda p: p.update(modules={}), "modules must be a non-empty object"),
        (lambda p: p.update(peft_type="IA3"), "peft_type must be 'LORA'"),
    ],
)
def test_targets_from_params_refuses_bad_params(
    adapter: Path, edit: Callable[[dict[str, Any]], None], reason: str
) -> None:
    params = json.loads(json.dumps(read_peft_adapter(adapter).params()))
    edit(params)
    with pytest.raises(InvalidManifest, match=re.escape(reason)):
        targets_from_params(params)


# --------------------------------------------------------------------------------------------------
# check_against_base


def test_check_against_base_accepts_the_right_base(adapter: Path, base: Path) -> None:
    check_against_base(read_peft_adapter(adapter).targets, fingerprint_path(base, use_cache=False).tensors)


def test_check_against_base_lists_all_problems(adapter: Path, base: Path) -> None:
    tensors = dict(fingerprint_path(base, use_cache=False).tensors)
    del tensors[f"{Q0}.weight"]
    tensors[f"{V1}.weight"] = TensorInfo("F32", (64, 64), tensors[f"{V1}.weight"].digest)
    tensors[f"{Q1}.weight"] = TensorInfo("I8", (64, 64), tensors[f"{Q1}.weight"].digest)
    with pytest.raises(BaseMismatch) as caught:
        check_against_base(read_peft_adapter(adapter).targets, tensors)
    message = caught.value.message
    assert message.startswith("the adapter does not fit this base model: ")
    assert f"{Q0}.weight is missing" in message
    assert f"{V1}.weight has shape [64, 64], the adapter expects [32, 64]" in message
    assert f"{Q1}.weight has dtype I8" in message
