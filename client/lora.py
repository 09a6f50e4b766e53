"""PEFT LoRA adapters: read them, describe them in a manifest, and check that they fit a base model.

Nothing here needs torch: the adapter is read from its ``adapter_config.json`` and the header of its
``adapter_model.safetensors`` (through our own validating parser), never from tensor data.

Folder layout, exactly as ``PeftModel.save_pretrained`` writes it for the default adapter::

    adapter_config.json         the LoraConfig (peft_type, r, lora_alpha, patterns, ...)
    adapter_model.safetensors   base_model.model.<module>.lora_A.weight (r, in) / .lora_B.weight (out, r)
    README.md                   the model card (optional)

Besides plain LoRA on linear layers (``nn.Linear``, and GPT-2's ``Conv1D`` with ``fan_in_fan_out``), the
weights file may hold, exactly as PEFT 0.21 and 0.22 write them:

* embedding LoRA: ``<module>.lora_embedding_A`` (r, num_embeddings) and ``.lora_embedding_B``
  (embedding_dim, r), no ``.weight`` suffix; PEFT also saves the embedding itself as
  ``<module>.base_layer.weight`` (``save_embedding_layers="auto"``), which it loads over the base before
  merging, so it is recorded as a replacement of ``<module>.weight``;
* LoRA bias (``lora_bias=True``): ``<module>.lora_B.bias`` (out,), merged as ``bias += scale * lora_B.bias``;
  a base layer without a bias cannot take it (PEFT refuses to merge it too);
* ``modules_to_save``: the full tensors of the modules PEFT matched to the listed names, under the original
  key ``<module>.<param>``; merging replaces the base tensors. PEFT before 0.22 matched any path ending with
  a listed name (``"norm"`` also took every ``input_layernorm``), 0.22 only a whole last part of the path;
  a saved tensor is accepted under either rule, so adapters from both apply as they were trained;
* DoRA (``use_dora=True``) on linear layers (``nn.Linear``, and ``Conv1D`` with ``fan_in_fan_out``):
  ``<module>.lora_magnitude_vector`` (out,), no ``.weight`` suffix, beside every module's lora_A/B. DoRA
  on an embedding is refused by name (PEFT's ``DoraEmbeddingVariant`` is not reproduced yet).

A version is made of these three files and nothing else. Any other non-pickle file in the folder (training
logs, tokenizer files, checkpoint sub-folders) is ignored: it is not part of the adapter and not uploaded.
A pickle anywhere at the top level (``adapter_model.bin``, ``training_args.bin``, ...) makes the folder
refused with ``UnsafeFile``: deltareg never carries pickles, and a pickle beside the weights may well be
the weights the user meant.

Scale resolution follows PEFT exactly (``LoraModel._create_and_replace`` and ``get_pattern_key``): for a
module path ``m`` the first key ``k`` of ``rank_pattern`` (and separately of ``alpha_pattern``), in dict
order, with ``re.match(rf"(.*\\.)?({k})$", m)`` wins; otherwise ``r`` / ``lora_alpha``.
``scale = alpha / sqrt(r)`` with ``use_rslora``, else ``alpha / r``, computed in Python floats like PEFT.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from deltareg.client.errors import BaseMismatch, InvalidAdapter, InvalidManifest, UnsafeFile
from deltareg.client.manifest import PICKLE_SUFFIXES
from deltareg.client.weights import SafetensorsHeader, read_header_file

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MODEL_CARD = "README.md"
LEGACY_WEIGHTS_FILE = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
MAX_CONFIG_BYTES = 1 << 20
# Dtypes PEFT saves LoRA factors in; the apply upcasts them to fp32 exactly.
FACTOR_DTYPES = frozenset({"F16", "BF16", "F32"})
# Base dtypes a LoRA delta can be merged into (fp32 arithmetic, one rounding).
BASE_DTYPES = frozenset({"F16", "BF16", "F32"})
# init_lora_weights values whose adapter is a plain additive delta on the untouched base. The others either
# rewrite the base weights at init (pissa*, olora, corda, loftq, lora_ga) or change the math (mica).
ADDITIVE_INITS: tuple[object, ...] = (True, False, "gaussian", "eva", "orthogonal")
BASE_MUTATING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
# LoraConfig fields that switch on a feature whose weights or math we do not handle yet: refused when truthy.
UNSUPPORTED_FEATURES: dict[str, str] = {
    "layer_replication": "layer replication (layer_replication)",
    "target_parameters": "LoRA on raw parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "use_bdlora": "BD-LoRA (use_bdlora)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
    "megatron_config": "Megatron parallel layers (megatron_config)",
}
_FACTOR_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<which>[AB])\.weight")
_EMBEDDING_FACTOR_KEY = re.compile(r"(?P<module>.+)\.lora_embedding_(?P<which>[AB])")
_BIAS_KEY = re.compile(r"(?P<module>.+)\.lora_B\.bias")
_BASE_LAYER_KEY = re.compile(r"(?P<module>.+)\.base_layer\.weight")
_MAGNITUDE_KEY = re.compile(r"(?P<module>.+)\.lora_magnitude_vector")
LINEAR, EMBEDDING = "linear", "embedding"
# Tensor-key suffixes of features we refuse, with the name to tell the user.
_KNOWN_UNSUPPORTED_KEYS: tuple[tuple[str, str], ...] = (
    (".lora_A.bias", "a bias on lora_A (PEFT never writes one)"),
    (".trainable_tokens_delta", "trainable tokens"),
)
MAX_LISTED_PROBLEMS = 20
# The largest integer RFC 8785 (hence a manifest) represents exactly: 2**53.
MAX_JSON_INT = 2**53


class TensorSpec(Protocol):
    """What a base-model check needs to know about one tensor (``fingerprint.TensorInfo`` is one)."""

    @property
    def dtype(self) -> str: ...  # safetensors dtype name, e.g. "BF16"

    @property
    def shape(self) -> tuple[int, ...]: ...


@dataclass(frozen=True)
class LoraTarget:
    """One base tensor a LoRA adapter changes: ``W <- W + scale * (B @ A)`` (``.T`` with fan_in_fan_out).

    An embedding (``layer == "embedding"``) stores W as (num_embeddings, embedding_dim) and always takes the
    transposed delta; PEFT rounds that delta to W's dtype before adding it (``lora.Embedding.merge``).
    """

    module: str  # base module path, e.g. "model.layers.0.self_attn.q_proj"
    base_tensor: str  # "model.layers.0.self_attn.q_proj.weight"
    shape: tuple[int, int]  # base tensor shape as stored: (out, in), or (in, out) with fan_in_fan_out
    r: int
    alpha: float
    scale: float  # alpha / r, or alpha / sqrt(r) with use_rslora
    lora_a: str  # key of A (r, in) in the adapter weights file
    lora_b: str  # key of B (out, r)
    fan_in_fan_out: bool = False
    layer: str = LINEAR  # LINEAR or EMBEDDING
    # DoRA: key of lora_magnitude_vector (out,); then the merge is not additive (see apply.merge_dora_into)
    magnitude: str | None = None

    @property
    def transposed(self) -> bool:
        """W is stored (in, out): the delta is ``(B @ A).T``."""
        return self.fan_in_fan_out or self.layer == EMBEDDING

    @property
    def a_shape(self) -> tuple[int, int]:
        return (self.r, self.shape[0] if self.transposed else self.shape[1])

    @property
    def b_shape(self) -> tuple[int, int]:
        return (self.shape[1] if self.transposed else self.shape[0], self.r)

    @property
    def magnitude_shape(self) -> tuple[int]:
        return (self.b_shape[0],)


@dataclass(frozen=True)
class BiasTarget:
    """The base bias a LoRA bias changes (``lora_bias=True``): ``bias <- bias + scale * lora_B.bias``."""

    module: str
    base_tensor: str  # "<module>.bias"
    shape: tuple[int]  # (out,)
    scale: float
    lora_bias: str  # key of lora_B.bias in the adapter weights file


@dataclass(frozen=True)
class ReplaceTarget:
    """A base tensor the adapter replaces by a full copy it saved (modules_to_save, a saved embedding)."""

    module: str
    base_tensor: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype: the base tensor must have the same
    tensor: str  # key of the copy in the adapter weights file


Target = LoraTarget | BiasTarget | ReplaceTarget
# Within one module: the saved copy replaces the base first, then the LoRA delta is added (PEFT loads the
# adapter state dict, then merges).
_ORDER = {ReplaceTarget: 0, LoraTarget: 1, BiasTarget: 2}


def _target_order(target: Target) -> tuple[str, int, str]:
    return (target.module, _ORDER[type(target)], target.base_tensor)


@dataclass(frozen=True)
class LoraAdapter:
    """A PEFT LoRA adapter folder, checked and resolved (every module's rank, alpha and scale)."""

    folder: Path
    files: list[str]  # relative paths that make up the version, sorted
    config: dict[str, Any]
    targets: list[Target]  # sorted by module path; within a module: replacements, LoRA, bias

    @property
    def use_rslora(self) -> bool:
        return bool(self.config.get("use_rslora", False))

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out", False))

    def params(self) -> dict[str, Any]:
        """The manifest ``params`` of kind "lora": JSON-safe, deterministic, everything apply needs.

        The scale is resolved here, at push time, so that every consumer applies the same math whatever
        its PEFT version; ``targets_from_params`` is the inverse.
        """
        return {
            "peft_type": "LORA",
            "use_rslora": self.use_rslora,
            "fan_in_fan_out": self.fan_in_fan_out,
            "weights": WEIGHTS_FILE,
            "modules": params_modules(self.targets),
        }


def params_modules(targets: Sequence[Target]) -> dict[str, dict[str, Any]]:
    """The manifest's ``modules``: one entry per module path.

    A plain LoRA linear entry has exactly the keys ``r, alpha, scale, base_tensor, shape, lora_A, lora_B``
    (the format of every earlier version, so existing manifests keep their digests). The variants add keys
    that an older client refuses (it expects exactly those seven) rather than misapplies:
    ``"layer": "embedding"``, ``"lora_B_bias": <key>`` (LoRA bias), ``"lora_magnitude_vector": <key>``
    (DoRA) and ``"replace": {base tensor: {"tensor": <key>, "shape": [...], "dtype": ...}}``
    (modules_to_save, a saved embedding).
    """
    modules: dict[str, dict[str, Any]] = {}
    for t in targets:
        entry = modules.setdefault(t.module, {})
        if isinstance(t, LoraTarget):
            entry.update(
                r=t.r,
                alpha=t.alpha,
                scale=t.scale,
                base_tensor=t.base_tensor,
                shape=list(t.shape),
                lora_A=t.lora_a,
                lora_B=t.lora_b,
            )
            if t.layer != LINEAR:
                entry["layer"] = t.layer
            if t.magnitude is not None:
                entry["lora_magnitude_vector"] = t.magnitude
        elif isinstance(t, BiasTarget):
            entry["lora_B_bias"] = t.lora_bias
        else:
            entry.setdefault("replace", {})[t.base_tensor] = {
                "tensor": t.tensor,
                "shape": list(t.shape),
                "dtype": t.dtype,
            }
    return modules


# --------------------------------------------------------------------------------------------------
# Reading an adapter folder


def read_peft_adapter(folder: str | os.PathLike[str]) -> LoraAdapter:
    """Read and check a PEFT LoRA adapter folder (or the path of its adapter_model.safetensors).

    Raises:
        InvalidAdapter: a file is missing, or the adapter uses a feature or tensor deltareg does not
            support yet (each one named), or its tensors disagree with its config.
        UnsafeFile: the folder holds pickle files (e.g. only adapter_model.bin).
        InvalidSafetensors: adapter_model.safetensors is malformed.
    """
    root = _adapter_folder(Path(folder))
    _refuse_pickles(root)
    config = _read_config(root)
    header = read_header_file(root / WEIGHTS_FILE)
    targets = _targets_from_header(config, header)
    files = sorted([CONFIG_FILE, WEIGHTS_FILE] + ([MODEL_CARD] if (root / MODEL_CARD).is_file() else []))
    return LoraAdapter(folder=root, files=files, config=config, targets=targets)


def _adapter_folder(path: Path) -> Path:
    if path.is_file() and path.name in (WEIGHTS_FILE, CONFIG_FILE):
        path = path.parent
    if not path.is_dir():
        raise InvalidAdapter(f"{path}: not an adapter folder (expected a folder with {CONFIG_FILE})")
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if not (path / name).is_file()]
    if WEIGHTS_FILE in missing and (path / LEGACY_WEIGHTS_FILE).is_file():
        raise UnsafeFile(
            f"{path}: the adapter weights are only in {LEGACY_WEIGHTS_FILE}, a pickle, which deltareg never "
            f"loads; re-save it with save_pretrained(..., safe_serialization=True) to get {WEIGHTS_FILE}"
        )
    if missing:
        raise InvalidAdapter(f"{path}: {' and '.join(missing)} missing{_subfolder_hint(path)}")
    return path


