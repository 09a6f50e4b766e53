"""Applying LoRA versions: equality with PEFT's merge_and_unload, refusals that leave everything untouched."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from deltareg.client.apply import (
    ApplyResult,
    apply_files,
    apply_to_module,
    apply_to_state_dict,
    merge_lora_into,
)
from deltareg.client.errors import BaseMismatch, InvalidAdapter, InvalidInput, InvalidManifest
from deltareg.client.fingerprint import FileKey, FingerprintCache, fingerprint_path
from deltareg.client.manifest import Manifest
from deltareg.client.weights import find_weight_files, read_header_file

Q0 = "model.layers.0.self_attn.q_proj.weight"
K0 = "model.layers.0.self_attn.k_proj.weight"
INPUT_IDS = torch.tensor([[1, 17, 42, 99, 3, 250, 7, 64, 128, 5]])

# name -> LoRA settings for the fixtures' lora_adapter builder
ADAPTERS: dict[str, dict[str, Any]] = {
    "plain": {"r": 8, "alpha": 16},
    "rslora": {"r": 8, "alpha": 16, "use_rslora": True},
    "patterns": {
        "r": 8,
        "alpha": 16,
        "target_modules": ("q_proj", "v_proj", "o_proj", "down_proj"),
        "rank_pattern": {"v_proj": 4, "model.layers.1.self_attn.q_proj": 2},
        "alpha_pattern": {"o_proj": 5, "down_proj": 40},
    },
}


# --------------------------------------------------------------------------------------------------
# helpers


def ulp_distance(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """Per element, how many representable values of the dtype lie between actual and expected."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    int_dtype, magnitude = {
        torch.float32: (torch.int32, 0x7FFFFFFF),
        torch.bfloat16: (torch.int16, 0x7FFF),
        torch.float16: (torch.int16, 0x7FFF),
    }[actual.dtype]

    def ordered(t: torch.Tensor) -> torch.Tensor:
        # Sign-magnitude bits -> integers that count representable values (-0.0 and +0.0 both map to 0).
        bits = t.contiguous().view(int_dtype).long()
        return torch.where(bits < 0, -(bits & magnitude), bits)

    return (ordered(actual) - ordered(expected)).abs()


def compare_state_dicts(
    actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
) -> tuple[int, float]:
    """(max ulp distance over all tensors, share of elements that are bit-identical)."""
    assert actual.keys() == expected.keys()
    worst, exact, total = 0, 0, 0
    for name, tensor in expected.items():
        distance = ulp_distance(actual[name].detach(), tensor.detach())
        worst = max(worst, int(distance.max()))
        exact += int((distance == 0).sum())
        total += distance.numel()
    return worst, exact / total


def load(folder: Path) -> Any:
    """A transformers model (typed Any: its methods are untyped)."""
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(folder)
    model.eval()
    return model


def peft_merged(base: Path, adapter: Path) -> torch.nn.Module:
    """The reference: PEFT's own load + merge_and_unload."""
    from peft import PeftModel

    merged = PeftModel.from_pretrained(load(base), adapter).merge_and_unload()
    assert isinstance(merged, torch.nn.Module)
    return merged


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def assert_unchanged(module: torch.nn.Module, before: Mapping[str, torch.Tensor]) -> None:
    after = module.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], before[name]) for name in before)


