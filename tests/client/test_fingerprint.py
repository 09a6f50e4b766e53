"""The base fingerprint tmv1 (deltareg.client.fingerprint), against DESIGN.md's definition."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from deltareg.client.errors import InvalidModel, InvalidSafetensors, UnsafeFile
from deltareg.client.fingerprint import (
    FileKey,
    FingerprintCache,
    ModelFingerprint,
    TensorInfo,
    combine,
    fingerprint_path,
    fingerprint_state_dict,
    is_fingerprint,
    tensor_digests,
    tensor_digests_of_state_dict,
)

Tensors = dict[str, torch.Tensor]


# --------------------------------------------------------------------------------------------------
# Fixtures and writers


@pytest.fixture
def tensors() -> Tensors:
    generator = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(16, 8, generator=generator),
        "model.layers.0.mlp.up_proj.weight": torch.randn(12, 8, generator=generator).to(torch.bfloat16),
        "model.layers.0.input_layernorm.weight": torch.randn(8, generator=generator).to(torch.float16),
        "model.layers.1.mlp.up_proj.weight": torch.randn(12, 8, generator=generator).to(torch.bfloat16),
        "model.step": torch.tensor(3, dtype=torch.int64),
        "model.mask": torch.tensor([True, False, True]),
        "model.empty": torch.zeros(0, 4),
    }


@pytest.fixture
def cache(tmp_path: Path) -> FingerprintCache:
    return FingerprintCache(tmp_path / "cache")


@pytest.fixture(autouse=True)
def private_default_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Whatever a test does, the default cache is not the user's home cache."""
    monkeypatch.setenv("DELTAREG_CACHE_DIR", str(tmp_path / "default-cache"))
    return tmp_path / "default-cache"


def save_single(folder: Path, tensors: Tensors) -> Path:
    folder.mkdir(parents=True)
    save_file(tensors, folder / "model.safetensors")
    return folder


def save_shards(folder: Path, tensors: Tensors, *, index: bool, count: int = 3) -> Path:
    folder.mkdir(parents=True)
    names = list(tensors)
    weight_map = {}
    for number in range(count):
        shard = f"model-{number + 1:05d}-of-{count:05d}.safetensors"
        part = {name: tensors[name] for name in names[number::count]}
        save_file(part, folder / shard, metadata={"shard": str(number)})
        weight_map.update(dict.fromkeys(part, shard))
    if index:
        text = json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})
        (folder / "model.safetensors.index.json").write_text(text)
    return folder