def _subfolder_hint(path: Path) -> str:
    """PEFT saves a non-default adapter name into a sub-folder; point the user at it."""
    if not path.is_dir():
        return ""
    candidates = sorted(p.name for p in path.iterdir() if (p / CONFIG_FILE).is_file())
    if not candidates:
        return " (is this the folder PeftModel.save_pretrained wrote?)"
    return f" (adapters found in sub-folders: {', '.join(candidates[:5])}; pass one of them)"


def _refuse_pickles(root: Path) -> None:
    pickles = sorted(
        p.name for p in root.iterdir() if p.is_file() and p.name.lower().endswith(PICKLE_SUFFIXES)
    )
    if pickles:
        raise UnsafeFile(
            f"{root}: refusing an adapter folder that holds pickle files ({', '.join(pickles)}); "
            "deltareg never loads or uploads pickles: move them out of the folder"
        )


def _read_config(root: Path) -> dict[str, Any]:
    path = root / CONFIG_FILE
    raw = path.read_bytes()
    if len(raw) > MAX_CONFIG_BYTES:
        raise InvalidAdapter(f"{path}: {len(raw)} bytes, over the limit of {MAX_CONFIG_BYTES}")
    try:
        config = json.loads(raw)
    except ValueError as exc:
        raise InvalidAdapter(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise InvalidAdapter(f"{path}: expected a JSON object")
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise InvalidAdapter(f'{path}: peft_type is {peft_type!r}; only LoRA adapters ("LORA") are supported')
    problems = _config_problems(config)
    if problems:
        raise InvalidAdapter(f"{path}: " + "; ".join(problems))
    return config


def _config_problems(config: Mapping[str, Any]) -> list[str]:
    problems = [
        f"{label} is not supported yet" for key, label in UNSUPPORTED_FEATURES.items() if config.get(key)
    ]
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config['bias']!r} saves base-model biases, which is not supported yet")
    problems.extend(_init_problems(config.get("init_lora_weights", True)))
    for key in ("use_rslora", "fan_in_fan_out"):
        if not isinstance(config.get(key, False), bool):
            problems.append(f"{key} must be true or false, got {config[key]!r}")
    if not isinstance(config.get("use_dora") or False, bool):
        problems.append(f"use_dora must be true or false, got {config['use_dora']!r}")
    elif config.get("use_dora") and config.get("lora_bias"):
        problems.append("lora_bias is not supported with DoRA (use_dora); PEFT's LoraConfig refuses it too")
    problems.extend(_rank_alpha_problems(config))
    return problems