def entries_of(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


@pytest.fixture(scope="module")
def fp32_base(tiny_llama: Callable[..., Path]) -> Path:
    return tiny_llama(dtype="float32")


@pytest.fixture(scope="module")
def fp32_adapter(fp32_base: Path, lora_adapter: Callable[..., Path]) -> Path:
    return lora_adapter(fp32_base, **ADAPTERS["plain"])


@pytest.fixture(scope="module")
def fp32_manifest(fp32_adapter: Path, fp32_base: Path, lora_manifest: Callable[..., Manifest]) -> Manifest:
    return lora_manifest(fp32_adapter, fp32_base)


# --------------------------------------------------------------------------------------------------
# the merge kernel


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize(("out_features", "in_features"), [(300, 96), (2048, 5632)])
def test_merge_kernel_is_bit_identical_to_peft_math(
    dtype: torch.dtype, fan_in_fan_out: bool, out_features: int, in_features: int
) -> None:
    # 2048 x 5632 (a TinyLlama down_proj): a row-blocked matmul rounded some of its elements differently
    # from PEFT's one matmul; the merge must be PEFT's exact operations.
    generator = torch.Generator().manual_seed(3)
    r, scale = 16, 16 / 8**0.5
    weight = (torch.randn(out_features, in_features, generator=generator) * 0.02).to(dtype)
    lora_a = torch.randn(r, in_features, generator=generator) * 0.05
    lora_b = torch.randn(out_features, r, generator=generator) * 0.05
    if fan_in_fan_out:
        weight = weight.T.contiguous()
    # PEFT: Linear.get_delta_weight (fp32 factors) then Linear.merge (safe_merge=False)
    expected = weight.clone()
    delta = lora_b @ lora_a
    expected += (delta.T if fan_in_fan_out else delta) * scale
    merge_lora_into(weight, lora_a, lora_b, scale, fan_in_fan_out=fan_in_fan_out)
    assert torch.equal(weight, expected)
    assert not torch.equal(weight, expected - 0.01)  # the comparison can fail


# --------------------------------------------------------------------------------------------------
# equality with PEFT merge_and_unload


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", sorted(ADAPTERS))
def test_apply_to_module_matches_peft_merge(
    tiny_llama: Callable[..., Path],
    lora_adapter: Callable[..., Path],
    lora_manifest: Callable[..., Manifest],
    dtype: str,
    kind: str,
) -> None:
    base = tiny_llama(dtype=dtype)
    adapter = lora_adapter(base, **ADAPTERS[kind])
    manifest = lora_manifest(adapter, base)
    expected = peft_merged(base, adapter).state_dict()

    model = load(base)
    before = snapshot(model)
    apply_to_module(model, adapter, manifest)

    worst, exact = compare_state_dicts(model.state_dict(), expected)
    print(f"{dtype} {kind}: max {worst} ulp, {exact:.4%} bit-identical")
    assert worst <= 1
    touched = set(manifest.base.tensors)
    changed = {name for name, t in model.state_dict().items() if not torch.equal(t, before[name])}
    assert changed == touched  # every target changed (B is not zero), nothing else


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(ADAPTERS))
def test_merged_logits_match_the_unmerged_peft_model(
    fp32_base: Path, lora_adapter: Callable[..., Path], lora_manifest: Callable[..., Manifest], kind: str
) -> None:
    from peft import PeftModel

    adapter = lora_adapter(fp32_base, **ADAPTERS[kind])
    unmerged = PeftModel.from_pretrained(load(fp32_base), adapter)
    unmerged.eval()
    model = load(fp32_base)
    with torch.no_grad():
        base_logits = model(INPUT_IDS).logits
        apply_to_module(model, adapter, lora_manifest(adapter, fp32_base))
        ours, theirs = model(INPUT_IDS).logits, unmerged(INPUT_IDS).logits
    assert not torch.allclose(base_logits, theirs, atol=1e-3)  # the adapter does change the output
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("dtype", "kind", "sharded"),
    [("float32", "plain", True), ("bfloat16", "patterns", True), ("bfloat16", "rslora", False)],
)
def test_apply_files_matches_peft_merge(
    tiny_llama: Callable[..., Path],
    lora_adapter: Callable[..., Path],
    lora_manifest: Callable[..., Manifest],
    tmp_path: Path,
    dtype: str,
    kind: str,
    sharded: bool,
) -> None:
    base = tiny_llama(dtype=dtype, sharded=sharded)
    adapter = lora_adapter(base, **ADAPTERS[kind])
    manifest = lora_manifest(adapter, base)

    result = apply_files(base, adapter, manifest, tmp_path / "merged")

    assert result == ApplyResult(
        output=tmp_path / "merged",
        tensors_changed=len(manifest.params["modules"]),
        files_written=sorted(entries_of(base)),
        # computed from the base's digests and the merged tensors as written: the output's own fingerprint
        fingerprint=fingerprint_path(tmp_path / "merged", use_cache=False).value,
    )
    assert entries_of(tmp_path) == {"merged"}  # no temporary folder left behind
    merged = load(result.output)
    assert next(merged.parameters()).dtype == getattr(torch, dtype)
    worst, exact = compare_state_dicts(merged.state_dict(), peft_merged(base, adapter).state_dict())
    print(f"files {dtype} {kind}: max {worst} ulp, {exact:.4%} bit-identical")
    assert worst <= 1


