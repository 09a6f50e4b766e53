"""Safetensors headers, checked strictly, and the weight files that make up a model.

Both sides use this module: the client checks a file before pushing it, and the server checks every
safetensors blob before a version becomes visible (it passes a ``read_at`` that reads from its blob store).
Nothing here imports torch or reads tensor data; pickles are recognised by their first bytes and refused,
never loaded.

File layout (https://github.com/huggingface/safetensors): 8 bytes little-endian header length N, N bytes
of UTF-8 JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``,
then the data area, whose byte ranges the offsets (relative to the data area) must tile exactly.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from deltareg.client.errors import InvalidModel, InvalidSafetensors, UnsafeFile
from deltareg.client.manifest import PICKLE_SUFFIXES

# Item size in bytes of every byte-aligned dtype safetensors defines.
SAFETENSORS_DTYPES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E4M3FNUZ": 1,
    "F8_E5M2FNUZ": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "C64": 8,
    "F64": 8,
    "I64": 8,
    "U64": 8,
}
# Packed sub-byte types: their shapes count packed elements, so byte sizes need bit arithmetic we do not
# support yet. Named here only to give a precise error.
SUB_BYTE_DTYPES = frozenset({"F4", "F6_E2M3", "F6_E3M2"})

MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_TENSOR_NAME_LENGTH = 1024
METADATA_KEY = "__metadata__"
INDEX_SUFFIX = ".safetensors.index.json"
DEFAULT_INDEX_NAME = "model" + INDEX_SUFFIX
ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})

ReadAt = Callable[[int, int], bytes]


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file; ``start``/``end`` are absolute offsets in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class SafetensorsHeader:
    header_len: int
    tensors: dict[str, TensorEntry]  # in file order (by offset)
    metadata: dict[str, str]

    @property
    def data_start(self) -> int:
        """Absolute offset of the data area."""
        return 8 + self.header_len


def tensor_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    """The bytes of a tensor of ``dtype`` (a safetensors name) and ``shape``."""
    return math.prod(shape) * SAFETENSORS_DTYPES[dtype]


def encode_header(
    tensors: Iterable[tuple[str, str, tuple[int, ...]]], metadata: Mapping[str, str] | None = None
) -> bytes:
    """The start of a safetensors file (length prefix and header) whose tensors (name, dtype, shape) lie one
    after another in the given order. The data area starts 8-byte aligned, as safetensors writes it."""
    header: dict[str, Any] = {METADATA_KEY: dict(metadata)} if metadata else {}
    offset = 0
    for name, dtype, shape in tensors:
        end = offset + tensor_nbytes(dtype, shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


# --------------------------------------------------------------------------------------------------
# Header parsing


def read_header(
    read_at: ReadAt,
    file_size: int,
    *,
    source: str = "file",
    max_header_bytes: int = MAX_HEADER_BYTES,
) -> SafetensorsHeader:
    """Parse and fully validate the header of a safetensors file of ``file_size`` bytes.

    ``read_at(offset, length)`` must return those bytes. Any problem raises ``InvalidSafetensors`` with a
    message that names ``source`` and says exactly what is wrong.
    """

    def fail(problem: str) -> InvalidSafetensors:
        return InvalidSafetensors(f"{source}: {problem}")

    if file_size < 8:
        raise fail(f"file is {file_size} bytes, too short to be safetensors (needs an 8-byte header length)")
    prefix = _read_exact(read_at, 0, min(file_size, 16), fail)
    header_len = struct.unpack("<Q", prefix[:8])[0]
    _check_header_length(header_len, file_size, max_header_bytes, prefix, fail)
    raw = _read_exact(read_at, 8, header_len, fail)
    if not raw.startswith(b"{"):
        raise fail(_not_safetensors(prefix, "its header does not start with '{'"))
    parsed = _parse_json_object(raw, fail)
    metadata = _parse_metadata(parsed.pop(METADATA_KEY), fail) if METADATA_KEY in parsed else {}
    data_start = 8 + header_len
    entries = [_parse_entry(name, value, data_start, fail) for name, value in parsed.items()]
    entries.sort(key=lambda e: (e.start, e.end))
    _check_tiling(entries, data_start, file_size, fail)
    return SafetensorsHeader(header_len, {e.name: e for e in entries}, metadata)


def _read_exact(read_at: ReadAt, offset: int, length: int, fail: Callable[[str], Exception]) -> bytes:
    data = bytes(read_at(offset, length))
    if len(data) != length:
        raise fail(f"could read only {len(data)} of {length} bytes at offset {offset} (file truncated?)")
    return data


def _check_header_length(
    header_len: int, file_size: int, max_header_bytes: int, prefix: bytes, fail: Callable[[str], Exception]
) -> None:
    if header_len == 0:
        raise fail(_not_safetensors(prefix, "header length is 0"))
    if header_len > max_header_bytes:
        raise fail(
            _not_safetensors(prefix, f"header length {header_len} is over the limit of {max_header_bytes}")
        )
    if 8 + header_len > file_size:
        raise fail(
            _not_safetensors(prefix, f"header length {header_len} is beyond the file ({file_size} bytes)")
        )


def _not_safetensors(prefix: bytes, problem: str) -> str:
    """The problem, plus what the file looks like when its first bytes give it away."""
    kind = _foreign_format(prefix)
    if kind is None:
        return problem
    return (
        f"does not look like safetensors ({problem}); it starts like {kind}. "
        "deltareg never loads pickles: convert the weights to safetensors"
    )


def _foreign_format(prefix: bytes) -> str | None:
    if len(prefix) >= 2 and prefix[0] == 0x80 and 2 <= prefix[1] <= 5:
        return "a Python pickle (e.g. a torch .bin/.pt checkpoint)"
    if prefix.startswith(b"PK\x03\x04"):
        return "a zip archive (e.g. a torch.save checkpoint, which holds a pickle)"
    if prefix.startswith(b"\x93NUMPY"):
        return "a numpy .npy file"
    return None


def _parse_json_object(raw: bytes, fail: Callable[[str], Exception]) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise fail(f"header is not valid UTF-8 ({exc.reason} at byte {8 + exc.start})") from None
    try:
        parsed = json.loads(text, object_pairs_hook=_refuse_duplicate_keys, parse_constant=_refuse_constant)
    except _DuplicateKey as exc:
        raise fail(f"header has the key {exc.key!r} twice") from None
    except ValueError as exc:
        raise fail(f"header is not valid JSON ({exc})") from None
    except RecursionError:  # json recurses once per level: "[[[[..." deep enough exhausts the stack
        raise fail("header nests JSON too deeply to be a safetensors header") from None
    if not isinstance(parsed, dict):
        raise fail("header is not a JSON object")
    return parsed


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _parse_metadata(value: Any, fail: Callable[[str], Exception]) -> dict[str, str]:
    if not isinstance(value, dict):
        raise fail(f"{METADATA_KEY} must be an object of strings, not {_json_type(value)}")
    for key, item in value.items():
        if not isinstance(item, str):
            raise fail(f"{METADATA_KEY}[{key!r}] must be a string, not {_json_type(item)}")
        if not (_is_utf8(key) and _is_utf8(item)):
            raise fail(f"{METADATA_KEY} entry {key!r} has text that is not valid Unicode")
    return dict(value)


def _parse_entry(name: str, value: Any, data_start: int, fail: Callable[[str], Exception]) -> TensorEntry:
    _check_tensor_name(name, fail)
    if not isinstance(value, dict):
        raise fail(f"tensor {name!r}: entry must be an object, not {_json_type(value)}")
    missing, extra = ENTRY_KEYS - value.keys(), value.keys() - ENTRY_KEYS
    if missing or extra:
        problem = f"lacks {sorted(missing)}" if missing else f"has unknown keys {sorted(extra)}"
        raise fail(f"tensor {name!r}: entry {problem} (expected dtype, shape, data_offsets)")
    dtype = _check_dtype(name, value["dtype"], fail)
    shape = _check_int_list(name, "shape", value["shape"], fail)
    offsets = _check_int_list(name, "data_offsets", value["data_offsets"], fail)
    if len(offsets) != 2 or offsets[0] > offsets[1]:
        raise fail(
            f"tensor {name!r}: data_offsets must be [begin, end] with begin <= end, got {list(offsets)}"
        )
    begin, end = offsets
    expected = tensor_nbytes(dtype, shape)
    if end - begin != expected:
        raise fail(
            f"tensor {name!r}: data_offsets span {end - begin} bytes but {dtype} of shape {list(shape)} "
            f"needs {expected}"
        )
    return TensorEntry(name, dtype, shape, data_start + begin, data_start + end)


def _check_tensor_name(name: str, fail: Callable[[str], Exception]) -> None:
    if not name:
        raise fail("a tensor has an empty name")
    if len(name) > MAX_TENSOR_NAME_LENGTH:
        raise fail(f"tensor name {name[:40]!r}... is {len(name)} characters (limit {MAX_TENSOR_NAME_LENGTH})")
    bad = next((c for c in name if _is_control(c)), None)
    if bad is not None:
        raise fail(f"tensor name {name!r} contains the control character U+{ord(bad):04X}")
    if not _is_utf8(name):
        raise fail(f"tensor name {name!r} is not valid Unicode (lone surrogate)")


def _is_control(char: str) -> bool:
    code = ord(char)
    return code < 0x20 or 0x7F <= code <= 0x9F


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_dtype(name: str, dtype: Any, fail: Callable[[str], Exception]) -> str:
    if isinstance(dtype, str) and dtype in SAFETENSORS_DTYPES:
        return dtype
    if isinstance(dtype, str) and dtype in SUB_BYTE_DTYPES:
        raise fail(f"tensor {name!r}: sub-byte dtype {dtype} is not supported")
    raise fail(f"tensor {name!r}: unknown dtype {dtype!r} (known: {', '.join(sorted(SAFETENSORS_DTYPES))})")


def _check_int_list(name: str, field: str, value: Any, fail: Callable[[str], Exception]) -> tuple[int, ...]:
    # bool is an int subclass in Python, but `true` is not a dimension.
    if not isinstance(value, list) or not all(type(v) is int and v >= 0 for v in value):
        raise fail(f"tensor {name!r}: {field} must be a list of non-negative integers, got {value!r}")
    return tuple(value)


def _check_tiling(
    entries: list[TensorEntry], data_start: int, file_size: int, fail: Callable[[str], Exception]
) -> None:
    """Sorted by offset, the tensors must cover the data area exactly: no gap, no overlap, no tail."""
    cursor = data_start
    previous: str | None = None
    for entry in entries:
        if entry.start > cursor:
            after = f"after tensor {previous!r}" if previous else "at the start of the data area"
            raise fail(f"gap of {entry.start - cursor} bytes {after} (before tensor {entry.name!r})")
        if entry.start < cursor:
            raise fail(f"tensor {entry.name!r} overlaps tensor {previous!r}")
        cursor, previous = entry.end, entry.name
    if cursor != file_size:
        data_size = file_size - data_start
        covered = cursor - data_start
        if cursor > file_size:
            raise fail(f"tensors need {covered} data bytes but the file has only {data_size} (truncated?)")
        raise fail(f"{file_size - cursor} bytes after the last tensor are not part of any tensor")


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


# --------------------------------------------------------------------------------------------------
# Local files


def read_header_file(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Read and validate the header of a local safetensors file."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            return read_header(reader_of(handle), size, source=str(path))
    except OSError as exc:
        raise InvalidSafetensors(f"{path}: cannot read: {exc.strerror or exc}") from None


def reader_of(handle: BinaryIO) -> ReadAt:
    """A ``read_at`` over an open binary file (seek + read: portable, unlike os.pread)."""

    def read_at(offset: int, length: int) -> bytes:
        handle.seek(offset)
        return handle.read(length)

    return read_at


def validate_safetensors_file(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Check a local safetensors file before it is pushed; the same checks the server runs."""
    return read_header_file(path)