def _init_problems(init: Any) -> list[str]:
    if any(init is allowed or (isinstance(init, str) and init == allowed) for allowed in ADDITIVE_INITS):
        return []
    if isinstance(init, str) and init.lower().startswith(BASE_MUTATING_INITS):
        return [
            f"init_lora_weights={init!r} changes the base weights at initialisation, so the adapter only "
            "fits that modified base; this is not supported (convert it with save_pretrained("
            "path_initial_model_for_weight_conversion=...) to get a plain LoRA adapter)"
        ]
    return [f"init_lora_weights={init!r} is not supported yet"]


def _rank_alpha_problems(config: Mapping[str, Any]) -> list[str]:
    problems = []
    if not _is_positive_int(config.get("r")):
        problems.append(f"r must be a positive integer, got {config.get('r')!r}")
    if not _is_finite_number(config.get("lora_alpha")):
        problems.append(f"lora_alpha must be a finite number, got {config.get('lora_alpha')!r}")
    for field, check, what in (
        ("rank_pattern", _is_positive_int, "positive integers"),
        ("alpha_pattern", _is_finite_number, "finite numbers"),
    ):
        pattern = config.get(field) or {}
        if not isinstance(pattern, dict):
            problems.append(f"{field} must be an object, got {pattern!r}")
            continue
        for key, value in pattern.items():
            if not check(value):
                problems.append(f"{field}[{key!r}] must be one of {what}, got {value!r}")
            try:
                re.compile(rf"(.*\.)?({key})$")
            except re.error as exc:
                problems.append(f"{field} key {key!r} is not a valid regular expression ({exc})")
    return problems


