"""Dense deltas (kind "full"): diff then apply gives the tuned model back bit for bit, in every encoding,
compressed or not, file to file and in memory; every refusal leaves nothing behind."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import zstandard
from _support.tensors import load_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from deltareg.client.apply import Step, apply_files, apply_steps_to_state_dict, apply_to_module
from deltareg.client.dense import DenseParams, read_dense_delta
from deltareg.client.diff import diff_models
from deltareg.client.errors import (
    BaseMismatch,
    InvalidDelta,
    InvalidInput,
    InvalidModel,
    ResultMismatch,
    UnsafeFile,
)
from deltareg.client.fingerprint import fingerprint_path
from deltareg.client.manifest import BaseModelRef, FileEntry, Manifest
from deltareg.client.transfer import file_digest
from deltareg.client.weights import find_weight_files

EMBED = "model.embed_tokens.weight"
UNCHANGED = "model.layers.0.input_layernorm.weight"
ENCODINGS = [("xor", "zstd"), ("xor", "none"), ("add", "zstd"), ("add", "none")]


def fine_tune(base: Path, out: Path, *, seed: int = 7, new_tokens: int = 0, noise: float = 0.002) -> Path:
    """What a full fine-tune leaves: every weight but one moved a little (some across zero), and, with
    ``new_tokens``, the vocabulary resized (embedding and LM head get new rows, config.json changes)."""
    model = load_model(base)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name == UNCHANGED:
                continue
            moved = param.float() + torch.randn(param.shape, generator=generator) * noise
            param.copy_(moved.to(param.dtype))
        if new_tokens:
            model.resize_token_embeddings(model.config.vocab_size + new_tokens, mean_resizing=False)
    sharded = (base / "model.safetensors.index.json").exists()
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    model.save_pretrained(out, max_shard_size=total // 4 if sharded else "5GB")
    return out


def tensors_of(model: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in find_weight_files(model):
        tensors.update(load_file(path))
    return tensors


def assert_bit_identical(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype and actual[name].shape == tensor.shape, name
        assert torch.equal(actual[name].view(torch.uint8), tensor.view(torch.uint8)), name


def manifest_of(delta: Path, base: Path | None = None) -> Manifest:
    """The manifest push makes for a diff output folder (the folder doubles as the version folder), with
    the digests of the base tensors it changes when ``base`` is given (what a fast apply checks)."""
    read = read_dense_delta(delta)
    touched = {}
    if base is not None:
        digests = fingerprint_path(base).tensors
        touched = {t.base_tensor: digests[t.base_tensor].digest for t in read.targets if not t.entry.is_new}
    files = [
        FileEntry(path=p, digest=file_digest(delta / p), size=(delta / p).stat().st_size) for p in read.files
    ]
    return Manifest(
        kind="full",
        files=files,
        base=BaseModelRef(fingerprint=read.params.base_fingerprint, tensors=touched),
        params=read.raw_params,
    )


@pytest.fixture(scope="module")
def models(
    tiny_llama: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., tuple[Path, Path]]:
    """(base, tuned) pairs, built once per module."""
    built: dict[tuple[Any, ...], tuple[Path, Path]] = {}

    def build(*, dtype: str = "bfloat16", sharded: bool = False, new_tokens: int = 0) -> tuple[Path, Path]:
        key = (dtype, sharded, new_tokens)
        if key not in built:
            base = tiny_llama(dtype=dtype, sharded=sharded)
            tuned = fine_tune(base, tmp_path_factory.mktemp("tuned"), new_tokens=new_tokens)
            built[key] = (base, tuned)
        return built[key]

    return build


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize(("encoding", "compression"), ENCODINGS)
def test_apply_of_diff_is_the_tuned_model_bit_for_bit(models, tmp_path, dtype, encoding, compression):
    base, tuned = models(dtype=dtype)
    result = diff_models(base, tuned, tmp_path / "delta", encoding=encoding, compression=compression)

    params = result.params
    assert UNCHANGED not in params.tensors  # identical tensors are left out
    assert params.stats.identical == 1
    assert {e.op for e in params.tensors.values()} == {encoding}
    codecs = {e.data.codec for e in params.tensors.values()}
    assert codecs == ({"raw"} if compression == "none" else {"zstd-planes"})

    applied = apply_files(base, tmp_path / "delta", manifest_of(tmp_path / "delta"), tmp_path / "merged")
    assert_bit_identical(tensors_of(tmp_path / "merged"), tensors_of(tuned))
    tuned_fingerprint = fingerprint_path(tuned).value
    assert applied.fingerprint == tuned_fingerprint == params.result_fingerprint
    assert fingerprint_path(tmp_path / "merged").value == tuned_fingerprint


def test_compression_shrinks_a_bf16_delta_and_the_push_can_show_the_ratio(models, tmp_path):
    base, tuned = models()
    packed = diff_models(base, tuned, tmp_path / "packed").params.stats
    raw = diff_models(base, tuned, tmp_path / "raw", compression="none").params.stats
    assert packed.stored_bytes < raw.stored_bytes
    assert (
        packed.ratio > 1.2
    )  # sign and exponent bits barely change: the XOR's high byte plane is nearly zero
    assert raw.ratio < 1.0  # raw XOR bits are as large as the weights, plus the header
    assert (
        packed.changed_bytes
        == raw.changed_bytes
        == sum(t.numel() * t.element_size() for n, t in tensors_of(tuned).items() if n != UNCHANGED)
    )


def test_a_resized_vocabulary_round_trips_and_loads_with_transformers(models, tmp_path):
    base, tuned = models(sharded=True, new_tokens=8)
    result = diff_models(base, tuned, tmp_path / "delta")
    entry = result.params.tensors[EMBED]
    assert (entry.op, entry.base_shape, entry.shape) == ("replace", (256, 64), (264, 64))
    assert result.params.files == ["files/config.json"]  # vocab_size changed; nothing else did

    apply_files(base, tmp_path / "delta", manifest_of(tmp_path / "delta"), tmp_path / "merged")
    assert_bit_identical(tensors_of(tmp_path / "merged"), tensors_of(tuned))
    index = json.loads((tmp_path / "merged" / "model.safetensors.index.json").read_text())
    sizes = sum(t.numel() * t.element_size() for t in tensors_of(tuned).values())
    assert index["metadata"]["total_size"] == sizes
    model = load_model(tmp_path / "merged")
    assert model.config.vocab_size == 264
    assert model.get_input_embeddings().weight.shape == (264, 64)
    ids = torch.tensor([[1, 260, 5]])
    assert torch.equal(model(ids).logits, load_model(tuned)(ids).logits)


def test_in_memory_apply_to_a_state_dict_and_a_module(models, tmp_path):
    base, tuned = models()
    diff_models(base, tuned, tmp_path / "delta", encoding="add")
    steps = [Step(tmp_path / "delta", manifest_of(tmp_path / "delta"))]

    state = tensors_of(base)
    apply_steps_to_state_dict(state, steps)
    assert_bit_identical(state, tensors_of(tuned))

    module = load_model(base)
    apply_to_module(module, tmp_path / "delta", steps[0].manifest)
    assert_bit_identical({k: v.detach() for k, v in module.state_dict().items()}, tensors_of(tuned))


def test_a_module_refuses_a_resizing_delta_but_a_state_dict_takes_it(models, tmp_path):
    base, tuned = models(new_tokens=8)
    diff_models(base, tuned, tmp_path / "delta")
    manifest = manifest_of(tmp_path / "delta")
    module = load_model(base)
    before = {k: v.detach().clone() for k, v in module.state_dict().items()}

    with pytest.raises(InvalidInput, match="adds or resizes tensors.*file to file"):
        apply_to_module(module, tmp_path / "delta", manifest)
    assert_bit_identical({k: v.detach() for k, v in module.state_dict().items()}, before)

    state = tensors_of(base)
    apply_steps_to_state_dict(state, [Step(tmp_path / "delta", manifest)])
    assert_bit_identical(state, tensors_of(tuned))


def single_file_model(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_the_add_encoding_sets_the_elements_fp32_addition_cannot_reproduce(tmp_path):
    # 1024 -> 2**-20: fp32(2**-20 - 1024) rounds to -1024, so base + delta gives 0, not 2**-20.
    base = torch.tensor([1024.0, 1.0, -0.5, 3.0], dtype=torch.bfloat16)
    tuned = torch.tensor([2.0**-20, 1.0078125, -0.5, 3.0], dtype=torch.bfloat16)
    base_dir = single_file_model(tmp_path / "base", {"w": base})
    tuned_dir = single_file_model(tmp_path / "tuned", {"w": tuned})
    assert ((base.float() + (tuned.float() - base.float())).to(torch.bfloat16) != tuned).any()

    entry = diff_models(base_dir, tuned_dir, tmp_path / "delta", encoding="add").params.tensors["w"]
    assert entry.fix_index is not None and entry.fix_index.shape == (1,)
    apply_files(base_dir, tmp_path / "delta", manifest_of(tmp_path / "delta"), tmp_path / "merged")
    assert_bit_identical(tensors_of(tmp_path / "merged"), {"w": tuned})


def test_a_new_tensor_and_a_non_float_tensor_are_stored_whole(tmp_path):
    base = {"w": torch.ones(4, dtype=torch.float32), "step": torch.tensor([1], dtype=torch.int64)}
    tuned = {
        **base,
        "step": torch.tensor([2], dtype=torch.int64),
        "extra": torch.arange(3, dtype=torch.float16),
    }
    base_dir = single_file_model(tmp_path / "base", base)
    tuned_dir = single_file_model(tmp_path / "tuned", tuned)
    params = diff_models(base_dir, tuned_dir, tmp_path / "delta").params
    assert {n: (e.op, e.is_new) for n, e in params.tensors.items()} == {
        "step": ("replace", False),
        "extra": ("replace", True),
    }
    apply_files(base_dir, tmp_path / "delta", manifest_of(tmp_path / "delta"), tmp_path / "merged")
    assert_bit_identical(tensors_of(tmp_path / "merged"), tuned)


# --------------------------------------------------------------------------------------------------
# Refusals: each leaves nothing behind


def test_diff_refuses_a_tuned_model_without_some_base_tensors(tmp_path):
    base_dir = single_file_model(tmp_path / "base", {"a": torch.ones(2), "b": torch.ones(2)})
    tuned_dir = single_file_model(tmp_path / "tuned", {"a": torch.zeros(2)})
    with pytest.raises(InvalidModel, match="lacks 1 tensors.*'?b'?.*cannot remove"):
        diff_models(base_dir, tuned_dir, tmp_path / "delta")
    assert not (tmp_path / "delta").exists()


def test_diff_refuses_identical_models_pickles_and_an_existing_output(models, tmp_path):
    base, _ = models()
    with pytest.raises(InvalidInput, match="no delta"):
        diff_models(base, base, tmp_path / "delta")
    assert not (tmp_path / "delta").exists()

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(UnsafeFile):
        diff_models(base, pickled, tmp_path / "delta")

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(InvalidInput, match="already exists"):
        diff_models(base, base, tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


def test_apply_refuses_another_base_and_writes_nothing(models, tiny_llama, tmp_path):
    base, tuned = models()
    diff_models(base, tuned, tmp_path / "delta")
    other = tiny_llama(dtype="bfloat16", seed=3)  # same names and shapes, other values
    with pytest.raises(BaseMismatch, match="wrong base model"):
        apply_files(other, tmp_path / "delta", manifest_of(tmp_path / "delta"), tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["delta"]  # no temporary folder left either


def test_apply_with_the_wrong_expected_result_writes_nothing(models, tmp_path):
    base, tuned = models()
    diff_models(base, tuned, tmp_path / "delta")
    manifest = manifest_of(tmp_path / "delta", base)
    wrong = fingerprint_path(base).value
    with pytest.raises(ResultMismatch, match=f"{wrong} was expected"):
        apply_files(base, tmp_path / "delta", manifest, tmp_path / "merged", expect=wrong)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["delta"]

    right = fingerprint_path(tuned).value
    for verify in ("full", "touched"):
        result = apply_files(
            base, tmp_path / "delta", manifest, tmp_path / verify, expect=right, verify=verify
        )
        assert result.fingerprint == right


def rewrite_stored(delta: Path, change: Callable[[str, torch.Tensor], torch.Tensor]) -> None:
    tensors = load_file(delta / "delta.safetensors")
    save_file({k: change(k, v) for k, v in tensors.items()}, delta / "delta.safetensors")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        # flipped bytes inside a zstd frame
        (lambda k, v: torch.cat([v[:12], v[12:40] ^ 0x5A, v[40:]]), "does not decode|declares"),
        # a valid frame that would expand to twice the declared size: refused before decompressing
        (
            lambda k, v: torch.frombuffer(
                bytearray(zstandard.ZstdCompressor().compress(bytes(2 * declared_size(k)))), dtype=torch.uint8
            ),
            "declares",
        ),
    ],
    ids=["corrupt-frame", "expands-beyond-declared-size"],
)
def test_a_damaged_compressed_tensor_is_refused_and_nothing_is_written(models, tmp_path, damage, message):
    base, tuned = models()
    diff_models(base, tuned, tmp_path / "delta")
    target = "xor/model.layers.1.mlp.down_proj.weight"
    rewrite_stored(tmp_path / "delta", lambda k, v: damage(k, v) if k == target else v)
    manifest = manifest_of(tmp_path / "delta")  # digests of the damaged file: only decoding can tell

    with pytest.raises(InvalidDelta, match=message):
        apply_files(base, tmp_path / "delta", manifest, tmp_path / "merged")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["delta"]
    module = load_model(base)
    before = {k: v.detach().clone() for k, v in module.state_dict().items()}
    with pytest.raises(InvalidDelta, match=message):
        apply_to_module(module, tmp_path / "delta", manifest)
    assert_bit_identical({k: v.detach() for k, v in module.state_dict().items()}, before)


def declared_size(key: str) -> int:
    return 64 * 128 * 2  # down_proj of the tiny Llama, bf16


def test_a_delta_folder_whose_config_and_weights_disagree_is_refused(models, tmp_path):
    base, tuned = models()
    diff_models(base, tuned, tmp_path / "delta")
    rewrite_stored(tmp_path / "delta", lambda k, v: v)
    tensors = load_file(tmp_path / "delta" / "delta.safetensors")
    save_file({**tensors, "stowaway": torch.zeros(1)}, tmp_path / "delta" / "delta.safetensors")
    with pytest.raises(InvalidDelta, match="stowaway"):
        read_dense_delta(tmp_path / "delta")

    config = json.loads((tmp_path / "delta" / "delta_config.json").read_text())
    config["tensors"]["model.norm.weight"]["op"] = "xor"
    config["tensors"]["model.norm.weight"]["data"]["dtype"] = "F32"  # xor of BF16 stores I16
    (tmp_path / "delta" / "delta_config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidDelta, match="stores I16"):
        read_dense_delta(tmp_path / "delta")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda e: e.update(op="xor", base_dtype="I64", dtype="I64"), "floating-point"),
        (lambda e: e.update(base_shape=[2, 2]), "keeps the base tensor's dtype and shape"),
        (lambda e: e.update(base_dtype=None), "go together"),
        (lambda e: e["data"].update(shape=[-1]), "negative dimension"),
    ],
)
def test_inconsistent_entries_are_refused(edit, message):
    entry: dict[str, Any] = {
        "op": "add",
        "dtype": "BF16",
        "shape": [4],
        "base_dtype": "BF16",
        "base_shape": [4],
        "data": {"key": "add/w", "dtype": "F32", "shape": [4], "codec": "raw"},
    }
    edit(entry)
    params = {
        "format": "deltareg.dense.v1",
        "encoding": "add",
        "compression": "none",
        "base_fingerprint": "tmv1:" + "0" * 64,
        "result_fingerprint": "tmv1:" + "1" * 64,
        "result_dtype": "BF16",
        "tensors": {"w": entry},
        "stats": {"identical": 0, "changed_bytes": 8, "stored_bytes": 100},
    }
    with pytest.raises(InvalidDelta, match=message):
        DenseParams.parse(params, "test")


def test_stored_tensors_hold_what_their_entries_say(models, tmp_path):
    """The stored XOR bits decode to exactly tuned ^ base: the format is what the docs say, not just
    something this code happens to read back."""
    base, tuned = models()
    params = diff_models(base, tuned, tmp_path / "delta", compression="zstd").params
    name = "model.layers.0.self_attn.q_proj.weight"
    stored = params.tensors[name].data
    with safe_open(tmp_path / "delta" / "delta.safetensors", framework="pt") as handle:
        packed = handle.get_tensor(stored.key).numpy().tobytes()
    raw = zstandard.ZstdDecompressor().decompress(packed)
    count = math.prod(stored.shape)
    low, high = raw[:count], raw[count:]  # byte planes: every element's first byte, then every second
    xor = torch.frombuffer(
        bytearray(bytes(b for pair in zip(low, high, strict=True) for b in pair)), dtype=torch.int16
    )
    expected = tensors_of(tuned)[name].view(torch.int16) ^ tensors_of(base)[name].view(torch.int16)
    assert torch.equal(xor.reshape(stored.shape), expected)