# --------------------------------------------------------------------------------------------------
# Model discovery


def find_weight_files(model: str | os.PathLike[str]) -> list[Path]:
    """The safetensors files that hold a model's weights.

    ``model`` is one ``.safetensors`` file, a folder with a ``*.safetensors.index.json`` (exactly the files
    its ``weight_map`` names), or a folder of ``*.safetensors`` files (all of them, sorted by name).
    Pickle-only models raise ``UnsafeFile``; anything else without weights raises ``InvalidModel``.
    """
    path = Path(model)
    if path.is_dir():
        return _find_in_folder(path)
    if path.is_file():
        return _check_single_file(path)
    raise InvalidModel(f"{path}: no such file or folder")


def _check_single_file(path: Path) -> list[Path]:
    name = path.name.lower()
    if name.endswith(INDEX_SUFFIX):
        return _files_from_index(path.parent, path)
    if name.endswith(".safetensors"):
        return [path]
    if name.endswith(PICKLE_SUFFIXES):
        raise _pickle_refusal([path])
    raise InvalidModel(f"{path}: not a .safetensors file or a .safetensors.index.json")


def _find_in_folder(folder: Path) -> list[Path]:
    index = find_index(folder)
    if index is not None:
        return _files_from_index(folder, index)
    # Hidden files are skipped: macOS leaves "._model.safetensors" resource forks beside real files.
    visible = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    weights = [p for p in visible if p.name.endswith(".safetensors")]
    if weights:
        return weights
    pickles = [p for p in visible if p.name.lower().endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise _pickle_refusal(pickles)
    raise InvalidModel(f"{folder}: no weights found (expected *.safetensors files or {DEFAULT_INDEX_NAME})")


def _pickle_refusal(pickles: list[Path]) -> UnsafeFile:
    names = ", ".join(p.name for p in pickles[:5]) + (", ..." if len(pickles) > 5 else "")
    where = pickles[0].parent
    return UnsafeFile(
        f"{where}: refusing to read pickle weights ({names}); deltareg never unpickles, "
        "convert to safetensors (e.g. model.save_pretrained(dir, safe_serialization=True))"
    )


def find_index(folder: Path) -> Path | None:
    indexes = sorted(p for p in folder.glob("*" + INDEX_SUFFIX) if p.is_file() and not p.name.startswith("."))
    if not indexes:
        return None
    if len(indexes) == 1:
        return indexes[0]
    default = folder / DEFAULT_INDEX_NAME
    if default in indexes:
        return default
    names = ", ".join(p.name for p in indexes)
    raise InvalidModel(f"{folder}: several safetensors indexes ({names}); pass the one to use")


def _files_from_index(folder: Path, index: Path) -> list[Path]:
    weight_map = _read_weight_map(index)
    by_file: dict[str, list[str]] = {}
    for tensor, file_name in weight_map.items():
        by_file.setdefault(file_name, []).append(tensor)
    files = []
    for file_name, tensors in sorted(by_file.items()):
        shard = _resolve_shard(folder, index, file_name)
        present = read_header_file(shard).tensors
        absent = [t for t in tensors if t not in present]
        if absent:
            shown = ", ".join(repr(t) for t in absent[:5]) + (", ..." if len(absent) > 5 else "")
            raise InvalidModel(f"{index}: weight_map puts {shown} in {file_name}, which does not contain it")
        files.append(shard)
    return files


def _read_weight_map(index: Path) -> dict[str, str]:
    try:
        parsed = json.loads(index.read_bytes())
    except (OSError, ValueError) as exc:
        raise InvalidModel(f"{index}: cannot read the index: {exc}") from None
    weight_map = parsed.get("weight_map") if isinstance(parsed, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise InvalidModel(f"{index}: expected a JSON object with a non-empty 'weight_map' object")
    bad = next(((k, v) for k, v in weight_map.items() if not isinstance(v, str) or not v), None)
    if bad is not None:
        raise InvalidModel(f"{index}: weight_map[{bad[0]!r}] must be a file name, got {bad[1]!r}")
    return weight_map


def _resolve_shard(folder: Path, index: Path, file_name: str) -> Path:
    # The index is untrusted input: it may only name files inside the model folder.
    relative = Path(file_name)
    if relative.is_absolute() or ".." in relative.parts or not file_name.endswith(".safetensors"):
        raise InvalidModel(f"{index}: weight_map names {file_name!r}, not a .safetensors file in the folder")
    shard = folder / relative
    if not shard.is_file():
        raise InvalidModel(f"{index}: weight_map names {file_name}, which does not exist in {folder}")
    return shard