def _is_positive_int(value: Any) -> bool:
    # Bounded like a JSON number a manifest can hold: beyond it alpha / r cannot even be computed (an int
    # too large for a float raises OverflowError).
    return type(value) is int and 0 < value <= MAX_JSON_INT


def _is_finite_number(value: Any) -> bool:
    if type(value) is int:
        return abs(value) <= MAX_JSON_INT  # math.isfinite(10**400) raises OverflowError
    return type(value) is float and math.isfinite(value)


# --------------------------------------------------------------------------------------------------
# Targets from the weights header


def _targets_from_header(config: Mapping[str, Any], header: SafetensorsHeader) -> list[Target]:
    keys, problems = _classify_keys(header, config)
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    targets: list[Target] = []
    lora_modules: dict[str, LoraTarget] = {}
    for module in sorted(keys.factors):
        target, module_problems = _target_for_module(
            module, keys.factors[module], header, config, fan_in_fan_out
        )
        problems.extend(module_problems)
        if target is not None:
            targets.append(target)
            lora_modules[module] = target
    problems.extend(_dora_targets(keys, lora_modules, header, config, targets))
    problems.extend(_bias_targets(keys, lora_modules, header, config, targets))
    problems.extend(_replace_targets(keys, lora_modules, header, targets))
    if problems:
        raise InvalidAdapter(f"{WEIGHTS_FILE}: " + join_problems(problems))
    if not lora_modules:
        raise InvalidAdapter(f"{WEIGHTS_FILE}: holds no LoRA weights (no *.lora_A.weight / *.lora_B.weight)")
    return sorted(targets, key=_target_order)


@dataclass
class _Keys:
    """The adapter file's keys by role (module paths without the ``base_model.model.`` prefix)."""

    factors: dict[str, dict[str, str]]  # module -> {"A"|"B"|"embedding_A"|"embedding_B": key}
    biases: dict[str, str]  # module -> key of lora_B.bias
    base_layers: dict[str, str]  # module -> key of <module>.base_layer.weight (a saved embedding)
    saved: dict[str, str]  # base tensor -> key of a modules_to_save tensor
    magnitudes: dict[str, str]  # module -> key of <module>.lora_magnitude_vector (DoRA)


def _classify_keys(header: SafetensorsHeader, config: Mapping[str, Any]) -> tuple[_Keys, list[str]]:
    """Every key of the weights file by role; every key with no role is a problem."""
    keys = _Keys({}, {}, {}, {}, {})
    saved_modules = _modules_to_save(config)
    problems = []
    for key in header.tensors:
        name = key.removeprefix(KEY_PREFIX) if key.startswith(KEY_PREFIX) else None
        if name is None:
            problems.append(_unsupported_key(key))
        elif match := _module_match(_FACTOR_KEY, name):
            keys.factors.setdefault(match["module"], {})[match["which"]] = key
        elif match := _module_match(_EMBEDDING_FACTOR_KEY, name):
            keys.factors.setdefault(match["module"], {})["embedding_" + match["which"]] = key
        elif match := _module_match(_BIAS_KEY, name):
            keys.biases[match["module"]] = key
        elif match := _module_match(_MAGNITUDE_KEY, name):
            keys.magnitudes[match["module"]] = key
        elif ".lora_" in name:
            problems.append(_unsupported_key(key))
        elif match := _module_match(_BASE_LAYER_KEY, name):
            keys.base_layers[match["module"]] = key
        elif _is_module_to_save(key, saved_modules):
            keys.saved[name] = key
        else:
            problems.append(_unsupported_key(key))
    return keys, problems