@pytest.mark.slow
def test_apply_files_keeps_shards_metadata_and_other_files(
    tiny_llama: Callable[..., Path],
    lora_adapter: Callable[..., Path],
    lora_manifest: Callable[..., Manifest],
    tmp_path: Path,
) -> None:
    base = tiny_llama(dtype="bfloat16", sharded=True)
    adapter = lora_adapter(base, **ADAPTERS["plain"])
    out = apply_files(base, adapter, lora_manifest(adapter, base), tmp_path / "out").output

    shards = find_weight_files(base)
    assert len(shards) >= 3
    assert [p.name for p in find_weight_files(out)] == [p.name for p in shards]
    changed = 0
    for shard in shards:
        ours, theirs = read_header_file(out / shard.name), read_header_file(shard)
        assert ours == theirs  # same tensors, dtypes, shapes, offsets and __metadata__
        assert theirs.metadata == {"format": "pt"}
        changed += (out / shard.name).read_bytes() != shard.read_bytes()
    assert changed >= 1
    for name in ("config.json", "generation_config.json", "model.safetensors.index.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes()


@pytest.mark.slow
def test_apply_files_skips_pickles_and_stray_safetensors(
    fp32_base: Path, fp32_adapter: Path, fp32_manifest: Manifest, copy_folder: Callable[[Path], Path]
) -> None:
    base = copy_folder(fp32_base)
    (base / "training_args.bin").write_bytes(b"\x80\x04N.")
    (base / "tokenizer.json").write_text("{}")
    written = apply_files(base, fp32_adapter, fp32_manifest, base.parent / "out").files_written
    assert "tokenizer.json" in written and "training_args.bin" not in written
    assert written == sorted(entries_of(base.parent / "out"))


@pytest.mark.slow
def test_apply_files_on_a_single_file_and_into_an_empty_folder(
    fp32_base: Path, fp32_adapter: Path, fp32_manifest: Manifest, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    result = apply_files(fp32_base / "model.safetensors", fp32_adapter, fp32_manifest, out)
    assert result.files_written == ["model.safetensors"] and entries_of(out) == {"model.safetensors"}


def test_apply_files_gives_torch_its_thread_count_back(
    fp32_base: Path, fp32_adapter: Path, fp32_manifest: Manifest, tmp_path: Path
) -> None:
    # The file-to-file merge runs with fewer torch threads (the writer and the hasher need cores too);
    # torch's count is process-wide, so it must be the caller's again afterwards.
    before = torch.get_num_threads()
    try:
        for count, out in ((3, "three"), (1, "one")):
            torch.set_num_threads(count)
            apply_files(fp32_base, fp32_adapter, fp32_manifest, tmp_path / out)
            assert torch.get_num_threads() == count
    finally:
        torch.set_num_threads(before)


def test_apply_to_state_dict_changes_tensors_in_place(
    fp32_base: Path, fp32_adapter: Path, fp32_manifest: Manifest
) -> None:
    by_module = load(fp32_base)
    apply_to_module(by_module, fp32_adapter, fp32_manifest)
    model = load(fp32_base)
    state = model.state_dict()  # detached views of the parameters
    apply_to_state_dict(state, fp32_adapter, fp32_manifest)
    assert all(torch.equal(t, by_module.state_dict()[n]) for n, t in model.state_dict().items())


@pytest.mark.slow
def test_fan_in_fan_out_and_tied_weights_match_peft(
    tiny_gpt2: Callable[..., Path],
    lora_adapter: Callable[..., Path],
    lora_manifest: Callable[..., Manifest],
    tmp_path: Path,
) -> None:
    base = tiny_gpt2()
    adapter = lora_adapter(base, target_modules=("c_attn", "c_fc"), fan_in_fan_out=True)
    manifest = lora_manifest(adapter, base)
    assert manifest.params["fan_in_fan_out"] is True
    expected = peft_merged(base, adapter).state_dict()

    model = load(base)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied: fingerprinted once, by first name
    apply_to_module(model, adapter, manifest, verify="full")
    assert compare_state_dicts(model.state_dict(), expected)[0] <= 1

    merged = load(apply_files(base, adapter, manifest, tmp_path / "out").output)
    assert compare_state_dicts(merged.state_dict(), expected)[0] <= 1


# --------------------------------------------------------------------------------------------------
# wrong base: refused, nothing modified, nothing created


@pytest.fixture(scope="module")
def other_base(tiny_llama: Callable[..., Path]) -> Path:
    return tiny_llama(dtype="float32", seed=7)  # same names and shapes, other values


@pytest.mark.parametrize("verify", ["full", "touched"])
def test_wrong_base_module_is_refused_and_untouched(
    other_base: Path, fp32_adapter: Path, fp32_manifest: Manifest, verify: Any
) -> None:
    model = load(other_base)
    before = snapshot(model)
    with pytest.raises(BaseMismatch, match="wrong base model"):
        apply_to_module(model, fp32_adapter, fp32_manifest, verify=verify)
    assert_unchanged(model, before)


@pytest.mark.parametrize("verify", ["full", "touched"])
def test_wrong_base_files_create_nothing(
    other_base: Path, fp32_adapter: Path, fp32_manifest: Manifest, tmp_path: Path, verify: Any
) -> None:
    (tmp_path / "keep").write_text("x")
    with pytest.raises(BaseMismatch, match="wrong base model"):
        apply_files(other_base, fp32_adapter, fp32_manifest, tmp_path / "out", verify=verify)
    assert entries_of(tmp_path) == {"keep"}  # neither the output nor a temporary folder


def test_a_failure_while_writing_leaves_nothing_behind(
    fp32_base: Path,
    fp32_adapter: Path,
    fp32_manifest: Manifest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The disk fills up after the weights are written, while the other files are copied."""

    def disk_full(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("shutil.copyfile", disk_full)
    with pytest.raises(OSError, match="No space left"):
        apply_files(fp32_base, fp32_adapter, fp32_manifest, tmp_path / "out")
    assert entries_of(tmp_path) == set()


def test_base_without_a_target_tensor_is_refused(
    fp32_base: Path, fp32_adapter: Path, fp32_manifest: Manifest
) -> None:
    state = {n: t for n, t in load(fp32_base).state_dict().items() if n != Q0}
    with pytest.raises(BaseMismatch, match=f"{Q0} is missing"):
        apply_to_state_dict(state, fp32_adapter, fp32_manifest)


# --------------------------------------------------------------------------------------------------
# verify="touched": only the tensors the delta changes are checked (the known trade-off of the fast mode)


def _nudge(tensor: torch.Tensor) -> None:
    """Change one element by one ulp."""
    with torch.no_grad():
        tensor.view(-1)[0] = torch.nextafter(tensor.view(-1)[0], torch.tensor(1.0))


def test_touched_passes_on_the_right_base_like_full(
    fp32_base: Path, fp32_adapter: Path, fp32_manifest: Manifest
) -> None:
    fast, full = load(fp32_base), load(fp32_base)
    apply_to_module(fast, fp32_adapter, fp32_manifest, verify="touched")
    apply_to_module(full, fp32_adapter, fp32_manifest, verify="full")
    assert all(torch.equal(t, full.state_dict()[n]) for n, t in fast.state_dict().items())


def test_touched_refuses_when_a_touched_tensor_differs(
    fp32_base: Path, fp32_adapter: Path, fp32_manifest: Manifest
) -> None:
    model = load(fp32_base)
    _nudge(model.state_dict()[Q0])
    before = snapshot(model)
    with pytest.raises(BaseMismatch, match=f"1 of the 4 tensors this delta changes differ .*{Q0}"):
        apply_to_module(model, fp32_adapter, fp32_manifest, verify="touched")
    assert_unchanged(model, before)


def test_touched_misses_a_difference_in_an_untouched_tensor(
    fp32_base: Path, fp32_adapter: Path, fp32_manifest: Manifest
) -> None:
    """The fast mode's documented blind spot: k_proj is not a target, so it is not checked."""
    model = load(fp32_base)
    _nudge(model.state_dict()[K0])
    with pytest.raises(BaseMismatch, match="fingerprint"):
        apply_to_module(model, fp32_adapter, fp32_manifest, verify="full")
    apply_to_module(model, fp32_adapter, fp32_manifest, verify="touched")  # accepted


def test_touched_mode_on_files(
    fp32_base: Path, fp32_adapter: Path, fp32_manifest: Manifest, copy_folder: Callable[[Path], Path]
) -> None:
    base = copy_folder(fp32_base)
    path = base / "model.safetensors"
    with safe_open(path, framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open API)
    _nudge(tensors[K0])
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(BaseMismatch):
        apply_files(base, fp32_adapter, fp32_manifest, base.parent / "full")
    assert apply_files(
        base, fp32_adapter, fp32_manifest, base.parent / "fast", verify="touched"
    ).output.is_dir()
    _nudge(tensors[Q0])
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(BaseMismatch, match=Q0):
        apply_files(base, fp32_adapter, fp32_manifest, base.parent / "fast2", verify="touched")
    assert not (base.parent / "fast2").exists()


def test_touched_needs_recorded_tensor_digests(
    fp32_base: Path, fp32_adapter: Path, lora_manifest: Callable[..., Manifest]
) -> None:
    manifest = lora_manifest(fp32_adapter, fp32_base, with_tensors=False)
    with pytest.raises(InvalidManifest, match="use verify='full'"):
        apply_to_module(load(fp32_base), fp32_adapter, manifest, verify="touched")


# --------------------------------------------------------------------------------------------------
# file to file: the base is checked on the bytes the pass reads, not in a pass of its own


@pytest.fixture(scope="module")
def sharded_base(tiny_llama: Callable[..., Path]) -> Path:
    return tiny_llama(dtype="float32", sharded=True)  # >= 3 shards: several files are written at once


@pytest.fixture(scope="module")
def sharded_adapter(sharded_base: Path, lora_adapter: Callable[..., Path]) -> Path:
    return lora_adapter(sharded_base, **ADAPTERS["plain"])


@pytest.fixture(scope="module")
def sharded_manifest(
    sharded_adapter: Path, sharded_base: Path, lora_manifest: Callable[..., Manifest]
) -> Manifest:
    return lora_manifest(sharded_adapter, sharded_base)


def _shard_with(base: Path, name: str) -> Path:
    return next(path for path in find_weight_files(base) if name in read_header_file(path).tensors)


def _nudged_copy(base: Path, copy_folder: Callable[[Path], Path], name: str) -> Path:
    """A copy of ``base`` whose tensor ``name`` is one ulp off in one element, in the shard holding it."""
    copied = copy_folder(base)
    path = _shard_with(copied, name)
    with safe_open(path, framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open API)
        metadata = handle.metadata()
    _nudge(tensors[name])
    save_file(tensors, path, metadata=metadata)
    return copied


def _cache_all_but(cache: FingerprintCache, base: Path, uncached: Path) -> None:
    for shard in find_weight_files(base):
        if shard != uncached:
            cache.put(FileKey.of(shard), fingerprint_path(shard, use_cache=False).tensors)


def test_a_first_apply_hashes_the_base_as_it_reads_it_and_caches_it(
    sharded_base: Path, sharded_adapter: Path, sharded_manifest: Manifest, tmp_path: Path
) -> None:
    shards = find_weight_files(sharded_base)
    cache = FingerprintCache(tmp_path / "cache")
    first = apply_files(sharded_base, sharded_adapter, sharded_manifest, tmp_path / "one", cache=cache)
    assert (cache.hits, cache.misses) == (0, len(shards))  # nothing was known: every file hashed in the pass
    whole = fingerprint_path(sharded_base, use_cache=False).tensors
    for shard in shards:  # the digests the pass took are the files' own
        assert cache.get(FileKey.of(shard)) == {n: whole[n] for n in read_header_file(shard).tensors}

    again = FingerprintCache(tmp_path / "cache")
    second = apply_files(sharded_base, sharded_adapter, sharded_manifest, tmp_path / "two", cache=again)
    assert (again.hits, again.misses) == (len(shards), 0)
    assert (
        first.fingerprint == second.fingerprint == fingerprint_path(tmp_path / "one", use_cache=False).value
    )


@pytest.mark.parametrize("verify", ["full", "touched"])
def test_a_partly_cached_base_is_hashed_only_where_the_cache_does_not_know_it(
    sharded_base: Path, sharded_adapter: Path, sharded_manifest: Manifest, tmp_path: Path, verify: Any
) -> None:
    uncached = _shard_with(sharded_base, Q0)
    cache = FingerprintCache(tmp_path / "cache")
    _cache_all_but(cache, sharded_base, uncached)
    result = apply_files(
        sharded_base, sharded_adapter, sharded_manifest, tmp_path / "out", verify=verify, cache=cache
    )
    assert (cache.hits, cache.misses) == (len(find_weight_files(sharded_base)) - 1, 1)
    if verify == "full":  # a whole file was hashed: it is cached now, and the result fingerprint is right
        assert cache.get(FileKey.of(uncached)) is not None
        assert result.fingerprint == fingerprint_path(tmp_path / "out", use_cache=False).value
    else:  # only its touched tensors were hashed: not enough for a cache entry, nor for the fingerprint
        assert cache.get(FileKey.of(uncached)) is None
        assert result.fingerprint is None


@pytest.mark.parametrize("cached_elsewhere", [False, True])
def test_a_differing_untouched_tensor_is_found_by_the_pass_and_leaves_nothing(
    sharded_base: Path,
    sharded_adapter: Path,
    sharded_manifest: Manifest,
    copy_folder: Callable[[Path], Path],
    cached_elsewhere: bool,
) -> None:
    assert (
        K0 not in sharded_manifest.base.tensors
    )  # k_proj is not a target: only the whole fingerprint sees it
    base = _nudged_copy(sharded_base, copy_folder, K0)
    cache = FingerprintCache(base.parent / "cache")
    if cached_elsewhere:
        _cache_all_but(cache, base, _shard_with(base, K0))
    out = base.parent / "out"
    with pytest.raises(BaseMismatch, match="wrong base model: its fingerprint is"):
        apply_files(base, sharded_adapter, sharded_manifest, out, cache=cache)
    assert not out.exists()
    assert not [p for p in base.parent.iterdir() if p.name.startswith(".out.tmp")]


@pytest.mark.parametrize("verify", ["full", "touched"])
def test_a_differing_touched_tensor_stops_the_pass_where_it_is_read(
    sharded_base: Path,
    sharded_adapter: Path,
    sharded_manifest: Manifest,
    copy_folder: Callable[[Path], Path],
    verify: Any,
) -> None:
    # A target in the last shard that holds one: the other files are being written meanwhile.
    last = [
        s
        for s in find_weight_files(sharded_base)
        if set(read_header_file(s).tensors) & set(sharded_manifest.base.tensors)
    ][-1]
    name = sorted(set(read_header_file(last).tensors) & set(sharded_manifest.base.tensors))[0]
    base = _nudged_copy(sharded_base, copy_folder, name)
    out = base.parent / "out"
    with pytest.raises(
        BaseMismatch, match=rf"its tensor {re.escape(name)}, which this delta changes, differs"
    ):
        apply_files(
            base,
            sharded_adapter,
            sharded_manifest,
            out,
            verify=verify,
            cache=FingerprintCache(base.parent / "c"),
        )
    assert not out.exists()
    assert not [p for p in base.parent.iterdir() if p.name.startswith(".out.tmp")]


# --------------------------------------------------------------------------------------------------
# bad versions and bad output paths


def test_output_that_exists_and_is_not_empty_is_refused(
    fp32_base: Path, fp32_adapter: Path, fp32_manifest: Manifest, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(InvalidInput, match="not an empty folder"):
        apply_files(fp32_base, fp32_adapter, fp32_manifest, out)
    assert entries_of(out) == {"precious.txt"} and entries_of(tmp_path) == {"out"}


def test_non_finite_factors_are_refused_before_anything_changes(
    fp32_base: Path,
    fp32_adapter: Path,
    lora_manifest: Callable[..., Manifest],
    copy_folder: Callable[[Path], Path],
) -> None:
    adapter = copy_folder(fp32_adapter)
    path = adapter / "adapter_model.safetensors"
    with safe_open(path, framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open API)
    tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"][3, 2] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})
    model = load(fp32_base)
    before = snapshot(model)
    with pytest.raises(InvalidAdapter, match="NaN or infinite"):
        apply_to_module(model, adapter, lora_manifest(adapter, fp32_base))
    assert_unchanged(model, before)


def test_version_folder_that_disagrees_with_the_manifest_is_refused(
    fp32_base: Path,
    fp32_adapter: Path,
    fp32_manifest: Manifest,
    lora_adapter: Callable[..., Path],
) -> None:
    other_rank = lora_adapter(fp32_base, r=4, alpha=16)  # same modules, other shapes
    model = load(fp32_base)
    before = snapshot(model)
    with pytest.raises(InvalidAdapter, match=r"has shape \[4, 64\], the manifest says \[8, 64\]"):
        apply_to_module(model, other_rank, fp32_manifest)
    assert_unchanged(model, before)


def test_unknown_verify_mode_is_refused(fp32_base: Path, fp32_adapter: Path, fp32_manifest: Manifest) -> None:
    with pytest.raises(InvalidInput, match="verify must be one of full, touched"):
        apply_to_module(load(fp32_base), fp32_adapter, fp32_manifest, verify="none")  # type: ignore[arg-type]


def test_tampered_scale_in_the_manifest_is_refused(
    fp32_base: Path, fp32_adapter: Path, fp32_manifest: Manifest
) -> None:
    data = copy.deepcopy(fp32_manifest.to_json_obj())
    module = next(iter(data["params"]["modules"]))
    data["params"]["modules"][module]["scale"] = 20.0
    tampered = Manifest.parse(json.loads(json.dumps(data)))
    with pytest.raises(InvalidManifest, match="scale 20.0 is not alpha/r"):
        apply_to_module(load(fp32_base), fp32_adapter, tampered)
