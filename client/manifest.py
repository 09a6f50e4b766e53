"""The version manifest and its digest.

A manifest names the files of a version (path, digest, size), the base model it applies to, an
optional parent version, the kind's parameters and free-form training metadata. Its identity is
``sha256:<hex>`` of its RFC 8785 canonical JSON, so any party can recompute it from the JSON alone.
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Annotated, Any, Final, Literal

import rfc8785
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from deltareg.client.errors import InvalidManifest

SCHEMA: Final = "deltareg.manifest.v1"
MAX_FILES = 256
MAX_FILE_SIZE = 1 << 40  # 1 TiB: a sanity bound; the server enforces its own, lower, limit
MAX_PATH_LENGTH = 255
# Weight formats that are pickles underneath: deltareg never reads them.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")
PATH_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
FINGERPRINT = re.compile(r"tmv1:[0-9a-f]{64}")
FILE_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
TENSOR_DIGEST = re.compile(r"[0-9a-f]{64}")

Digest = Annotated[str, Field(pattern=FILE_DIGEST.pattern)]


def check_file_path(path: str) -> str:
    """A version's file path: relative, '/'-separated, no '..', no hidden or control characters."""
    parts = path.split("/")
    if len(path) > MAX_PATH_LENGTH or not all(PATH_PART.fullmatch(p) for p in parts):
        raise ValueError(
            f"invalid file path {path!r}: use relative paths of letters, digits, '.', '_' and '-' "
            "(no '..', no leading '.' or '/', at most 255 characters)"
        )
    if path.lower().endswith(PICKLE_SUFFIXES):
        raise ValueError(f"refusing {path!r}: pickle-based weight files are never accepted; use safetensors")
    return path


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileEntry(_Strict):
    path: str
    digest: Digest
    size: int = Field(ge=0, le=MAX_FILE_SIZE)

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        return check_file_path(value)


class BaseConfig(_Strict):
    """What the base model's config.json says, recorded at push so that apply can check it."""

    architecture: str | None = Field(default=None, max_length=256)  # "LlamaForCausalLM"
    model_type: str | None = Field(default=None, max_length=256)  # "llama"
    vocab_size: int | None = Field(default=None, ge=0)
    digest: Digest  # of the config without the keys that change with tooling (see compat.normalized)


class BaseModelRef(_Strict):
    fingerprint: str = Field(pattern=FINGERPRINT.pattern)
    name: str | None = Field(default=None, max_length=256)
    revision: str | None = Field(default=None, max_length=256)
    # Digests (hex) of the base tensors the delta reads or writes, by tensor name.
    tensors: dict[str, Annotated[str, Field(pattern=TENSOR_DIGEST.pattern)]] = Field(default_factory=dict)
    config: BaseConfig | None = None

    @model_serializer(mode="wrap")
    def _omit_absent_config(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Manifests made before the config was recorded must keep their JSON, hence their digest.
        data: dict[str, Any] = handler(self)
        if self.config is None:
            data.pop("config", None)
        return data


class Manifest(_Strict):
    schema_: Literal["deltareg.manifest.v1"] = Field(default=SCHEMA, alias="schema")
    kind: Literal["lora", "full"]
    files: list[FileEntry] = Field(min_length=1, max_length=MAX_FILES)
    base: BaseModelRef
    parent: Digest | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _unique_sorted_paths(self) -> Manifest:
        paths = [f.path for f in self.files]
        if len(set(paths)) != len(paths):
            raise ValueError("file paths must be unique")
        if paths != sorted(paths):
            raise ValueError("files must be sorted by path")
        return self

    @model_validator(mode="after")
    def _finite_numbers(self) -> Manifest:
        # JSON has no NaN or Infinity; pydantic would write them as null, silently changing the value.
        where = _non_finite({"params": self.params, "metadata": self.metadata})
        if where:
            raise ValueError(f"{where} is not a finite number (NaN and Infinity have no JSON form)")
        return self

    @model_validator(mode="after")
    def _canonicalizable(self) -> Manifest:
        # RFC 8785 holds numbers as IEEE doubles: an integer beyond 2**53 has no canonical form, so the
        # manifest would have no digest.
        try:
            self.canonical_bytes()
        except rfc8785.CanonicalizationError as exc:
            raise ValueError(f"not representable as canonical JSON (RFC 8785): {exc}") from None
        return self

    def to_json_obj(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    def canonical_bytes(self) -> bytes:
        return rfc8785.dumps(self.to_json_obj())

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.canonical_bytes()).hexdigest()

    def file(self, path: str) -> FileEntry:
        return next(f for f in self.files if f.path == path)

    @classmethod
    def parse(cls, data: Any) -> Manifest:
        """Validate untrusted manifest JSON; every problem becomes one InvalidManifest message."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'manifest'}: {err['msg']}" for err in exc.errors()
            )
            raise InvalidManifest(f"invalid manifest: {problems}") from None


def _non_finite(value: Any) -> str | None:
    """The path of the first NaN or infinite float in a JSON-like value, or None (iterative: a value may be
    nested deeper than Python's recursion limit)."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return path or "a value"
        children = (
            item.items() if isinstance(item, dict) else enumerate(item) if isinstance(item, list) else ()
        )
        stack.extend(
            (f"{path}.{key}" if path else str(key), child) for key, child in reversed(list(children))
        )
    return None


def digest_of_json(data: dict[str, Any]) -> str:
    """Digest of any JSON object in its canonical form (what a manifest digest is computed over)."""
    return "sha256:" + hashlib.sha256(rfc8785.dumps(data)).hexdigest()