def _module_match(pattern: re.Pattern[str], name: str) -> re.Match[str] | None:
    match = pattern.fullmatch(name)
    return match if match and ".lora_" not in match["module"] else None


def _modules_to_save(config: Mapping[str, Any]) -> list[str]:
    listed = config.get("modules_to_save") or []
    return [name for name in listed if isinstance(name, str) and name] if isinstance(listed, list) else []


def _is_module_to_save(key: str, saved_modules: Sequence[str]) -> bool:
    """PEFT's rule (``utils.other._set_trainable``): a module is saved whole when its path in the PEFT model
    ends with a listed name; its tensors keep their own keys. Before 0.22 PEFT took any such path (plain
    ``str.endswith``), since then only one ending on a ``.`` boundary (``_is_valid_match``); the plain rule
    takes both, and PEFT saved only the tensors it matched."""
    parts = key.split(".")
    modules = (".".join(parts[:i]) for i in range(len(KEY_PREFIX.split(".")), len(parts)))
    return any(module.endswith(tuple(saved_modules)) for module in modules) if saved_modules else False


def _unsupported_key(key: str) -> str:
    for suffix, feature in _KNOWN_UNSUPPORTED_KEYS:
        if key.endswith(suffix):
            return f"{key}: {feature} is not supported yet"
    return (
        f"{key}: not a LoRA factor this version understands (expected {KEY_PREFIX}<module>.lora_A/B.weight, "
        ".lora_embedding_A/B, .lora_B.bias, .lora_magnitude_vector, or a tensor of a module listed in "
        "modules_to_save)"
    )


def _target_for_module(
    module: str,
    keys: Mapping[str, str],
    header: SafetensorsHeader,
    config: Mapping[str, Any],
    fan_in_fan_out: bool,
) -> tuple[LoraTarget | None, list[str]]:
    if set(keys) == {"A", "B"}:
        layer, names = LINEAR, ("lora_A.weight", "lora_B.weight")
        a, b = header.tensors[keys["A"]], header.tensors[keys["B"]]
    elif set(keys) == {"embedding_A", "embedding_B"}:
        layer, names = EMBEDDING, ("lora_embedding_A", "lora_embedding_B")
        a, b = header.tensors[keys["embedding_A"]], header.tensors[keys["embedding_B"]]
    elif set(keys) <= {"A", "B"} or set(keys) <= {"embedding_A", "embedding_B"}:
        missing = {"A": "lora_A.weight", "B": "lora_B.weight"}
        missing_embedding = {"embedding_A": "lora_embedding_A", "embedding_B": "lora_embedding_B"}
        expected = missing if set(keys) <= {"A", "B"} else missing_embedding
        return None, [f"{module}: {name} is missing" for which, name in expected.items() if which not in keys]
    else:
        return None, [
            f"{module}: holds both linear (lora_A/B.weight) and embedding (lora_embedding_A/B) factors"
        ]
    problems = [
        f"{entry.name}: dtype {entry.dtype} is not supported (expected {', '.join(sorted(FACTOR_DTYPES))})"
        for entry in (a, b)
        if entry.dtype not in FACTOR_DTYPES
    ]
    if len(a.shape) != 2 or len(b.shape) != 2:
        return None, [
            *problems,
            f"{module}: {names[0]} {list(a.shape)} and {names[1]} {list(b.shape)} must be matrices",
        ]
    r, alpha = resolve_rank_alpha(config, module)
    if a.shape[0] != b.shape[1]:
        problems.append(
            f"{module}: {names[0]} {list(a.shape)} and {names[1]} {list(b.shape)} disagree on the rank"
        )
    elif a.shape[0] != r:
        problems.append(f"{module}: the tensors have rank {a.shape[0]} but the config resolves r={r}")
    if problems:
        return None, problems
    out_features, in_features = b.shape[0], a.shape[1]
    transposed = fan_in_fan_out or layer == EMBEDDING
    shape = (in_features, out_features) if transposed else (out_features, in_features)
    use_rslora = bool(config.get("use_rslora", False))
    target = LoraTarget(
        module=module,
        base_tensor=f"{module}.weight",
        shape=shape,
        r=r,
        alpha=alpha,
        scale=lora_scale(alpha, r, use_rslora),
        lora_a=a.name,
        lora_b=b.name,
        fan_in_fan_out=fan_in_fan_out,
        layer=layer,
    )
    return target, []


