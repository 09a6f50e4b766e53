"""Apply a LoRA version to a base model: in memory (a module or a state dict) or file to file.

The math matches PEFT's ``merge_and_unload`` bit for bit (``LoraLayer.get_delta_weight`` + ``merge``):
``delta = (f32(B) @ f32(A)) * scale`` (transposed with fan_in_fan_out), then ``W <- W + delta`` computed in
fp32 and rounded once to W's dtype. Never "unmerge": to go back, apply again from the pristine base.
The variants follow their PEFT layers too: an embedding (``lora.Embedding.merge``) takes the transposed
delta rounded to W's dtype first, then added (``W += delta.to(W.dtype)``); a LoRA bias is
``bias <- bias + f32(lora_B.bias) * scale`` in fp32, rounded once; a tensor the adapter saved in full
(modules_to_save, the embedding PEFT saves beside embedding LoRA) replaces the base tensor, bytes for bytes,
before that module's delta is added (PEFT loads the adapter state dict, then merges).

DoRA (``merge_dora_into``, PEFT's ``DoraLinearVariant.merge_unsafe``) is not additive: the new weight is
``m / ||W + delta||_row * (W + delta)``, so it depends on the base values. It is computed, like every
change, only after the base is verified, on the weight as the earlier changes of the chain left it (PEFT
merges the parent, then loads the child onto the merged model), in fp32 on whole tensors in PEFT's order.

Nothing is modified before everything is checked: the manifest's params, the adapter tensors (present,
expected shapes, finite), every target in the base (present, expected shape, float dtype) and the base's
identity, either its whole fingerprint (``verify="full"``) or only the digests of the tensors the delta
changes (``verify="touched"``, faster; it cannot notice a difference in a tensor the delta does not touch,
which is the trade-off of that mode). File to file, the identity is checked on the bytes the one pass
reads (``_BaseCheck``), into a temporary folder that becomes the output only once the base has matched.

A version that stacks on a parent is applied as a chain (``apply_steps_*``): the oldest ancestor first on
the pristine base, then each descendant, every step merged and rounded to the base dtype as PEFT's
``merge_and_unload`` would (its delta was trained on base + parent merged). The steps must link (each
one's ``parent`` is the digest of the step before, the first has none) and share one base fingerprint;
the base is checked once, and every step's targets against it, before any tensor is modified.

This module needs torch; the rest of the library imports without it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, CancelledError, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open

from deltareg.client import dense, lora
from deltareg.client.compat import config_problems, module_config, read_base_config
from deltareg.client.dense import FILES_FOLDER, DenseParams, DenseTarget, check_stored_tensors
from deltareg.client.dense import targets_from_params as dense_targets_from_params
from deltareg.client.diff import apply_entry, decode, torch_dtype
from deltareg.client.errors import (
    BaseMismatch,
    InvalidAdapter,
    InvalidInput,
    InvalidManifest,
    InvalidModel,
    ResultMismatch,
)
from deltareg.client.fingerprint import (
    CachedFiles,
    FingerprintCache,
    ModelFingerprint,
    TensorInfo,
    cached_file_digests,
    combine,
    fingerprint_of,
    fingerprint_state_dict,
    is_fingerprint,
    remember_file_digests,
    safetensors_dtype,
    tensor_digest,
    tensor_digests_of_state_dict,
    tensor_hasher,
)
from deltareg.client.lora import (
    BASE_DTYPES,
    EMBEDDING,
    FACTOR_DTYPES,
    MAX_LISTED_PROBLEMS,
    BiasTarget,
    LoraTarget,
    ReplaceTarget,
    Target,
    join_problems,
    targets_from_params,
)
from deltareg.client.manifest import PICKLE_SUFFIXES, BaseConfig, Manifest
from deltareg.client.outputs import (
    DIRECT_ALIGN,
    OutputFile,
    aligned_offset,
    refuse_existing_output,
    write_atomically,
)
from deltareg.client.weights import (
    SafetensorsHeader,
    TensorEntry,
    encode_header,
    find_index,
    find_weight_files,
    read_header_file,
    tensor_nbytes,
)

VerifyMode = Literal["full", "touched"]
VERIFY_MODES: tuple[VerifyMode, ...] = ("full", "touched")
# Weight files written at once. A file's writes take its inode's lock one at a time, so with one file at
# a time its single writer thread bounds the whole apply where page-cache writes are slow; two files keep
# two writers busy (2-core VM, 1.1B model in 5 shards, 4 interleaved runs each: medians 4.9 -> 4.4 s with a
# cold fingerprint cache, 4.7 -> 3.4 s warm). Each file in flight costs a merge scratch buffer and buffers.
FILES_AT_ONCE = 2

# Elementwise passes of a merge go in row blocks of about 2**20 elements (4 MiB of fp32), which stay in cache.
BLOCK_ELEMENTS = 1 << 20
Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A, B), as stored in the adapter file
AnyTarget = Target | DenseTarget
# One change of a base tensor: the target and its tensors from the delta file: (A, B) for a LoraTarget
# ((A, B, lora_magnitude_vector) with DoRA), (lora_B.bias,) for a BiasTarget, (the copy,) for a ReplaceTarget,
# the decoded stored tensors for a DenseTarget (data, then fix_index and fix_value if any). A dense entry's
# tensors may come as a function that decodes them when needed (file to file: one tensor in memory at a time).
Tensors = tuple[torch.Tensor, ...]
Merge = tuple[AnyTarget, Tensors | Callable[[], Tensors]]
# Base tensor name -> its changes, in chain order (oldest version first), each step's replacement first.
Merges = dict[str, list[Merge]]


@dataclass(frozen=True)
class Step:
    """One version of a chain to apply: its verified folder and its manifest."""

    path: Path
    manifest: Manifest


@dataclass(frozen=True)
class ApplyResult:
    """What ``apply_files`` wrote."""

    output: Path
    tensors_changed: int
    files_written: list[str]  # relative to ``output``, sorted
    # The merged model's fingerprint (tmv1): computed from the base's tensor digests and the written tensors;
    # None in fast mode (verify="touched") unless an expected fingerprint was given.
    fingerprint: str | None = None


@dataclass(frozen=True)
class _Spec:
    dtype: str
    shape: tuple[int, ...]


# --------------------------------------------------------------------------------------------------
# The merge itself


def merge_lora_into(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    *,
    fan_in_fan_out: bool = False,
    round_delta: bool = False,
) -> None:
    """``weight += scale * (B @ A)`` in place (``.T`` of the delta with fan_in_fan_out), as PEFT merges.

    The delta is computed in fp32 (fp64 for an fp64 weight) by one matmul over the whole weight, exactly
    PEFT's ``B @ A``: a matmul split into row blocks can round a few elements differently (the kernel
    partitions by shape), which would break bit-identity. It goes into a scratch buffer reused from one
    weight to the next (a fresh one per weight costs a page fault per 4 KiB). Then every element gets
    exactly PEFT's operations, one multiply by the scale, one add, one final rounding to W's dtype, in row
    blocks of about ``BLOCK_ELEMENTS`` that stay in cache (these are elementwise: blocking does not change
    their bits). With ``round_delta`` (PEFT's embedding merge) the delta is rounded to W's dtype before the
    add instead.
    """
    compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
    a = lora_a.to(device=weight.device, dtype=compute)
    b = lora_b.to(device=weight.device, dtype=compute)
    product = _scratch(b.shape[0] * a.shape[1], compute, weight.device).view(b.shape[0], a.shape[1])
    torch.mm(b, a, out=product)
    delta = _transpose(product, fan_in_fan_out)  # weight's layout
    rows, cols = weight.shape
    step = max(1, BLOCK_ELEMENTS // max(cols, 1))
    for start in range(0, rows, step):
        block = delta[start : start + step]
        block.mul_(scale)
        if round_delta:
            weight[start : start + step].add_(block.to(weight.dtype))
        else:
            _add_rounded(weight[start : start + step], block)


_SCRATCH = threading.local()


def _scratch(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat buffer of at least ``numel`` elements, kept for this thread until ``release_scratch``."""
    held: torch.Tensor | None = getattr(_SCRATCH, "buffer", None)
    if held is None or held.numel() < numel or held.dtype != dtype or held.device != device:
        _SCRATCH.buffer = held = torch.empty(numel, dtype=dtype, device=device)
    return held[:numel]


def release_scratch() -> None:
    """Free the merge's scratch buffer (one fp32 copy of the largest weight merged)."""
    _SCRATCH.buffer = None


def merge_dora_into(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    magnitude: torch.Tensor,
    scale: float,
    *,
    fan_in_fan_out: bool = False,
) -> None:
    """A DoRA merge in place, with exactly the operations of PEFT 0.21's ``DoraLinearVariant.merge_unsafe``.

    PEFT's factors and magnitude are fp32 (``autocast_adapter_dtype``), so, with ``T`` the transpose under
    fan_in_fan_out::

        delta  = T(f32(B) @ f32(A)) * scale                    # Linear.get_delta_weight
        norm   = linalg.norm(T(W) + T(delta), dim=1)           # DoraLinearLayer.get_weight_norm (fp32),
                                                               # on the unmerged W, detached
        factor = T((f32(m) / norm).view(-1, 1))
        W     <- (factor * (W + delta)).to(W.dtype)            # one rounding

    The norm is one per output row, over W + delta in fp32 before any rounding. The whole tensor is
    computed at once (a few fp32 copies of W), with PEFT's tensor layouts, so that the norm's reduction
    adds in the same order and the result is bit-identical.
    """
    compute = torch.float32
    a = lora_a.to(device=weight.device, dtype=compute)
    b = lora_b.to(device=weight.device, dtype=compute)
    m = magnitude.to(device=weight.device, dtype=compute)
    delta = _transpose(b @ a, fan_in_fan_out) * scale
    combined = _transpose(weight, fan_in_fan_out) + _transpose(delta, fan_in_fan_out)
    weight_norm = torch.linalg.norm(combined, dim=1).to(combined.dtype)
    del combined
    dora_factor = _transpose((m / weight_norm).view(-1, 1), fan_in_fan_out)
    weight.copy_(dora_factor * (weight + delta))


def _transpose(tensor: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """PEFT's ``utils.other.transpose``: ``.T`` (a view) with fan_in_fan_out."""
    return tensor.T if fan_in_fan_out else tensor


def _add_rounded(weight: torch.Tensor, delta: torch.Tensor) -> None:
    """``weight += delta`` with the sum in delta's (wider) dtype, rounded once into weight's dtype."""
    if weight.dtype == delta.dtype:
        weight.add_(delta)
    else:
        # Same bits as the mixed-dtype `weight += delta` PEFT does, a little faster on CPU.
        delta.add_(weight)
        weight.copy_(delta)


# --------------------------------------------------------------------------------------------------
# In memory


def apply_to_state_dict(
    state: MutableMapping[str, torch.Tensor],
    version_dir: Path,
    manifest: Manifest,
    *,
    verify: VerifyMode = "full",
) -> None:
    """Apply a LoRA version to a state dict in place (its tensors are modified, not replaced).

    Raises:
        BaseMismatch: the state dict is not the base this version was made for; nothing was modified.
        InvalidManifest, InvalidAdapter, InvalidSafetensors: the version itself is not usable (a version
            with a parent must be applied as a chain: ``apply_steps_to_state_dict``).
    """
    apply_steps_to_state_dict(state, [Step(Path(version_dir), manifest)], verify=verify)


def apply_steps_to_state_dict(
    state: MutableMapping[str, torch.Tensor],
    steps: Sequence[Step],
    *,
    verify: VerifyMode = "full",
    replace_tensors: bool = True,
    config: BaseConfig | None = None,
) -> None:
    """Apply a chain of versions (oldest first) to a state dict in place, each step rounded to the dtype.

    ``config``: what the model's configuration says (``compat.module_config``), compared with what each
    version recorded of its base (architecture, model type, vocabulary size); None skips that check.

    A dense delta that adds a tensor or changes one's shape or dtype puts a new tensor in ``state`` under
    that name (the only way to change a shape); with ``replace_tensors=False`` (a module's state dict,
    whose new entries would reach nothing) such a delta is refused before anything changes.

    Raises:
        BaseMismatch: the state dict is not the chain's base, or a step's target does not fit it; nothing
            was modified.
        InvalidManifest: the steps do not form a chain on one base; InvalidAdapter, InvalidDelta,
            InvalidSafetensors: a version is not usable; InvalidInput: see ``replace_tensors``.
    """
    plans = _plan(steps, verify)
    # Detached views share the tensors' memory; non-tensor entries (a module's "_extra_state") are not
    # weights and are never saved as such.
    detached = {name: value.detach() for name, value in state.items() if isinstance(value, torch.Tensor)}
    specs = {name: _spec_of(tensor) for name, tensor in detached.items()}
    _check_fit(plans, specs, config, compare_digest=False)
    for _, targets in plans:
        _refuse_tied_replacements(targets, detached)
        if not replace_tensors:
            _refuse_layout_changes(targets)
    merges = _load_merges(plans, lazy=False)
    if verify == "full":
        _verify_fingerprint(steps[-1].manifest, fingerprint_state_dict(detached))
    else:
        expected = _chain_touched_digests(plans)
        _verify_touched(expected, tensor_digests_of_state_dict(detached, expected))
    try:
        with torch.no_grad():
            for name, merges_of_tensor in merges.items():
                weight = detached.get(name)
                merged = _merge_all(weight, merges_of_tensor)
                if merged is not weight:
                    state[name] = merged
    finally:
        release_scratch()


def _merge_all(weight: torch.Tensor | None, merges: Sequence[Merge]) -> torch.Tensor:
    """Each change in turn, each rounded to the weight's dtype: what merging the versions one by one does.

    Returns the merged tensor: ``weight`` itself, changed in place, unless a dense delta gave the tensor a
    new shape or dtype (or added it: ``weight`` is None).
    """
    for target, payload in merges:
        tensors = payload() if callable(payload) else payload
        if isinstance(target, DenseTarget):
            weight = apply_entry(weight, target.entry, tensors)
            continue
        if weight is None:
            raise InvalidManifest(f"{target.base_tensor}: a LoRA change of a tensor the base does not have")
        _merge_lora_target(weight, target, tensors)
    if weight is None:
        raise InvalidManifest("no change produced a tensor")
    return weight


def _merge_lora_target(weight: torch.Tensor, target: Target, tensors: Tensors) -> None:
    if isinstance(target, ReplaceTarget):
        weight.copy_(tensors[0])  # same dtype and shape (checked): the saved bytes
    elif isinstance(target, BiasTarget):
        # PEFT: base_layer.bias.data += lora_B.bias * scaling, with the fp32 (autocast) LoRA bias.
        _add_rounded(weight, tensors[0].to(device=weight.device, dtype=torch.float32) * target.scale)
    elif target.magnitude is not None:
        lora_a, lora_b, magnitude = tensors
        merge_dora_into(weight, lora_a, lora_b, magnitude, target.scale, fan_in_fan_out=target.transposed)
    else:
        lora_a, lora_b = tensors
        merge_lora_into(
            weight,
            lora_a,
            lora_b,
            target.scale,
            fan_in_fan_out=target.transposed,
            round_delta=target.layer == EMBEDDING,
        )


def _refuse_layout_changes(targets: Sequence[AnyTarget]) -> None:
    changed = [t.base_tensor for t in targets if isinstance(t, DenseTarget) and t.entry.changes_layout]
    if changed:
        raise InvalidInput(
            f"this delta adds or resizes tensors ({', '.join(changed[:5])}), which a module cannot take in "
            "place: apply it file to file (deltareg apply ... -o OUT, Registry.apply) or to a state dict"
        )


def _refuse_tied_replacements(targets: Sequence[AnyTarget], tensors: Mapping[str, torch.Tensor]) -> None:
    """A replaced tensor tied to another (shared storage) cannot be replaced in place without changing the
    other one too, which PEFT does not do (its modules_to_save copy is a separate tensor). The embedding PEFT
    saves beside embedding LoRA is loaded into the (tied) base layer itself, so it may be tied."""
    lora_modules = {t.module for t in targets if isinstance(t, LoraTarget)}
    for target in targets:
        if not isinstance(target, ReplaceTarget) or target.module in lora_modules:
            continue
        tensor = tensors[target.base_tensor]
        tied = [
            name
            for name, other in tensors.items()
            if name != target.base_tensor
            and other.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr()
        ]
        if tied:
            raise BaseMismatch(
                f"{target.base_tensor} is tied to {', '.join(tied[:5])} (one shared tensor): the adapter "
                f"saves its own copy ({target.tensor}, modules_to_save), which cannot replace a tied tensor "
                "in place; untie the weights first (e.g. load with tie_word_embeddings=False)"
            )


def apply_to_module(
    module: torch.nn.Module,
    version_dir: Path,
    manifest: Manifest,
    *,
    verify: VerifyMode = "full",
) -> None:
    """Apply a version to a torch module in place (its parameters' data change; nothing is replaced).

    Tied weights are one tensor, changed once, and fingerprinted once under their first name, as on disk.

    Raises:
        BaseMismatch: the module is not the base this version was made for; nothing was modified.
        InvalidManifest, InvalidAdapter, InvalidDelta, InvalidSafetensors: the version itself is not usable.
        InvalidInput: a dense delta that adds or resizes tensors (apply it file to file).
    """
    apply_steps_to_module(module, [Step(Path(version_dir), manifest)], verify=verify)


def apply_steps_to_module(
    module: torch.nn.Module, steps: Sequence[Step], *, verify: VerifyMode = "full"
) -> None:
    """``apply_steps_to_state_dict`` on a module's own parameters; a transformers model's config is checked
    against what the versions recorded of their base, and a delta that adds or resizes tensors is refused."""
    # keep_vars: the live parameters, so that in-place writes land in the module itself.
    state = module.state_dict(keep_vars=True)
    apply_steps_to_state_dict(
        state, steps, verify=verify, replace_tensors=False, config=module_config(module)
    )


def _spec_of(tensor: torch.Tensor) -> _Spec:
    try:
        dtype = safetensors_dtype(tensor.dtype)
    except InvalidModel:
        dtype = str(tensor.dtype)
    return _Spec(dtype, tuple(tensor.shape))


# --------------------------------------------------------------------------------------------------
# File to file


def apply_files(
    base: str | os.PathLike[str],
    version_dir: Path,
    manifest: Manifest,
    out: str | os.PathLike[str],
    *,
    verify: VerifyMode = "full",
    cache: FingerprintCache | None = None,
    expect: str | None = None,
) -> ApplyResult:
    """Write the base model with the version merged into a new folder ``out``.

    ``base`` is a model folder (sharded or not) or one ``.safetensors`` file. Every weight file is written
    under the same name with the same header (same tensors, dtypes, shapes, offsets, ``__metadata__``);
    untouched tensors are copied as bytes and changed ones are merged one at a time, so memory stays near
    one tensor. A dense delta that adds or resizes tensors changes the headers accordingly (a new tensor
    goes into the last weight file, and the index follows), and the files it carries (a new config.json,
    tokenizer files) replace the base's. The other files of the folder (config, tokenizer, the index) are
    copied byte for byte; pickles, hidden files, sub-folders and ``.safetensors`` files that are not part of
    the weights (e.g. a stale consolidated copy) are left out. Everything is written to a temporary folder
    beside ``out`` and renamed into place, so ``out`` never exists half-written.

    The merged model's fingerprint is returned (``ApplyResult.fingerprint``); with ``expect``, a different
    one raises ResultMismatch and nothing is left at ``out``.

    Raises:
        InvalidInput: ``out`` exists and is not an empty folder.
        BaseMismatch: ``base`` is not the model this version was made for; nothing was created.
        ResultMismatch: the merged model is not ``expect``; nothing was created.
        InvalidModel, InvalidSafetensors, UnsafeFile: the base folder is unusable.
        InvalidManifest, InvalidAdapter, InvalidDelta: the version itself is not usable.
    """
    steps = [Step(Path(version_dir), manifest)]
    return apply_steps_files(base, steps, out, verify=verify, cache=cache, expect=expect)


def apply_steps_files(
    base: str | os.PathLike[str],
    steps: Sequence[Step],
    out: str | os.PathLike[str],
    *,
    verify: VerifyMode = "full",
    cache: FingerprintCache | None = None,
    expect: str | None = None,
) -> ApplyResult:
    """``apply_files`` for a chain of versions (oldest first), in one pass: each changed tensor is read
    once, merged with every step in turn (each rounded to its dtype) and written; memory stays near one
    tensor plus the chain's LoRA factors. Everything is checked before the output exists.

    The base is checked on the very bytes the pass reads (see ``_BaseCheck``): what the fingerprint cache
    already knows is checked before anything is written; the rest is hashed as it is read, a changed
    tensor's bytes before they are merged, and a tensor that differs from the digest recorded at push stops
    the pass at once. The result fingerprint needs every base tensor's digest: ``verify="full"`` has them;
    in fast mode (``verify="touched"``) it is computed only for ``expect``."""
    if expect is not None and not is_fingerprint(expect):
        raise InvalidInput(f"expected fingerprint {expect!r} is not of the form tmv1:<64 hex digits>")
    plans = _plan(steps, verify)
    output = Path(out)
    refuse_existing_output(output)
    weight_files = find_weight_files(base)
    headers = {path: read_header_file(path) for path in weight_files}
    specs = _specs_of_files(headers)
    _check_fit(plans, specs, read_base_config(base), compare_digest=True)
    merges = _load_merges(plans, lazy=True)
    recorded = _chain_touched_digests(plans) if verify == "touched" else steps[-1].manifest.base.tensors
    check = _BaseCheck(
        headers,
        cached_file_digests(weight_files, cache),
        expected=dict(recorded),
        whole=verify == "full" or expect is not None,
    )
    if verify == "touched":
        _check_touched_names(base, check.expected, specs)
    check.verify_known(steps[-1].manifest, verify)
    model = _ModelFiles(Path(base) if Path(base).is_dir() else None, headers, _overlays(steps))

    def write(temp: Path) -> tuple[list[str], str | None]:
        written, changed, read = _write_model(model, merges, temp, check)
        base_digests = check.complete(read, cache)
        check.verify_all(steps[-1].manifest, verify, base_digests)
        result = combine({**base_digests, **changed}) if check.whole else None
        if expect is not None and result != expect:
            raise ResultMismatch(
                f"the merged model has fingerprint {result}, but {expect} was expected; nothing was written"
            )
        return written, result

    # The merges run on _write_model's file threads: their scratch buffers go when those threads end.
    written, result = write_atomically(output, write)
    return ApplyResult(output=output, tensors_changed=len(merges), files_written=written, fingerprint=result)


@dataclass(frozen=True)
class _BaseCheck:
    """How a file-to-file apply checks its base, on the bytes it reads rather than in a pass of its own.

    Hashing the base first and then reading it again to merge would read the touched tensors twice and
    leave the cores idle while the hash runs (on 2 cores, the fast mode spent ~1.5 s of its ~5 s hashing
    before writing a byte). Instead the write pass hashes what it reads: a file the fingerprint cache knows
    is checked from the cache before anything is written; of the other files, every tensor (``whole``) or
    only the changed ones are hashed as they are read, and the result is checked before the output is
    renamed into place, so a wrong base still leaves nothing. This also checks the exact bytes merged: a
    base file replaced between a separate check and the merge could not slip through.
    """

    headers: Mapping[Path, SafetensorsHeader]
    cached: CachedFiles
    expected: Mapping[str, str]  # base tensor digests recorded at push, checked as soon as each is known
    whole: bool  # every base tensor's digest is needed (the whole fingerprint, or the result's)

    def to_hash(self, path: Path) -> frozenset[str]:
        """The tensors of ``path`` to hash as they are read: none of a cached file."""
        if path in self.cached.digests:
            return frozenset()
        names = self.headers[path].tensors.keys()
        return frozenset(names if self.whole else names & self.expected.keys())

    def check_read(self, name: str, info: TensorInfo) -> None:
        """Stop at the first tensor read that is not the one the delta was made on."""
        digest = self.expected.get(name)
        if digest is not None and info.digest != digest:
            raise BaseMismatch(
                f"wrong base model: its tensor {name}, which this delta changes, differs from that of the "
                f"base the delta was made for (digest {info.digest[:12]}…, expected {digest[:12]}…); "
                "nothing was written"
            )

    def known(self) -> dict[str, TensorInfo]:
        return _merge_shards_of(self.cached.digests)

    def verify_known(self, manifest: Manifest, verify: VerifyMode) -> None:
        """Before anything is written: check what the cache knows (the whole fingerprint if it knows it)."""
        known = self.known()
        if verify == "full" and len(self.cached.digests) == len(self.headers):
            _verify_fingerprint(manifest, fingerprint_of(known))
        elif verify == "touched":
            _verify_touched({n: d for n, d in self.expected.items() if n in known}, known)

    def complete(
        self, read: Mapping[str, TensorInfo], cache: FingerprintCache | None
    ) -> dict[str, TensorInfo]:
        """Every base digest known after the pass; fully hashed files go into the cache."""
        if self.whole:
            for path, header in self.headers.items():
                if path not in self.cached.digests:
                    digests = {name: read[name] for name in header.tensors}
                    remember_file_digests(cache, path, self.cached.keys[path], digests)
        return {**self.known(), **read}

    def verify_all(self, manifest: Manifest, verify: VerifyMode, digests: Mapping[str, TensorInfo]) -> None:
        if verify == "full":
            _verify_fingerprint(manifest, fingerprint_of(digests))
        else:
            _verify_touched(self.expected, digests)


def _merge_shards_of(per_file: Mapping[Path, Mapping[str, TensorInfo]]) -> dict[str, TensorInfo]:
    return {name: info for tensors in per_file.values() for name, info in tensors.items()}


def _check_touched_names(
    base: str | os.PathLike[str], expected: Mapping[str, str], specs: Mapping[str, Any]
) -> None:
    """Every tensor with a recorded digest must be in the base (``tensor_digests``'s error)."""
    missing = sorted(name for name in expected if name not in specs)
    if missing:
        shown = ", ".join(repr(n) for n in missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise InvalidModel(f"{base}: the model has no tensor named {shown}")


@dataclass(frozen=True)
class _ModelFiles:
    folder: Path | None  # None: a single .safetensors file
    headers: Mapping[Path, SafetensorsHeader]  # every weight file, in order
    overlays: list[Path]  # files the versions carry that replace the base's (dense deltas' files/*)


def _overlays(steps: Sequence[Step]) -> list[Path]:
    """The files each dense step carries, a later step's winning over an earlier one's of the same name."""
    by_name: dict[str, Path] = {}
    for step in steps:
        if step.manifest.kind == "full":
            for entry in step.manifest.files:
                if entry.path.startswith(FILES_FOLDER + "/"):
                    by_name[entry.path.removeprefix(FILES_FOLDER + "/")] = step.path / entry.path
    return [by_name[name] for name in sorted(by_name)]


def _specs_of_files(headers: Mapping[Path, SafetensorsHeader]) -> dict[str, TensorEntry]:
    specs: dict[str, TensorEntry] = {}
    owner: dict[str, Path] = {}
    for path, header in headers.items():
        for name, entry in header.tensors.items():
            if name in specs:
                raise InvalidModel(f"tensor {name!r} is in both {owner[name]} and {path}")
            specs[name], owner[name] = entry, path
    return specs


Layout = list[tuple[str, str, tuple[int, ...]]]  # (name, dtype, shape) of a weight file's tensors, in order


def _write_model(
    model: _ModelFiles, merges: Mapping[str, Sequence[Merge]], temp: Path, check: _BaseCheck
) -> tuple[list[str], dict[str, TensorInfo], dict[str, TensorInfo]]:
    """Write every weight file (merged) and, for a folder, its other files. Returns the relative paths
    written, the digests of the changed tensors as written (when ``check.whole``: the result's
    fingerprint needs them) and those of the base tensors hashed as read (``check.to_hash``)."""
    layouts = _output_layouts(model.headers, merges)
    written, changed, read = [], {}, {}
    files_at_once = max(1, min(FILES_AT_ONCE, len(model.headers)))
    buffers = _ReadBuffers(_largest_changed(model.headers, merges), files_at_once)
    stop = threading.Event()
    with (
        _pool(files_at_once * 2, "deltareg-hash") as hasher,  # a file's read bytes and its merged bytes
        _pool(files_at_once, "deltareg-file") as files,  # shut down first: its jobs submit to the hasher
        _torch_threads(_merge_thread_budget(files_at_once)),
    ):
        jobs = []
        for path, header in model.headers.items():
            relative = path.relative_to(model.folder) if model.folder is not None else Path(path.name)
            destination = temp / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            hashing = _Hashing(hasher, check, check.to_hash(path), merged=check.whole)
            job = files.submit(
                _write_weight_file, path, header, layouts[path], merges, destination, hashing, buffers, stop
            )
            jobs.append((job, hashing))
            written.append(relative.as_posix())
        _first_failure(jobs, stop)
        for _, hashing in jobs:
            changed.update(hashing.merged_digests())
            read.update(hashing.read_digests())
    index = find_index(model.folder) if model.folder is not None else None
    for path in _other_files(model.folder, model.headers) if model.folder is not None else []:
        if path == index and any(_layout_of(h) != layouts[p] for p, h in model.headers.items()):
            _write_index(path, layouts, model, temp / path.name)
        else:
            shutil.copyfile(path, temp / path.name)
        written.append(path.name)
    for path in model.overlays:
        shutil.copyfile(path, temp / path.name)
        written.append(path.name)
    return sorted(set(written)), changed, read


class _Stopped(Exception):
    """A file's pass ended because another file's failed (never raised out of ``_write_model``)."""


def _first_failure(jobs: Sequence[tuple[Future[None], object]], stop: threading.Event) -> None:
    """Wait for every file; on the first failure (or an interrupt), stop the others and raise it.

    A file can fail as a consequence of another's failure (a buffer it waits for was in the failed file's
    cancelled writes), so the cause is raised in preference to those."""
    try:
        done, _ = wait([job for job, _ in jobs], return_when=FIRST_EXCEPTION)
        errors = [error for job, _ in jobs if job in done and (error := job.exception()) is not None]
        causes = [error for error in errors if not isinstance(error, _Stopped | CancelledError)]
        if errors:
            raise (causes or errors)[0]
    except BaseException:
        stop.set()
        raise


@contextmanager
def _pool(workers: int, name: str) -> Iterator[ThreadPoolExecutor]:
    """A thread pool whose queued jobs are dropped if the block fails (the running ones finish)."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
    try:
        yield pool
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def _merge_thread_budget(files_at_once: int) -> int:
    """Threads for each of torch's merges while the writers and hashers run beside them: the cores left,
    shared by the files written at once.

    On 2 cores torch's default of 2 threads made the merges contend with the other threads and the whole
    apply ~20 % slower (bench/bench_apply_files.py, 2026-12-03: 4.5 s with 2, 3.6 s with 1).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    return max(1, (cores - 2 * files_at_once) // files_at_once)


def _largest_changed(headers: Mapping[Path, SafetensorsHeader], merges: Mapping[str, object]) -> int:
    """Bytes of the largest base tensor a merge reads."""
    sizes = [e.nbytes for h in headers.values() for name, e in h.tensors.items() if name in merges]
    return max(sizes, default=0)


@contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op thread count set to at most ``count`` for the block (it is process-wide), then
    restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(min(before, count))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _layout_of(header: SafetensorsHeader) -> Layout:
    return [(name, entry.dtype, entry.shape) for name, entry in header.tensors.items()]


def _output_layouts(
    headers: Mapping[Path, SafetensorsHeader], merges: Mapping[str, Sequence[Merge]]
) -> dict[Path, Layout]:
    """Each output weight file's tensors: the base's, with the dtype and shape a dense delta gives them;
    tensors a delta adds go at the end of the last file."""
    layouts: dict[Path, Layout] = {}
    for path, header in headers.items():
        layouts[path] = [
            (name, *_final_layout(merges.get(name, ()), entry.dtype, entry.shape))
            for name, entry in header.tensors.items()
        ]
    present = {name for header in headers.values() for name in header.tensors}
    added = sorted(name for name in merges if name not in present)
    last = list(headers)[-1]
    layouts[last] += [(name, *_final_layout(merges[name], "", ())) for name in added]
    return layouts


def _final_layout(merges: Sequence[Merge], dtype: str, shape: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
    for target, _ in merges:
        if isinstance(target, DenseTarget):
            dtype, shape = target.entry.dtype, target.entry.shape
    return dtype, shape


def _write_index(index: Path, layouts: Mapping[Path, Layout], model: _ModelFiles, destination: Path) -> None:
    """The base's index with the weight map and total size of the files as written (other keys kept)."""
    assert model.folder is not None
    data = json.loads(index.read_bytes())
    data["weight_map"] = {
        name: path.relative_to(model.folder).as_posix()
        for path, layout in layouts.items()
        for name, _, _ in layout
    }
    total = sum(tensor_nbytes(dtype, shape) for layout in layouts.values() for _, dtype, shape in layout)
    metadata = data.get("metadata") if isinstance(data.get("metadata"), dict) else {}
    data["metadata"] = {**metadata, "total_size": total}
    destination.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _other_files(folder: Path, headers: Mapping[Path, SafetensorsHeader]) -> list[Path]:
    """Top-level files to copy as they are: not weights, not pickles, not hidden, not other safetensors."""
    weights = {path.resolve() for path in headers}
    return [
        path
        for path in sorted(folder.iterdir())
        if path.is_file()
        and not path.name.startswith(".")
        and path.resolve() not in weights
        and not path.name.endswith(".safetensors")
        and not path.name.lower().endswith(PICKLE_SUFFIXES)
    ]


def _write_weight_file(
    source: Path,
    header: SafetensorsHeader,
    layout: Layout,
    merges: Mapping[str, Sequence[Merge]],
    destination: Path,
    hashing: _Hashing,
    buffers: _ReadBuffers,
    stop: threading.Event,
) -> None:
    """Write ``layout``'s tensors: the untouched ones copied byte for byte from ``source``, the changed ones
    merged (read into ``buffers``, shared by the files written at once). The header is copied as it is
    when the layout is the source's, else written anew (same ``__metadata__``). What ``hashing`` asks for
    is hashed on the way (see ``_TensorPass``). ``stop`` (another file failed) ends the pass early."""
    if sys.byteorder != "little":  # safetensors is little-endian; torch's memory here would not be
        raise InvalidInput("applying to safetensors files needs a little-endian machine")
    new_header = None if layout == _layout_of(header) else encode_header(layout, header.metadata)
    with open(source, "rb") as src, OutputFile(destination) as dst, _OrderedWriter(dst) as writer:
        if new_header is None:
            writer.copy(src.fileno(), 0, header.data_start)
        else:
            writer.write(memoryview(new_header))
        tensors = _TensorPass(src.fileno(), header, merges, writer, hashing, buffers)
        offset = header.data_start if new_header is None else len(new_header)
        for name, dtype, shape in layout:  # in offset order: the file is written sequentially
            if stop.is_set():
                raise _Stopped
            tensors.add(name, dtype, shape, offset)
            offset += tensor_nbytes(dtype, shape)
        tensors.flush()
        writer.finish()
        size = dst.size
    expected = header.data_start if new_header is None else len(new_header)
    expected += sum(tensor_nbytes(dtype, shape) for _, dtype, shape in layout)
    if size != expected:
        raise InvalidModel(f"{source}: wrote {size} bytes for {destination.name} but expected {expected}")


@dataclass(frozen=True)
class _Read:
    """A changed tensor read from the base (``weight`` None: a tensor the delta adds), not merged yet."""

    name: str
    dtype: str  # as written
    shape: tuple[int, ...]
    buffer: torch.Tensor
    weight: torch.Tensor | None


class _TensorPass:
    """One weight file's tensors, handed to the writer in layout order.

    An untouched tensor is copied by the writer thread (which hashes it on the way when asked). A changed
    one is read as soon as it comes up, and its base bytes go to a hasher at once, but it is merged only
    once the next changed tensor has been read: hashing one tensor's base bytes overlaps merging the one
    before, while the writer writes and the other hasher hashes the merged bytes before that."""

    def __init__(
        self,
        src_fd: int,
        header: SafetensorsHeader,
        merges: Mapping[str, Sequence[Merge]],
        writer: _OrderedWriter,
        hashing: _Hashing,
        buffers: _ReadBuffers,
    ) -> None:
        self._src_fd = src_fd
        self._header = header
        self._merges = merges
        self._writer = writer
        self._hashing = hashing
        self._buffers = buffers
        self._queue: deque[_Read | str] = deque()  # a name alone: an untouched tensor
        self._reads_queued = 0

    def add(self, name: str, dtype: str, shape: tuple[int, ...], offset: int) -> None:
        """Queue the tensor that goes at ``offset`` of the output."""
        if name not in self._merges:
            self._queue.append(name)
        else:
            self._queue.append(self._read(name, dtype, shape, offset))
            self._reads_queued += 1
        self.flush(keep=1)

    def flush(self, keep: int = 0) -> None:
        """Hand queued tensors to the writer, in order, until at most ``keep`` changed ones are left."""
        while self._queue and (self._reads_queued > keep or isinstance(self._queue[0], str)):
            item = self._queue.popleft()
            if isinstance(item, str):
                entry = self._header.tensors[item]
                self._writer.copy(self._src_fd, entry.start, entry.nbytes, self._hashing.copied(item, entry))
            else:
                self._reads_queued -= 1
                self._merge_and_write(item)

    def _read(self, name: str, dtype: str, shape: tuple[int, ...], offset: int) -> _Read:
        """Read a changed tensor where its merged bytes (merged in place) can go to the output without a
        copy (``aligned_offset``)."""
        buffer = self._buffers.take()
        stored = self._header.tensors.get(name)  # None: a tensor the delta adds
        if stored is None:
            return _Read(name, dtype, shape, buffer, None)
        shift = aligned_offset(buffer.data_ptr(), offset)
        if shift % torch_dtype(stored.dtype).itemsize:  # torch needs whole elements: copy instead
            shift = 0
        raw = buffer[shift:]
        weight = _read_tensor(self._src_fd, stored, raw)
        self._hashing.read(name, stored, raw[: stored.nbytes].numpy().data)
        return _Read(name, dtype, shape, buffer, weight)

    def _merge_and_write(self, item: _Read) -> None:
        self._hashing.check_read(item.name)  # before the merge overwrites the bytes read
        merged = _merge_all(item.weight, self._merges[item.name])
        if _spec_of(merged) != _Spec(item.dtype, item.shape):
            raise InvalidManifest(
                f"{item.name}: the merge gave {_spec_of(merged)}, expected {item.dtype} {list(item.shape)}"
            )
        data: memoryview = merged.contiguous().reshape(-1).view(torch.uint8).numpy().data
        uses: list[Future[Any]] = [self._writer.write(data)]
        hashed = self._hashing.written(item.name, item.dtype, item.shape, data)
        if hashed is not None:
            uses.append(hashed)
        self._buffers.give_back(item.buffer, uses)


class _Hashing:
    """What one weight file's pass hashes, on the shared ``hasher`` pool: the base tensors named in
    ``to_hash``, as they are read (a changed tensor's bytes checked against the digest recorded at push as
    soon as they are hashed) or, when untouched, as the writer copies them; and with ``merged``, every
    changed tensor as written (for the result's fingerprint)."""

    def __init__(
        self, hasher: ThreadPoolExecutor, check: _BaseCheck, to_hash: frozenset[str], *, merged: bool
    ) -> None:
        self._hasher = hasher
        self._check = check
        self._to_hash = to_hash
        self._merged = merged
        self._read: dict[str, Future[TensorInfo]] = {}
        self._copied: dict[str, tuple[TensorEntry, hashlib._Hash]] = {}
        self._written: dict[str, Future[TensorInfo]] = {}

    def read(self, name: str, entry: TensorEntry, data: memoryview) -> None:
        if name in self._to_hash:
            self._read[name] = self._hasher.submit(_digest_job, entry.dtype, entry.shape, data)

    def check_read(self, name: str) -> None:
        """Wait for the base bytes of ``name`` to be hashed, and check them."""
        future = self._read.get(name)
        if future is not None:
            self._check.check_read(name, future.result())

    def copied(self, name: str, entry: TensorEntry) -> hashlib._Hash | None:
        """The hasher the writer feeds an untouched tensor's bytes to as it copies them, if it is wanted."""
        if name not in self._to_hash:
            return None
        hasher = tensor_hasher(entry.dtype, entry.shape)
        self._copied[name] = (entry, hasher)
        return hasher

    def written(self, name: str, dtype: str, shape: tuple[int, ...], data: memoryview) -> Future[Any] | None:
        if not self._merged:
            return None
        self._written[name] = self._hasher.submit(_digest_job, dtype, shape, data)
        return self._written[name]

    def read_digests(self) -> dict[str, TensorInfo]:
        """The base tensors hashed; call once the writer has finished (it hashes the copies)."""
        digests = {name: future.result() for name, future in self._read.items()}
        for name, (entry, hasher) in self._copied.items():
            digests[name] = TensorInfo(entry.dtype, entry.shape, hasher.hexdigest())
        return digests

    def merged_digests(self) -> dict[str, TensorInfo]:
        return {name: future.result() for name, future in self._written.items()}


class _OrderedWriter:
    """Appends to ``dst`` on one thread, in submission order; the first failure is raised by the next call
    (or by ``finish``), and a failure on the caller's side cancels what is still queued."""

    def __init__(self, dst: OutputFile) -> None:
        self._dst = dst
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deltareg-writer")
        self._queued: deque[Future[object]] = deque()

    def __enter__(self) -> _OrderedWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        self._thread.shutdown(wait=True, cancel_futures=exc_type is not None)

    def write(self, data: memoryview) -> Future[object]:
        return self._submit(self._dst.write, data)

    def copy(
        self, src_fd: int, offset: int, length: int, digest: hashlib._Hash | None = None
    ) -> Future[object]:
        """Copy ``length`` bytes at ``offset`` of ``src_fd``, feeding them to ``digest`` too when given."""
        return self._submit(self._dst.copy_from, src_fd, offset, length, digest)

    def finish(self) -> None:
        """Wait for every queued write; raise the first failure."""
        while self._queued:
            self._queued.popleft().result()

    def _submit(self, function: Callable[..., object], *args: object) -> Future[object]:
        while self._queued and self._queued[0].done():
            self._queued.popleft().result()  # raises a failed write's error here, early
        future = self._thread.submit(function, *args)
        self._queued.append(future)
        return future


class _ReadBuffers:
    """Buffers that changed tensors are read into, shared by the files written at once and reused: a fresh
    allocation per tensor costs a zero fill and a page fault per 4 KiB. A buffer comes back once the writer
    and the hasher are done with it; with all of them in use, ``take`` waits for the oldest.

    Each file holds at most two it has not given back (one read ahead, one being merged), so one more per
    file than that keeps every file going while its last buffer is written and hashed."""

    PER_FILE = 3

    def __init__(self, nbytes: int, files_at_once: int) -> None:
        self._nbytes = nbytes
        self._count = self.PER_FILE * files_at_once
        self._created = 0
        self._lock = threading.Lock()
        self._in_use: deque[tuple[torch.Tensor, list[Future[Any]]]] = deque()
        self._free: list[torch.Tensor] = []

    def take(self) -> torch.Tensor:
        with self._lock:
            if self._free:
                return self._free.pop()
            if self._created < self._count or not self._in_use:
                self._created += 1
                return torch.empty(self._nbytes + DIRECT_ALIGN, dtype=torch.uint8)  # room to align
            buffer, uses = self._in_use.popleft()
        for use in uses:  # outside the lock: the other files go on meanwhile
            use.result()
        return buffer

    def give_back(self, buffer: torch.Tensor, uses: Sequence[Future[Any]]) -> None:
        with self._lock:
            self._in_use.append((buffer, list(uses)))


def _read_tensor(fd: int, entry: TensorEntry, buffer: torch.Tensor | None = None) -> torch.Tensor:
    """One tensor read into memory of its own (``buffer``, a flat uint8 tensor, when given): not through a
    mapping of the whole file, whose pages would stay resident (and count in the process's memory) until
    the file is closed."""
    dtype = torch_dtype(entry.dtype)
    if entry.nbytes == 0:
        return torch.empty(entry.shape, dtype=dtype)
    raw = torch.empty(entry.nbytes, dtype=torch.uint8) if buffer is None else buffer[: entry.nbytes]
    view: memoryview = raw.numpy().data
    done = 0
    while done < entry.nbytes:
        count = os.preadv(fd, [view[done:]], entry.start + done)
        if count == 0:
            raise InvalidModel(
                f"unexpected end of file at offset {entry.start + done} (was the file changed?)"
            )
        done += count
    return raw.view(dtype).reshape(entry.shape)


def _digest_job(dtype: str, shape: tuple[int, ...], data: memoryview) -> TensorInfo:
    return TensorInfo(dtype, shape, tensor_digest(dtype, shape, data))


# --------------------------------------------------------------------------------------------------
# Checks shared by both paths


Plan = list[tuple[Step, list[AnyTarget]]]


def _plan(steps: Sequence[Step], verify: str) -> Plan:
    """Every step's targets, once the steps are known to form a chain on one base (oldest first)."""
    if not steps:
        raise InvalidInput("nothing to apply: the chain has no versions")
    first = steps[0].manifest
    if first.parent is not None:
        raise InvalidManifest(
            f"version {first.digest} stacks on parent {first.parent}: apply its whole chain, oldest first "
            "(Registry.pull fetches the ancestors)"
        )
    for previous, step in pairwise(steps):
        if step.manifest.parent != previous.manifest.digest:
            raise InvalidManifest(
                f"not a chain: the parent of {step.manifest.digest} is {step.manifest.parent}, "
                f"not the version before it, {previous.manifest.digest}"
            )
        if step.manifest.base.fingerprint != first.base.fingerprint:
            raise InvalidManifest(
                f"version {step.manifest.digest} applies to base {step.manifest.base.fingerprint}, but its "
                f"chain starts on base {first.base.fingerprint}"
            )
    return [(step, _targets(step.manifest, verify)) for step in steps]


def _check_fit(
    plans: Plan, specs: Mapping[str, _Spec | TensorEntry], config: BaseConfig | None, *, compare_digest: bool
) -> None:
    """Every step fits the base: its tensors (present, shapes, dtypes) and the base's config as recorded at
    push (architecture, model type, vocabulary size, and with ``compare_digest`` the whole config).

    Raises:
        BaseMismatch: listing every problem of every step at once (up to 20, then a count).
    """
    problems: list[str] = []
    for step, targets in plans:
        problems += lora.base_problems([t for t in targets if not isinstance(t, DenseTarget)], specs)
        problems += dense.base_problems([t for t in targets if isinstance(t, DenseTarget)], specs)
        problems += config_problems(step.manifest.base.config, config, compare_digest=compare_digest)
    if problems:
        unique = list(dict.fromkeys(problems))  # a chain's steps may record the same config
        raise BaseMismatch("the delta does not fit this base model: " + join_problems(unique))


def _load_merges(plans: Plan, *, lazy: bool) -> Merges:
    """Every step's tensors (checked), grouped by the base tensor they change, in chain order.

    With ``lazy``, a dense step's tensors are decoded only when its merge runs (file to file: one at a
    time, and the output is thrown away if one does not decode); otherwise every one is decoded now, before
    anything is modified."""
    merges: Merges = {}
    for step, targets in plans:
        payloads: Sequence[Tensors | Callable[[], Tensors]]
        if step.manifest.kind == "full":
            loaders = _dense_loaders(step, [t for t in targets if isinstance(t, DenseTarget)])
            payloads = loaders if lazy else [load() for load in loaders]
        else:
            payloads = load_tensors(
                step.path, step.manifest, [t for t in targets if not isinstance(t, DenseTarget)]
            )
        for target, payload in zip(targets, payloads, strict=True):
            merges.setdefault(target.base_tensor, []).append((target, payload))
    return merges


def _dense_loaders(step: Step, targets: Sequence[DenseTarget]) -> list[Callable[[], Tensors]]:
    """One function per target decoding its stored tensors, once the weights file is known to hold them."""
    weights = str(step.manifest.params.get("weights"))
    if weights not in {entry.path for entry in step.manifest.files}:
        raise InvalidManifest(f"the dense weights file {weights!r} is not one of the version's files")
    path = step.path / weights
    params = DenseParams.parse(step.manifest.params, "manifest params")
    check_stored_tensors(params, read_header_file(path), str(path))

    def loader(target: DenseTarget) -> Callable[[], Tensors]:
        entry = target.entry
        stored = [s for s in (entry.data, entry.fix_index, entry.fix_value) if s is not None]

        def load() -> Tensors:
            with safe_open(path, framework="pt") as handle:
                return tuple(decode(handle, s) for s in stored)

        return load

    return [loader(target) for target in targets]


def _chain_touched_digests(plans: Plan) -> dict[str, str]:
    """The base tensor digests every step recorded, merged; the steps must agree (one base)."""
    expected: dict[str, str] = {}
    for step, targets in plans:
        for name, digest in _touched_digests(step.manifest, targets).items():
            if expected.setdefault(name, digest) != digest:
                raise InvalidManifest(
                    f"the versions of this chain record different digests for base tensor {name}; "
                    "use verify='full'"
                )
    return expected


def _targets(manifest: Manifest, verify: str) -> list[AnyTarget]:
    if verify not in VERIFY_MODES:
        raise InvalidInput(f"verify must be one of {', '.join(VERIFY_MODES)}, got {verify!r}")
    if manifest.kind == "full":
        return list(dense_targets_from_params(manifest.params))
    if manifest.kind != "lora":
        raise InvalidManifest(f"cannot apply a delta of kind {manifest.kind!r}")
    return list(targets_from_params(manifest.params))


def load_factors(version_dir: Path, manifest: Manifest, targets: Sequence[Target]) -> Factors:
    """Every LoRA target's (A, B) from the version's weights file, checked (see ``load_tensors``)."""
    lora = [t for t in targets if isinstance(t, LoraTarget)]
    loaded = load_tensors(version_dir, manifest, lora)
    return {t.module: (tensors[0], tensors[1]) for t, tensors in zip(lora, loaded, strict=True)}


def load_tensors(
    version_dir: Path, manifest: Manifest, targets: Sequence[Target]
) -> list[tuple[torch.Tensor, ...]]:
    """Every target's tensors from the version's weights file (in the targets' order), checked before
    anything is applied: (A, B) of a LoRA target (A, B, magnitude with DoRA), (lora_B.bias,) of a bias,
    (the copy,) of a replacement.

    Raises:
        InvalidManifest: the weights file is not one of the version's files.
        InvalidAdapter: a tensor is missing, has an unexpected dtype or shape, or is not finite.
    """
    weights = str(manifest.params["weights"])
    if weights not in {entry.path for entry in manifest.files}:
        raise InvalidManifest(f"the lora weights file {weights!r} is not one of the version's files")
    path = Path(version_dir) / weights
    header = read_header_file(path)
    problems = [problem for target in targets for problem in _tensor_problems(header, target)]
    if problems:
        raise InvalidAdapter(f"{path}: " + "; ".join(problems[:MAX_LISTED_PROBLEMS]))
    with safe_open(path, framework="pt") as handle:
        loaded = [tuple(handle.get_tensor(key) for key, _, _ in _tensor_keys(t)) for t in targets]
    broken = [
        target.module
        for target, tensors in zip(targets, loaded, strict=True)
        if not all(bool(t.isfinite().all()) for t in tensors)
    ]
    if broken:
        raise InvalidAdapter(
            f"{path}: the tensors of {', '.join(dict.fromkeys(broken[:5]))} hold NaN or infinite values"
        )
    return loaded


def _tensor_keys(target: Target) -> list[tuple[str, tuple[int, ...], frozenset[str]]]:
    """(key, expected shape, allowed dtypes) of each adapter tensor a target uses."""
    if isinstance(target, LoraTarget):
        keys: list[tuple[str, tuple[int, ...], frozenset[str]]] = [
            (target.lora_a, target.a_shape, FACTOR_DTYPES),
            (target.lora_b, target.b_shape, FACTOR_DTYPES),
        ]
        if target.magnitude is not None:
            keys.append((target.magnitude, target.magnitude_shape, FACTOR_DTYPES))
        return keys
    if isinstance(target, BiasTarget):
        return [(target.lora_bias, target.shape, FACTOR_DTYPES)]
    return [(target.tensor, target.shape, frozenset({target.dtype}) & BASE_DTYPES)]


def _tensor_problems(header: SafetensorsHeader, target: Target) -> list[str]:
    problems = []
    for key, expected, dtypes in _tensor_keys(target):
        entry = header.tensors.get(key)
        if entry is None:
            problems.append(f"{key} is missing")
        elif entry.dtype not in dtypes:
            problems.append(f"{key} has dtype {entry.dtype}, expected one of {', '.join(sorted(dtypes))}")
        elif entry.shape != expected:
            problems.append(f"{key} has shape {list(entry.shape)}, the manifest says {list(expected)}")
    return problems


def _verify_fingerprint(manifest: Manifest, fingerprint: ModelFingerprint) -> None:
    actual, expected, tensors = fingerprint.value, manifest.base.fingerprint, fingerprint.tensors
    if actual == expected:
        return
    named = f" ({manifest.base.name})" if manifest.base.name else ""
    touched = manifest.base.tensors
    changed = [name for name, digest in touched.items() if name in tensors and tensors[name].digest != digest]
    detail = f"; {len(changed)} of the {len(touched)} tensors it changes differ" if touched else ""
    raise BaseMismatch(
        f"wrong base model: its fingerprint is {actual}, "
        f"but this delta was made for {expected}{named}{detail}"
    )


def _touched_digests(manifest: Manifest, targets: Sequence[AnyTarget]) -> dict[str, str]:
    recorded = manifest.base.tensors
    if not recorded:
        raise InvalidManifest(
            "this version records no base tensor digests (it was pushed with a fingerprint only), so "
            "verify='touched' cannot check it; use verify='full'"
        )
    # A tensor a dense delta adds has no base digest to check.
    reads_base = [t for t in targets if not (isinstance(t, DenseTarget) and t.entry.is_new)]
    unrecorded = [t.base_tensor for t in reads_base if t.base_tensor not in recorded]
    if unrecorded:
        raise InvalidManifest(
            f"this version records no base digest for {', '.join(unrecorded[:5])}; use verify='full'"
        )
    return dict(recorded)


def _verify_touched(expected: Mapping[str, str], actual: Mapping[str, TensorInfo]) -> None:
    differ = [name for name, digest in expected.items() if actual[name].digest != digest]
    if differ:
        shown = ", ".join(differ[:MAX_LISTED_PROBLEMS]) + (
            ", ..." if len(differ) > MAX_LISTED_PROBLEMS else ""
        )
        raise BaseMismatch(
            f"wrong base model: {len(differ)} of the {len(expected)} tensors this delta changes differ from "
            f"the base it was made for: {shown}"
        )
