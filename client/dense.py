"""Dense deltas (kind ``full``): the format ``deltareg diff`` writes, read and checked without torch.

A full fine-tune changes every weight a little; its delta is stored per tensor, against the pristine base:

* ``xor`` (the default encoding): the bits of the tuned tensor XOR the bits of the base tensor, stored as
  integers of the same width. Exact by construction, no float arithmetic; where the fine-tune barely moved
  a value, the high bits (sign, exponent) are zero, which compresses well.
* ``add``: ``tuned - base`` computed in fp32 (fp64 for an fp64 tensor); applied as
  ``W <- RNE_D(f32(W) + delta)``. Where that rounding does not give back the tuned value bit for bit (rare:
  values that cross zero or change by orders of magnitude), the element is listed in ``fix_index`` /
  ``fix_value`` and set exactly, so the reconstruction is still bit-exact.
* ``replace``: the tuned tensor itself, for a tensor the base does not have, one whose shape or dtype
  changed (a resized embedding), or one that is not floating point.

Identical tensors are left out. Each stored tensor is either raw (a safetensors tensor of its own dtype and
shape) or ``zstd-planes``: its bytes split into byte planes (all first bytes, then all second bytes, ...)
and compressed with zstd into a ``U8`` tensor; the decoded size is known in advance, so a frame that would
expand beyond it is refused before it is decompressed.

Folder layout::

    delta_config.json     the parameters below (they become the manifest's ``params``)
    delta.safetensors     every stored tensor, under keys like ``xor/<tensor name>``
    files/<name>          top-level files of the tuned model that differ from the base's (config.json,
                          tokenizer files); a file-to-file apply writes them over the base's copies
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from deltareg.client.errors import InvalidDelta
from deltareg.client.jsonfile import read_json_object
from deltareg.client.lora import join_problems
from deltareg.client.manifest import FINGERPRINT, PICKLE_SUFFIXES, check_file_path
from deltareg.client.weights import SAFETENSORS_DTYPES, SafetensorsHeader, read_header_file, tensor_nbytes

CONFIG_FILE = "delta_config.json"
WEIGHTS_FILE: Final = "delta.safetensors"
FILES_FOLDER = "files"
FORMAT: Final = "deltareg.dense.v1"
MAX_CONFIG_BYTES = 16 << 20
# Float dtypes an ``add`` or ``xor`` entry can carry, with the integer dtype that holds their bits.
FLOAT_BITS: dict[str, str] = {"F16": "I16", "BF16": "I16", "F32": "I32", "F64": "I64"}
Encoding = Literal["xor", "add"]
Compression = Literal["zstd", "none"]
ENCODINGS: tuple[Encoding, ...] = ("xor", "add")
COMPRESSIONS: tuple[Compression, ...] = ("zstd", "none")


def add_dtype(dtype: str) -> str:
    """The dtype an ``add`` delta of a ``dtype`` tensor is computed and stored in."""
    return "F64" if dtype == "F64" else "F32"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Stored(_Strict):
    """One tensor of ``delta.safetensors``: its key, and the dtype and shape it decodes to."""

    key: str = Field(min_length=1, max_length=1100)
    dtype: str
    shape: tuple[int, ...] = Field(max_length=8)
    codec: Literal["raw", "zstd-planes"]

    @model_validator(mode="after")
    def _known(self) -> Stored:
        if self.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}")
        if any(d < 0 for d in self.shape):
            raise ValueError(f"negative dimension in {list(self.shape)}")
        return self

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class DenseEntry(_Strict):
    """How to get one tensor of the tuned model from the base (see the module docstring)."""

    op: Literal["add", "xor", "replace"]
    dtype: str  # of the result
    shape: tuple[int, ...] = Field(max_length=8)
    base_dtype: str | None = None  # None with base_shape None: a tensor the base does not have
    base_shape: tuple[int, ...] | None = None
    data: Stored
    fix_index: Stored | None = None
    fix_value: Stored | None = None

    @property
    def is_new(self) -> bool:
        return self.base_dtype is None

    @property
    def changes_layout(self) -> bool:
        """Whether the result differs from the base tensor in shape or dtype (or is new)."""
        return self.is_new or self.base_dtype != self.dtype or self.base_shape != self.shape

    @model_validator(mode="after")
    def _consistent(self) -> DenseEntry:
        problem = _entry_problem(self)
        if problem:
            raise ValueError(problem)
        return self


def _entry_problem(entry: DenseEntry) -> str | None:
    if entry.dtype not in SAFETENSORS_DTYPES:
        return f"unknown dtype {entry.dtype!r}"
    if (entry.base_dtype is None) != (entry.base_shape is None):
        return "base_dtype and base_shape go together"
    if entry.op != "replace":
        if entry.dtype not in FLOAT_BITS:
            return f"{entry.op} needs a floating-point tensor, not {entry.dtype}"
        if entry.base_dtype != entry.dtype or entry.base_shape != entry.shape:
            return f"{entry.op} keeps the base tensor's dtype and shape"
    stored = _stored_dtype(entry)
    if entry.data.dtype != stored or entry.data.shape != entry.shape:
        return f"an {entry.op} entry of a {entry.dtype} tensor stores {stored} {list(entry.shape)}"
    if entry.op != "add":
        return "only an add entry has fix_index / fix_value" if entry.fix_index or entry.fix_value else None
    return _fix_problem(entry)


def _fix_problem(entry: DenseEntry) -> str | None:
    if entry.fix_index is None and entry.fix_value is None:
        return None
    if entry.fix_index is None or entry.fix_value is None:
        return "fix_index and fix_value go together"
    count = entry.fix_index.shape
    if entry.fix_index.dtype != "I64" or len(count) != 1:
        return "fix_index is an I64 vector"
    if entry.fix_value.dtype != entry.dtype or entry.fix_value.shape != count:
        return f"fix_value is a {entry.dtype} vector as long as fix_index"
    return None


def _stored_dtype(entry: DenseEntry) -> str:
    if entry.op == "xor":
        return FLOAT_BITS[entry.dtype]
    if entry.op == "add":
        return add_dtype(entry.dtype)
    return entry.dtype


class DenseStats(_Strict):
    identical: int = Field(ge=0)  # tensors left out because the fine-tune did not change them
    changed_bytes: int = Field(ge=0)  # bytes of the tuned tensors the delta carries, in their dtypes
    stored_bytes: int = Field(ge=0)  # bytes of delta.safetensors

    @property
    def ratio(self) -> float:
        """How many times smaller the stored delta is than the tensors it reproduces."""
        return self.changed_bytes / self.stored_bytes if self.stored_bytes else 1.0


class DenseParams(_Strict):
    """``delta_config.json``, and the manifest ``params`` of a version of kind ``full``."""

    format: Literal["deltareg.dense.v1"]
    encoding: Encoding
    compression: Compression
    weights: Literal["delta.safetensors"] = WEIGHTS_FILE
    base_fingerprint: str = Field(pattern=FINGERPRINT.pattern)
    result_fingerprint: str = Field(pattern=FINGERPRINT.pattern)
    result_dtype: str  # the dtype most of the tuned model's bytes are in: what "result for a dtype" means
    tensors: dict[str, DenseEntry] = Field(max_length=100_000)
    files: list[str] = Field(default_factory=list, max_length=64)  # files/<name>, sorted
    stats: DenseStats

    @model_validator(mode="after")
    def _check(self) -> DenseParams:
        for path in self.files:
            check_file_path(path)
            if not path.startswith(FILES_FOLDER + "/") or path.count("/") != 1:
                raise ValueError(f"file {path!r}: overlay files live directly under {FILES_FOLDER}/")
        if self.files != sorted(set(self.files)):
            raise ValueError("files must be unique and sorted")
        keys = [s.key for e in self.tensors.values() for s in (e.data, e.fix_index, e.fix_value) if s]
        if len(keys) != len(set(keys)):
            raise ValueError("every stored tensor needs its own key")
        return self

    @classmethod
    def parse(cls, data: Any, source: str) -> DenseParams:
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}"
                for err in exc.errors()[:5]
            )
            raise InvalidDelta(f"{source}: {problems}") from None

    def to_json_obj(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


@dataclass(frozen=True)
class DenseTarget:
    """One base tensor a dense delta changes, adds or replaces."""

    base_tensor: str
    entry: DenseEntry

    @property
    def module(self) -> str:  # what error messages name, as for a LoRA target
        return self.base_tensor


@dataclass(frozen=True)
class DenseDelta:
    """A ``deltareg diff`` output folder, checked."""

    folder: Path
    files: list[str]  # relative paths that make up the version, sorted
    params: DenseParams
    raw_params: dict[str, Any]  # delta_config.json as written: the manifest's params, byte for byte the same

    @property
    def targets(self) -> list[DenseTarget]:
        return targets_from_params(self.params)


def main_dtype(tensors: Mapping[str, Any]) -> str:
    """The dtype most of a model's bytes are in (a bf16 model with fp32 norms is "BF16"); ``tensors`` maps
    names to anything with ``dtype`` and ``shape`` (a fingerprint's TensorInfo)."""
    by_dtype: Counter[str] = Counter()
    for info in tensors.values():
        by_dtype[info.dtype] += tensor_nbytes(info.dtype, tuple(info.shape))
    return by_dtype.most_common(1)[0][0] if by_dtype else "F32"


def is_dense_folder(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def read_dense_delta(folder: str | os.PathLike[str]) -> DenseDelta:
    """Read and check a dense delta folder: its config, its weights file's header, its overlay files.

    Raises:
        InvalidDelta: a file is missing or malformed, or config and weights disagree (every problem named).
        InvalidSafetensors: delta.safetensors is not a well-formed safetensors file.
    """
    root = Path(folder)
    raw_params = read_config(root / CONFIG_FILE)
    params = DenseParams.parse(raw_params, str(root / CONFIG_FILE))
    if not (root / WEIGHTS_FILE).is_file():
        raise InvalidDelta(f"{root}: {WEIGHTS_FILE} is missing")
    check_stored_tensors(params, read_header_file(root / WEIGHTS_FILE), str(root / WEIGHTS_FILE))
    missing = [path for path in params.files if not (root / path).is_file()]
    if missing:
        raise InvalidDelta(f"{root}: {', '.join(missing)} missing (listed in {CONFIG_FILE})")
    return DenseDelta(root, sorted([CONFIG_FILE, WEIGHTS_FILE, *params.files]), params, raw_params)


def read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InvalidDelta(f"{path.parent}: {CONFIG_FILE} is missing (is this a folder deltareg diff wrote?)")
    return read_json_object(path, MAX_CONFIG_BYTES, InvalidDelta)


def check_stored_tensors(params: DenseParams, header: SafetensorsHeader, source: str) -> None:
    """Every stored tensor the params name is in the header as described, and nothing else is."""
    problems = []
    expected = {s.key: s for e in params.tensors.values() for s in (e.data, e.fix_index, e.fix_value) if s}
    for key, stored in expected.items():
        entry = header.tensors.get(key)
        want = (stored.dtype, stored.shape) if stored.codec == "raw" else ("U8", None)
        if entry is None:
            problems.append(f"{key} is missing")
        elif entry.dtype != want[0] or (want[1] is not None and entry.shape != want[1]):
            problems.append(
                f"{key} is {entry.dtype} {list(entry.shape)}, the config says {want[0]} {want[1]}"
            )
        elif stored.codec == "zstd-planes" and len(entry.shape) != 1:
            problems.append(f"{key} holds compressed bytes and must be one-dimensional")
    extra = sorted(header.tensors.keys() - expected.keys())
    if extra:
        problems.append(f"tensors the config does not name: {', '.join(extra[:5])}")
    if problems:
        raise InvalidDelta(f"{source}: " + join_problems(problems))


def targets_from_params(params: DenseParams | Mapping[str, Any]) -> list[DenseTarget]:
    checked = params if isinstance(params, DenseParams) else DenseParams.parse(params, "manifest params")
    return [DenseTarget(name, entry) for name, entry in sorted(checked.tensors.items())]


def base_problems(targets: Sequence[DenseTarget], base_tensors: Mapping[str, Any]) -> list[str]:
    """Every tensor the delta changes must be in the base with the dtype and shape it was computed from,
    and every tensor it adds must not be; every way that fails."""
    problems = []
    for target in targets:
        entry, spec = target.entry, base_tensors.get(target.base_tensor)
        if entry.is_new:
            if spec is not None:
                problems.append(f"{target.base_tensor} already exists, but the delta adds it as a new tensor")
        elif spec is None:
            problems.append(f"{target.base_tensor} is missing")
        elif spec.dtype != entry.base_dtype or tuple(spec.shape) != entry.base_shape:
            problems.append(
                f"{target.base_tensor} is {spec.dtype} {list(spec.shape)}, the delta was computed from "
                f"{entry.base_dtype} {list(entry.base_shape or ())}"
            )
    return problems


def overlay_candidates(folder: Path) -> list[Path]:
    """Top-level files of a model folder that are neither weights, nor indexes, nor pickles, nor hidden."""
    return [
        path
        for path in sorted(folder.iterdir())
        if path.is_file()
        and not path.name.startswith(".")
        and not path.name.endswith((".safetensors", ".safetensors.index.json"))
        and not path.name.lower().endswith(PICKLE_SUFFIXES)
    ]