def _dora_targets(
    keys: _Keys,
    lora_modules: dict[str, LoraTarget],
    header: SafetensorsHeader,
    config: Mapping[str, Any],
    targets: list[Target],
) -> list[str]:
    """With use_dora=true every LoRA module must have a lora_magnitude_vector (and only then may one exist);
    its LoraTarget (in ``targets`` and ``lora_modules``) is replaced by one that records the key."""
    problems = []
    use_dora = config.get("use_dora") is True
    for module, key in sorted(keys.magnitudes.items()):
        entry, target = header.tensors[key], lora_modules.get(module)
        if not use_dora:
            problems.append(f"{key}: a DoRA magnitude vector, but the config has use_dora=false")
        elif module not in keys.factors:
            problems.append(f"{key}: a DoRA magnitude vector without lora_A/B.weight")
        elif target is None:
            continue  # the module's factors are already reported
        elif target.layer != LINEAR:
            problems.append(f"{key}: DoRA on an embedding ({module}) is not supported yet")
        elif entry.dtype not in FACTOR_DTYPES:
            problems.append(
                f"{key}: dtype {entry.dtype} is not supported (expected {', '.join(sorted(FACTOR_DTYPES))})"
            )
        elif entry.shape != target.magnitude_shape:
            problems.append(
                f"{key}: shape {list(entry.shape)}, expected {list(target.magnitude_shape)} (lora_B's rows)"
            )
        else:
            dora = replace(target, magnitude=key)
            targets[targets.index(target)] = lora_modules[module] = dora
    if use_dora:
        problems.extend(
            f"{module}: use_dora is true but {KEY_PREFIX}{module}.lora_magnitude_vector is missing"
            for module, target in sorted(lora_modules.items())
            if module not in keys.magnitudes and target.layer == LINEAR
        )
        problems.extend(
            f"{module}: DoRA on an embedding is not supported yet"
            for module, target in sorted(lora_modules.items())
            if module not in keys.magnitudes and target.layer != LINEAR
        )
    return problems


def _bias_targets(
    keys: _Keys,
    lora_modules: Mapping[str, LoraTarget],
    header: SafetensorsHeader,
    config: Mapping[str, Any],
    targets: list[Target],
) -> list[str]:
    """A BiasTarget per lora_B.bias; with lora_bias=true every linear LoRA module must have one."""
    problems = []
    biases, factor_modules = keys.biases, set(keys.factors)
    lora_bias = bool(config.get("lora_bias", False))
    for module, key in sorted(biases.items()):
        entry, target = header.tensors[key], lora_modules.get(module)
        if not lora_bias:
            problems.append(
                f"{key}: a LoRA bias, but the config has lora_bias=false (PEFT would not load it)"
            )
        elif module not in factor_modules:
            problems.append(f"{key}: a LoRA bias without lora_A/B.weight")
        elif target is None:
            continue  # the module's factors are already reported
        elif target.layer != LINEAR:
            problems.append(f"{key}: PEFT supports lora_bias on linear layers only, not on embeddings")
        elif entry.dtype not in FACTOR_DTYPES:
            problems.append(f"{key}: dtype {entry.dtype} is not supported")
        elif entry.shape != (target.b_shape[0],):
            problems.append(
                f"{key}: shape {list(entry.shape)}, expected [{target.b_shape[0]}] (lora_B's rows)"
            )
        else:
            targets.append(
                BiasTarget(
                    module=module,
                    base_tensor=f"{module}.bias",
                    shape=(target.b_shape[0],),
                    scale=target.scale,
                    lora_bias=key,
                )
            )
    if lora_bias:
        problems.extend(
            f"{module}: lora_bias is true but {KEY_PREFIX}{module}.lora_B.bias is missing"
            for module, target in sorted(lora_modules.items())
            if target.layer == LINEAR and module not in biases
        )
    return problems


def _replace_targets(
    keys: _Keys, lora_modules: Mapping[str, LoraTarget], header: SafetensorsHeader, targets: list[Target]
) -> list[str]:
    """ReplaceTargets for saved embeddings (``<module>.base_layer.weight``) and modules_to_save tensors."""
    problems = []
    copies: list[tuple[str, str, str]] = []  # (module, base tensor, key)
    for module, key in sorted(keys.base_layers.items()):
        target = lora_modules.get(module)
        if target is None or target.layer != EMBEDDING:
            problems.append(f"{key}: a saved base layer is only understood for an embedding LoRA module")
        else:
            copies.append((module, target.base_tensor, key))
    for name, key in sorted(keys.saved.items()):
        module = name.rsplit(".", 1)[0] if "." in name else name
        owner = next((m for m in lora_modules if name.startswith(m + ".")), None)
        if owner is not None:
            problems.append(f"{key}: module {owner} has both LoRA factors and full modules_to_save weights")
        else:
            copies.append((module, name, key))
    for module, base_tensor, key in copies:
        entry = header.tensors[key]
        if entry.dtype not in BASE_DTYPES:
            problems.append(
                f"{key}: dtype {entry.dtype} is not supported (expected {', '.join(sorted(BASE_DTYPES))})"
            )
            continue
        target = lora_modules.get(module)
        if target is not None and entry.shape != target.shape:
            problems.append(
                f"{key}: shape {list(entry.shape)}, but the LoRA factors of {module} expect "
                f"{list(target.shape)}"
            )
            continue
        targets.append(
            ReplaceTarget(
                module=module, base_tensor=base_tensor, shape=entry.shape, dtype=entry.dtype, tensor=key
            )
        )
    return problems