def write_raw(
    path: Path, entries: list[tuple[str, str, list[int], bytes]], metadata: dict[str, str] | None = None
) -> Path:
    """A safetensors file written in exactly the given entry order (save_file sorts its own way)."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, dtype, shape, data in entries:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"".join(e[3] for e in entries))
    return path


# --------------------------------------------------------------------------------------------------
# The format


def test_known_answer_pins_the_exact_bytes(tmp_path: Path) -> None:
    weight = struct.pack("<4f", 1.0, 2.0, 3.0, 4.0)
    bias = struct.pack("<e", 1.0)
    path = write_raw(
        tmp_path / "m.safetensors", [("a.weight", "F32", [2, 2], weight), ("B.bias", "F16", [], bias)]
    )

    weight_digest = hashlib.sha256(b"F32|2,2\n" + weight).hexdigest()
    bias_digest = hashlib.sha256(b"F16|\n" + bias).hexdigest()
    # "B" (0x42) sorts before "a" (0x61) by UTF-8 bytes.
    lines = f"B.bias\t{bias_digest}\na.weight\t{weight_digest}\n".encode()
    expected = "tmv1:" + hashlib.sha256(lines).hexdigest()

    result = fingerprint_path(path, use_cache=False)
    assert result.value == expected
    assert result.value == "tmv1:d9b6cbbd9f00a5c4a8acf4b866977a364759ee40c4c4621f2b1b112204dd2b8d"
    assert result.tensors == {
        "B.bias": TensorInfo("F16", (), bias_digest),
        "a.weight": TensorInfo("F32", (2, 2), weight_digest),
    }
    assert list(result.tensors) == ["B.bias", "a.weight"]
    assert combine(result.tensors) == expected
    in_memory = {
        "a.weight": torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
        "B.bias": torch.tensor(1.0, dtype=torch.float16),
    }
    assert fingerprint_state_dict(in_memory) == result


def test_names_sort_by_utf8_bytes() -> None:
    info = TensorInfo("U8", (1,), "0" * 64)
    # U+FF5E (3 UTF-8 bytes, ef bd 9e) sorts before U+1F600 (4 bytes, f0 ...), as in code point order,
    # but after it in UTF-16 order; "Z" sorts before "a".
    names = ["\U0001f600", "a", "Z", "\uff5e"]
    lines = "".join(f"{n}\t{'0' * 64}\n" for n in ["Z", "a", "\uff5e", "\U0001f600"])
    assert combine(dict.fromkeys(names, info)) == "tmv1:" + hashlib.sha256(lines.encode()).hexdigest()


def test_is_fingerprint() -> None:
    assert is_fingerprint("tmv1:" + "0a" * 32)
    assert not is_fingerprint("tmv1:" + "0A" * 32)
    assert not is_fingerprint("tmv1:" + "0" * 63)
    assert not is_fingerprint("tmv2:" + "0" * 64)
    assert not is_fingerprint("sha256:" + "0" * 64)
    assert not is_fingerprint("tmv1:" + "0" * 64 + "\n")


# --------------------------------------------------------------------------------------------------
# One value for every layout


def test_every_layout_gives_one_value(tmp_path: Path, tensors: Tensors) -> None:
    single = fingerprint_path(save_single(tmp_path / "single", tensors), use_cache=False)
    as_file = fingerprint_path(tmp_path / "single" / "model.safetensors", use_cache=False)
    indexed = fingerprint_path(save_shards(tmp_path / "indexed", tensors, index=True), use_cache=False)
    no_index = fingerprint_path(save_shards(tmp_path / "no-index", tensors, index=False), use_cache=False)
    in_memory = fingerprint_state_dict(tensors)

    assert is_fingerprint(single.value)
    assert single == as_file == indexed == no_index == in_memory
    assert set(single.tensors) == set(tensors)
    assert len(list((tmp_path / "indexed").glob("*.safetensors"))) == 3


def test_header_order_and_metadata_do_not_matter(tmp_path: Path) -> None:
    entries = [
        ("x", "U8", [3], b"\x01\x02\x03"),
        ("y", "I16", [2], b"\x00\x01\x00\x02"),
        ("z", "BOOL", [], b"\x01"),
    ]
    forward = write_raw(tmp_path / "forward.safetensors", entries)
    backward = write_raw(
        tmp_path / "backward.safetensors", entries[::-1], metadata={"format": "pt", "x": "y"}
    )
    assert forward.read_bytes() != backward.read_bytes()
    assert fingerprint_path(forward, use_cache=False) == fingerprint_path(backward, use_cache=False)


def variants(tensors: Tensors) -> dict[str, Tensors]:
    embed = "model.embed_tokens.weight"
    changed = dict(tensors)
    changed[embed] = tensors[embed].clone()
    changed[embed][3, 5] += 1.0
    renamed = {("model.embed.weight" if n == embed else n): t for n, t in tensors.items()}
    retyped = dict(tensors)
    retyped[embed] = tensors[embed].view(torch.int32)  # same bytes, another dtype
    reshaped = dict(tensors)
    reshaped[embed] = tensors[embed].reshape(8, 16)  # same bytes, another shape
    return {"base": tensors, "changed": changed, "renamed": renamed, "retyped": retyped, "reshaped": reshaped}


def test_any_change_gives_another_value(tmp_path: Path, tensors: Tensors) -> None:
    values = {}
    for label, variant in variants(tensors).items():
        from_memory = fingerprint_state_dict(variant).value
        from_files = fingerprint_path(
            save_shards(tmp_path / label, variant, index=True), use_cache=False
        ).value
        assert from_memory == from_files
        values[label] = from_memory
    assert len(set(values.values())) == len(values), values


def test_non_contiguous_and_conjugate_free_views_hash_as_their_values(tensors: Tensors) -> None:
    weight = torch.randn(8, 12)
    transposed = {"w": weight.t()}
    assert not transposed["w"].is_contiguous()
    assert fingerprint_state_dict(transposed) == fingerprint_state_dict({"w": weight.t().contiguous()})
    sliced = {"w": weight[:, ::2]}
    assert fingerprint_state_dict(sliced) == fingerprint_state_dict({"w": weight[:, ::2].clone()})


def test_worker_count_does_not_change_the_result(tmp_path: Path, tensors: Tensors) -> None:
    folder = save_shards(tmp_path / "m", tensors, index=False)
    one = fingerprint_path(folder, use_cache=False, workers=1)
    assert fingerprint_path(folder, use_cache=False, workers=4) == one
    assert fingerprint_state_dict(tensors, workers=1) == fingerprint_state_dict(tensors, workers=3) == one
    with pytest.raises(ValueError, match="workers"):
        fingerprint_path(folder, use_cache=False, workers=0)


# --------------------------------------------------------------------------------------------------
# Tied weights


def test_tied_weights_count_once_under_the_first_name() -> None:
    weight = torch.randn(4, 4)
    tied = fingerprint_state_dict({"embed": weight, "head": weight})
    assert list(tied.tensors) == ["embed"]
    assert tied == fingerprint_state_dict({"embed": weight})
    assert list(fingerprint_state_dict({"head": weight, "embed": weight}).tensors) == ["head"]


def test_only_exact_aliases_are_tied() -> None:
    weight = torch.randn(4, 4)
    for other in (weight.clone(), weight[1:], weight.view(16), weight.t(), weight.view(torch.int32)):
        assert len(fingerprint_state_dict({"a": weight, "b": other}).tensors) == 2
    halves = torch.randn(8)
    # Same storage, shape, stride and dtype, but another offset: two different tensors.
    assert len(fingerprint_state_dict({"a": halves[:4], "b": halves[4:]}).tensors) == 2
    empty = {"a": torch.zeros(0), "b": torch.zeros(0)}
    assert len(fingerprint_state_dict(empty).tensors) == 2


@pytest.mark.slow
def test_tied_transformers_model_matches_its_save_pretrained_folder(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=128,
        intermediate_size=64,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    state = model.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    model.save_pretrained(tmp_path / "saved")
    assert list((tmp_path / "saved").glob("*.safetensors"))

    in_memory = fingerprint_state_dict(state)
    on_disk = fingerprint_path(tmp_path / "saved", use_cache=False)

    assert in_memory == on_disk
    assert "lm_head.weight" not in in_memory.tensors
    assert "model.embed_tokens.weight" in in_memory.tensors


# --------------------------------------------------------------------------------------------------
# Partial digests


def test_tensor_digests_hash_only_the_named_tensors(tmp_path: Path, tensors: Tensors) -> None:
    folder = save_shards(tmp_path / "m", tensors, index=True)
    full = fingerprint_path(folder, use_cache=False)
    names = ["model.layers.1.mlp.up_proj.weight", "model.embed_tokens.weight"]

    partial = tensor_digests(folder, names, use_cache=False)

    assert partial == {name: full.tensors[name] for name in sorted(names)}
    assert tensor_digests_of_state_dict(tensors, names) == partial
    with pytest.raises(InvalidModel, match="no tensor named 'ghost'"):
        tensor_digests(folder, ["ghost", *names], use_cache=False)
    with pytest.raises(InvalidModel, match="no tensor named 'ghost'"):
        tensor_digests_of_state_dict(tensors, ["ghost"])


# --------------------------------------------------------------------------------------------------
# The cache


def only_entry(cache: FingerprintCache) -> Path:
    entries: list[Path] = list(cache.directory.glob("*.json"))
    assert len(entries) == 1
    return entries[0]


def tamper(entry: Path, name: str, digest: str) -> None:
    data = json.loads(entry.read_text())
    data["tensors"][name][2] = digest
    entry.write_text(json.dumps(data))


def test_second_call_uses_the_cache(tmp_path: Path, tensors: Tensors, cache: FingerprintCache) -> None:
    path = save_single(tmp_path / "m", tensors) / "model.safetensors"
    first = fingerprint_path(path, cache=cache)
    assert (cache.hits, cache.misses) == (0, 1)

    assert fingerprint_path(path, cache=cache) == first
    assert (cache.hits, cache.misses) == (1, 1)

    # Proof that nothing was hashed: a digest planted in the entry comes back as is.
    planted = "f" * 64
    tamper(only_entry(cache), "model.step", planted)
    from_cache = fingerprint_path(path, cache=cache)
    assert from_cache.tensors["model.step"].digest == planted
    assert from_cache.value != first.value
    assert tensor_digests(path, ["model.step"], cache=cache)["model.step"].digest == planted


def test_touching_the_file_invalidates(tmp_path: Path, tensors: Tensors, cache: FingerprintCache) -> None:
    path = save_single(tmp_path / "m", tensors) / "model.safetensors"
    first = fingerprint_path(path, cache=cache)
    tamper(only_entry(cache), "model.step", "f" * 64)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))

    assert fingerprint_path(path, cache=cache) == first
    assert (cache.hits, cache.misses) == (0, 2)


def test_cache_is_per_file(tmp_path: Path, tensors: Tensors, cache: FingerprintCache) -> None:
    folder = save_shards(tmp_path / "m", tensors, index=True)
    first = fingerprint_path(folder, cache=cache)
    assert len(list(cache.directory.glob("*.json"))) == 3
    shard = sorted(folder.glob("*.safetensors"))[1]
    stat = shard.stat()
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))

    assert fingerprint_path(folder, cache=cache) == first
    assert (cache.hits, cache.misses) == (2, 4)


def test_corrupt_entries_are_ignored_and_rewritten(
    tmp_path: Path, tensors: Tensors, cache: FingerprintCache
) -> None:
    path = save_single(tmp_path / "m", tensors) / "model.safetensors"
    first = fingerprint_path(path, cache=cache)
    entry = only_entry(cache)
    for garbage in ("{torn", "[]", json.dumps({"format": "x"}), entry.read_text().replace('"F32"', '"F99"')):
        entry.write_text(garbage)
        assert fingerprint_path(path, cache=cache) == first
        assert json.loads(entry.read_text())["format"] == "deltareg.fingerprint-cache.v1"
    assert cache.hits == 0
    assert not list(cache.directory.glob(".tmp-*"))


def test_entry_of_another_file_is_not_used(tmp_path: Path, tensors: Tensors, cache: FingerprintCache) -> None:
    path = save_single(tmp_path / "m", tensors) / "model.safetensors"
    fingerprint_path(path, cache=cache)
    entry = only_entry(cache)
    other = tmp_path / "other.safetensors"
    other.write_bytes(path.read_bytes())
    # Put the first file's entry where the second file's key points, as a hash collision would.
    entry.rename(cache.entry_path(FileKey.of(other)))
    tamper(cache.entry_path(FileKey.of(other)), "model.step", "f" * 64)
    assert fingerprint_path(other, cache=cache).tensors["model.step"].digest != "f" * 64


def test_use_cache_false_neither_reads_nor_writes(
    tmp_path: Path, tensors: Tensors, cache: FingerprintCache
) -> None:
    path = save_single(tmp_path / "m", tensors) / "model.safetensors"
    fingerprint_path(path, cache=cache, use_cache=False)
    assert (cache.hits, cache.misses) == (0, 0)
    assert not cache.directory.exists()


def test_default_cache_location(
    tmp_path: Path, tensors: Tensors, private_default_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert FingerprintCache.default().directory == private_default_cache / "fingerprints"
    fingerprint_path(save_single(tmp_path / "m", tensors))
    assert len(list((private_default_cache / "fingerprints").glob("*.json"))) == 1
    monkeypatch.delenv("DELTAREG_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert FingerprintCache.default().directory == tmp_path / "home" / ".cache" / "deltareg" / "fingerprints"


def test_unwritable_cache_is_not_an_error(tmp_path: Path, tensors: Tensors) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the cache folder should be")
    cache = FingerprintCache(blocker / "cache")
    path = save_single(tmp_path / "m", tensors) / "model.safetensors"
    assert fingerprint_path(path, cache=cache) == fingerprint_path(path, use_cache=False)


# --------------------------------------------------------------------------------------------------
# Errors


def test_tab_or_newline_in_a_name(tmp_path: Path) -> None:
    for name in ("a\tb", "a\nb"):
        with pytest.raises(InvalidModel, match="tab or newline"):
            fingerprint_state_dict({name: torch.zeros(1)})
        with pytest.raises(InvalidModel, match="tab or newline"):
            combine({name: TensorInfo("U8", (1,), "0" * 64)})
    path = write_raw(tmp_path / "m.safetensors", [("a\tb", "U8", [1], b"\x00")])
    with pytest.raises(InvalidSafetensors, match="control character"):
        fingerprint_path(path, use_cache=False)


def test_same_tensor_in_two_shards(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    save_file({"a": torch.zeros(2), "shared": torch.ones(2)}, folder / "one.safetensors")
    save_file({"b": torch.zeros(2), "shared": torch.ones(2)}, folder / "two.safetensors")
    with pytest.raises(InvalidModel, match="'shared' is in both one.safetensors and two.safetensors"):
        fingerprint_path(folder, use_cache=False)
    with pytest.raises(InvalidModel, match="'shared'"):
        tensor_digests(folder, ["shared"], use_cache=False)


def test_pickle_only_folder(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps({"w": [1.0]}))
    with pytest.raises(UnsafeFile, match="refusing to read pickle weights"):
        fingerprint_path(tmp_path, use_cache=False)


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(InvalidModel, match="no weights found"):
        fingerprint_path(tmp_path, use_cache=False)


def test_invalid_shard_is_reported(tmp_path: Path, tensors: Tensors) -> None:
    folder = save_shards(tmp_path / "m", tensors, index=False)
    shard = sorted(folder.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(InvalidSafetensors, match=shard.name):
        fingerprint_path(folder, use_cache=False)


@pytest.mark.parametrize(
    ("state", "fragment"),
    [
        ({"w": torch.zeros(2, dtype=torch.complex128)}, "no safetensors equivalent"),
        ({"w": torch.empty(2, device="meta")}, "meta device"),
        ({"w": [1.0, 2.0]}, "not a tensor"),
        ({"": torch.zeros(1)}, "non-empty"),
    ],
)
def test_state_dicts_that_cannot_be_fingerprinted(state: dict[str, object], fragment: str) -> None:
    with pytest.raises(InvalidModel, match=fragment):
        fingerprint_state_dict(state)  # type: ignore[arg-type]


def test_results_are_plain_values(tensors: Tensors) -> None:
    result: ModelFingerprint = fingerprint_state_dict(tensors)
    check: Callable[[str], bool] = is_fingerprint
    assert check(result.value)
    assert all(len(info.digest) == 64 for info in result.tensors.values())
    assert result.tensors["model.step"] == TensorInfo("I64", (), result.tensors["model.step"].digest)