def get_pattern_key(pattern_keys: Sequence[str], key_to_match: str) -> str:
    """PEFT's ``utils.other.get_pattern_key``: the first pattern key matching the module, else the module."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", key_to_match):
            return key
    return key_to_match


def resolve_rank_alpha(config: Mapping[str, Any], module: str) -> tuple[int, float]:
    """The rank and alpha PEFT gives ``module`` (``LoraModel._create_and_replace``)."""
    rank_pattern: Mapping[str, int] = config.get("rank_pattern") or {}
    alpha_pattern: Mapping[str, float] = config.get("alpha_pattern") or {}
    r = rank_pattern.get(get_pattern_key(list(rank_pattern), module), config["r"])
    alpha = alpha_pattern.get(get_pattern_key(list(alpha_pattern), module), config["lora_alpha"])
    return int(r), float(alpha)


def lora_scale(alpha: float, r: int, use_rslora: bool) -> float:
    """PEFT's scaling, in the same Python float arithmetic (``LoraLayer.update_layer``)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


# --------------------------------------------------------------------------------------------------
# Manifest params


def targets_from_params(params: Mapping[str, Any]) -> list[Target]:
    """The targets a manifest's ``params`` (kind "lora") describe; the inverse of ``LoraAdapter.params``.

    The params come from a manifest, so every field is checked; the recorded scale must be the one its
    rank and alpha give, so a manifest cannot smuggle in a different scaling.

    Raises:
        InvalidManifest: a field is missing, has the wrong type, or is inconsistent.
    """
    if params.get("peft_type") != "LORA":
        raise InvalidManifest(f"lora params: peft_type must be 'LORA', got {params.get('peft_type')!r}")
    flags = {key: params.get(key) for key in ("use_rslora", "fan_in_fan_out")}
    bad_flags = [key for key, value in flags.items() if not isinstance(value, bool)]
    if bad_flags:
        raise InvalidManifest(f"lora params: {', '.join(bad_flags)} must be true or false")
    if params.get("weights") != WEIGHTS_FILE:
        raise InvalidManifest(f"lora params: weights must be {WEIGHTS_FILE!r}, got {params.get('weights')!r}")
    modules = params.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise InvalidManifest("lora params: modules must be a non-empty object")
    targets = [
        target
        for module, entry in sorted(modules.items())
        for target in _targets_from_entry(
            module, entry, bool(flags["use_rslora"]), bool(flags["fan_in_fan_out"])
        )
    ]
    if not any(isinstance(t, LoraTarget) for t in targets):
        raise InvalidManifest("lora params: no module has LoRA factors")
    return sorted(targets, key=_target_order)


_LORA_KEYS = frozenset({"r", "alpha", "scale", "base_tensor", "shape", "lora_A", "lora_B"})
_OPTIONAL_KEYS = frozenset({"layer", "lora_B_bias", "lora_magnitude_vector", "replace"})


def _targets_from_entry(module: str, entry: Any, use_rslora: bool, fan_in_fan_out: bool) -> list[Target]:
    def fail(problem: str) -> InvalidManifest:
        return InvalidManifest(f"lora params: modules[{module!r}]: {problem}")

    if not isinstance(entry, dict):
        raise fail("must be an object")
    keys = set(entry)
    lora_keys = keys & _LORA_KEYS
    if not keys or keys - _LORA_KEYS - _OPTIONAL_KEYS or (lora_keys and lora_keys != _LORA_KEYS):
        raise fail(
            f"expected the keys {sorted(_LORA_KEYS)} (optionally {sorted(_OPTIONAL_KEYS)}), or only "
            f"'replace'; got {sorted(entry)}"
        )
    targets: list[Target] = []
    if "replace" in entry:
        targets.extend(_replace_from_entry(module, entry["replace"], fail))
    if not _LORA_KEYS <= keys:
        if keys != {"replace"}:
            raise fail(f"{sorted(keys - {'replace'})} need the LoRA keys {sorted(_LORA_KEYS)}")
        return targets
    lora = _lora_from_entry(module, entry, use_rslora, fan_in_fan_out, fail)
    targets.append(lora)
    if "lora_B_bias" in entry:
        key = entry["lora_B_bias"]
        if lora.layer != LINEAR:
            raise fail("lora_B_bias is only valid on a linear layer")
        if not (isinstance(key, str) and key):
            raise fail("lora_B_bias must be a tensor name")
        shape = (lora.b_shape[0],)
        targets.append(BiasTarget(module, f"{module}.bias", shape, lora.scale, key))
    return targets


def _lora_from_entry(
    module: str,
    entry: dict[str, Any],
    use_rslora: bool,
    fan_in_fan_out: bool,
    fail: Callable[[str], InvalidManifest],
) -> LoraTarget:
    r, alpha, scale, shape = entry["r"], entry["alpha"], entry["scale"], entry["shape"]
    layer = entry.get("layer", LINEAR)
    if "layer" in entry and layer != EMBEDDING:
        raise fail(f"layer must be {EMBEDDING!r} (or absent for a linear layer), got {layer!r}")
    if not _is_positive_int(r):
        raise fail(f"r must be a positive integer, got {r!r}")
    if not (_is_finite_number(alpha) and _is_finite_number(scale)):
        raise fail("alpha and scale must be finite numbers")
    if scale != lora_scale(alpha, r, use_rslora):
        raise fail(
            f"scale {scale!r} is not {'alpha/sqrt(r)' if use_rslora else 'alpha/r'} for r={r}, alpha={alpha}"
        )
    if entry["base_tensor"] != f"{module}.weight":
        raise fail(f"base_tensor must be {module + '.weight'!r}, got {entry['base_tensor']!r}")
    if not (isinstance(shape, list) and len(shape) == 2 and all(_is_positive_int(d) for d in shape)):
        raise fail(f"shape must be two positive integers, got {shape!r}")
    if not all(isinstance(entry[k], str) and entry[k] for k in ("lora_A", "lora_B")):
        raise fail("lora_A and lora_B must be tensor names")
    magnitude = entry.get("lora_magnitude_vector")
    if "lora_magnitude_vector" in entry:
        if layer != LINEAR:
            raise fail("lora_magnitude_vector (DoRA) is only valid on a linear layer")
        if not (isinstance(magnitude, str) and magnitude):
            raise fail("lora_magnitude_vector must be a tensor name")
    return LoraTarget(
        module=module,
        base_tensor=entry["base_tensor"],
        shape=(shape[0], shape[1]),
        r=r,
        alpha=float(alpha),
        scale=float(scale),
        lora_a=entry["lora_A"],
        lora_b=entry["lora_B"],
        fan_in_fan_out=fan_in_fan_out,
        layer=layer,
        magnitude=magnitude,
    )


def _replace_from_entry(
    module: str, replace: Any, fail: Callable[[str], InvalidManifest]
) -> list[ReplaceTarget]:
    if not isinstance(replace, dict) or not replace:
        raise fail("replace must be a non-empty object")
    targets = []
    for base_tensor, spec in sorted(replace.items()):
        if not base_tensor.startswith(module + ".") and base_tensor != module:
            raise fail(f"replace: {base_tensor!r} is not a tensor of this module")
        if not (isinstance(spec, dict) and set(spec) == {"tensor", "shape", "dtype"}):
            raise fail(f"replace[{base_tensor!r}] must have exactly the keys dtype, shape, tensor")
        tensor, shape, dtype = spec["tensor"], spec["shape"], spec["dtype"]
        if not (isinstance(tensor, str) and tensor):
            raise fail(f"replace[{base_tensor!r}].tensor must be a tensor name")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise fail(f"replace[{base_tensor!r}].shape must be a list of non-negative integers")
        if not isinstance(dtype, str) or dtype not in BASE_DTYPES:  # a list or object is unhashable
            raise fail(f"replace[{base_tensor!r}].dtype must be one of {', '.join(sorted(BASE_DTYPES))}")
        targets.append(ReplaceTarget(module, base_tensor, tuple(shape), dtype, tensor))
    return targets


# --------------------------------------------------------------------------------------------------
# Fit against a base model


def check_against_base(targets: Sequence[Target], base_tensors: Mapping[str, TensorSpec]) -> None:
    """Check that every target tensor exists in the base with the expected shape and dtype.

    Raises:
        BaseMismatch: listing every problem of ``base_problems`` at once (up to 20, then a count).
    """
    problems = base_problems(targets, base_tensors)
    if problems:
        raise BaseMismatch("the adapter does not fit this base model: " + join_problems(problems))


def base_problems(targets: Sequence[Target], base_tensors: Mapping[str, TensorSpec]) -> list[str]:
    """Every way the targets do not fit the base's tensors.

    A LoRA bias needs the base layer's bias: PEFT cannot merge it into a layer without one (``Linear.merge``
    raises "Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias"), so neither
    do we. A replaced tensor must have the saved copy's shape and dtype.
    """
    problems = []
    for target in targets:
        spec = base_tensors.get(target.base_tensor)
        if spec is None:
            if isinstance(target, BiasTarget):
                problems.append(
                    f"{target.base_tensor} is missing: the adapter has a LoRA bias (lora_bias) on "
                    f"{target.module}, whose base layer has no bias; PEFT cannot merge that either"
                )
            else:
                problems.append(f"{target.base_tensor} is missing")
        elif tuple(spec.shape) != target.shape:
            problems.append(
                f"{target.base_tensor} has shape {list(spec.shape)}, the adapter expects {list(target.shape)}"
            )
        elif isinstance(target, ReplaceTarget) and spec.dtype != target.dtype:
            problems.append(
                f"{target.base_tensor} has dtype {spec.dtype}, but the adapter saved its replacement "
                f"{target.tensor} as {target.dtype}"
            )
        elif spec.dtype not in BASE_DTYPES:
            problems.append(
                f"{target.base_tensor} has dtype {spec.dtype}; LoRA merges into "
                f"{', '.join(sorted(BASE_DTYPES))} only"
            )
    return problems


def join_problems(problems: Sequence[str]) -> str:
    shown = "; ".join(problems[:MAX_LISTED_PROBLEMS])
    more = len(problems) - MAX_LISTED_PROBLEMS
    return shown + (f"; and {more} more problem{'s' if more > 1 else ''}" if more > 0 else "")
