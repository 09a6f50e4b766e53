"""Dense deltas with torch: ``diff_models`` (``deltareg diff``) and the decoding and math of their entries.

The format and its checks are in ``deltareg.client.dense`` (no torch there). Both models are read through
safetensors one tensor at a time and the delta file is written the same way, so memory stays near one
tensor of each model plus its encoded form, whatever the model's size.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import zstandard
from safetensors import safe_open

from deltareg.client.dense import (
    COMPRESSIONS,
    CONFIG_FILE,
    ENCODINGS,
    FILES_FOLDER,
    FLOAT_BITS,
    FORMAT,
    WEIGHTS_FILE,
    Compression,
    DenseEntry,
    DenseParams,
    DenseStats,
    Encoding,
    Stored,
    add_dtype,
    main_dtype,
    overlay_candidates,
)
from deltareg.client.errors import InvalidDelta, InvalidInput, InvalidModel
from deltareg.client.fingerprint import FingerprintCache, TensorInfo, fingerprint_path, safetensors_dtype
from deltareg.client.manifest import check_file_path
from deltareg.client.outputs import OutputFile, refuse_existing_output, write_atomically
from deltareg.client.weights import (
    SAFETENSORS_DTYPES,
    encode_header,
    find_weight_files,
    read_header_file,
    tensor_nbytes,
)

ZSTD_LEVEL = 3  # zstd's default: fast, and higher levels gain little on float bits
COPY_CHUNK = 16 << 20


@dataclass(frozen=True)
class DiffResult:
    output: Path
    params: DenseParams
    skipped_files: list[str]  # top-level files of TUNED that differ but have names a version cannot carry


# --------------------------------------------------------------------------------------------------
# diff


def diff_models(
    base: str | os.PathLike[str],
    tuned: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    encoding: Encoding = "xor",
    compression: Compression = "zstd",
    cache: FingerprintCache | None = None,
) -> DiffResult:
    """Write the dense delta that turns ``base`` into ``tuned`` (model folders or single files) to ``out``.

    Raises:
        InvalidInput: ``out`` exists, an option is unknown, or the two models are the same.
        InvalidModel: ``tuned`` lacks tensors of ``base`` (a delta cannot remove tensors), or a model is
            unusable; InvalidSafetensors, UnsafeFile: a model folder holds malformed files or pickles.
    """
    if encoding not in ENCODINGS:
        raise InvalidInput(f"encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}")
    if compression not in COMPRESSIONS:
        raise InvalidInput(f"compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}")
    output = Path(out)
    refuse_existing_output(output)
    base_print, tuned_print = fingerprint_path(base, cache=cache), fingerprint_path(tuned, cache=cache)
    removed = sorted(base_print.tensors.keys() - tuned_print.tensors.keys())
    if removed:
        raise InvalidModel(
            f"{tuned} lacks {len(removed)} tensors of {base} ({', '.join(removed[:5])}): a dense delta "
            "changes, adds and resizes tensors but cannot remove them"
        )
    overlays, skipped = _changed_files(Path(base), Path(tuned))
    changed = [
        name
        for name, info in tuned_print.tensors.items()
        if name not in base_print.tensors or base_print.tensors[name].digest != info.digest
    ]
    if not changed and not overlays:
        raise InvalidInput(f"{tuned} has the same weights and files as {base}: there is no delta to write")

    def write(temp: Path) -> DenseParams:
        entries = _write_delta_weights(base, tuned, changed, base_print.tensors, temp, encoding, compression)
        files = _copy_overlays(overlays, temp)
        params = DenseParams(
            format=FORMAT,
            encoding=encoding,
            compression=compression,
            base_fingerprint=base_print.value,
            result_fingerprint=tuned_print.value,
            result_dtype=main_dtype(tuned_print.tensors),
            tensors=entries,
            files=files,
            stats=DenseStats(
                identical=len(tuned_print.tensors) - len(changed),
                changed_bytes=sum(
                    tensor_nbytes(tuned_print.tensors[name].dtype, tuned_print.tensors[name].shape)
                    for name in changed
                ),
                stored_bytes=(temp / WEIGHTS_FILE).stat().st_size,
            ),
        )
        (temp / CONFIG_FILE).write_text(json.dumps(params.to_json_obj(), indent=1, sort_keys=True) + "\n")
        return params

    params = write_atomically(output, write)
    return DiffResult(output, params, skipped)


def _nbytes(info: TensorInfo) -> int:
    return tensor_nbytes(info.dtype, info.shape)


def _write_delta_weights(
    base: str | os.PathLike[str],
    tuned: str | os.PathLike[str],
    changed: list[str],
    base_tensors: Mapping[str, TensorInfo],
    temp: Path,
    encoding: Encoding,
    compression: Compression,
) -> dict[str, DenseEntry]:
    entries: dict[str, DenseEntry] = {}
    with _tensor_reader(base) as read_base, _tensor_reader(tuned) as read_tuned:
        with StreamingSafetensorsWriter(temp / WEIGHTS_FILE) as writer:
            store = functools.partial(_store, writer, compression=compression)
            for name in sorted(changed):
                new = read_tuned(name)
                old_info = base_tensors.get(name)
                old = read_base(name) if old_info is not None and _same_layout(old_info, new) else None
                entries[name] = _encode_entry(name, old_info, old, new, encoding, store)
    return entries


def _same_layout(info: TensorInfo, tensor: torch.Tensor) -> bool:
    dtype = safetensors_dtype(tensor.dtype)
    return info.dtype == dtype and info.shape == tuple(tensor.shape) and dtype in FLOAT_BITS


def _encode_entry(
    name: str,
    old_info: TensorInfo | None,
    old: torch.Tensor | None,
    new: torch.Tensor,
    encoding: str,
    store: Any,
) -> DenseEntry:
    dtype, shape = safetensors_dtype(new.dtype), tuple(new.shape)
    base_layout: dict[str, Any] = (
        {"base_dtype": old_info.dtype, "base_shape": old_info.shape} if old_info is not None else {}
    )
    if old is None:
        return DenseEntry(
            op="replace", dtype=dtype, shape=shape, data=store(f"replace/{name}", new), **base_layout
        )
    if encoding == "xor":
        bits = torch.bitwise_xor(_bits(new), _bits(old))
        return DenseEntry(op="xor", dtype=dtype, shape=shape, data=store(f"xor/{name}", bits), **base_layout)
    delta, fix_index = _add_delta(old, new)
    fixed = bool(fix_index.numel())
    return DenseEntry(
        op="add",
        dtype=dtype,
        shape=shape,
        data=store(f"add/{name}", delta),
        fix_index=store(f"fix_index/{name}", fix_index) if fixed else None,
        fix_value=store(f"fix_value/{name}", new.reshape(-1)[fix_index]) if fixed else None,
        **base_layout,
    )


def _add_delta(old: torch.Tensor, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``new - old`` in fp32 (fp64 for fp64), and the flat indices where ``old + delta``, rounded once to
    the dtype as the apply does it, does not give ``new`` back bit for bit."""
    compute = torch_dtype(add_dtype(safetensors_dtype(new.dtype)))
    delta = new.to(compute) - old.to(compute)
    back = (old.to(compute) + delta).to(new.dtype)
    wrong = torch.ne(_bits(back), _bits(new)).reshape(-1)
    return delta, wrong.nonzero().reshape(-1).to(torch.int64)


def _store(writer: StreamingSafetensorsWriter, key: str, tensor: torch.Tensor, *, compression: str) -> Stored:
    """Write one tensor to the delta file, compressed when that makes it smaller."""
    dtype, shape = safetensors_dtype(tensor.dtype), tuple(tensor.shape)
    raw = _raw(tensor)
    if compression == "zstd" and len(raw):
        packed = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(_planes(raw, SAFETENSORS_DTYPES[dtype]))
        if len(packed) < len(raw):
            writer.add(key, "U8", (len(packed),), packed)
            return Stored(key=key, dtype=dtype, shape=shape, codec="zstd-planes")
    writer.add(key, dtype, shape, raw)
    return Stored(key=key, dtype=dtype, shape=shape, codec="raw")


def _changed_files(base: Path, tuned: Path) -> tuple[list[Path], list[str]]:
    """TUNED's top-level non-weight files that BASE lacks or holds with other bytes, and the names of those
    a version cannot carry (skipped, reported)."""
    if not tuned.is_dir():
        return [], []
    changed, skipped = [], []
    for path in overlay_candidates(tuned):
        counterpart = base / path.name if base.is_dir() else None
        if counterpart is not None and counterpart.is_file() and _same_bytes(path, counterpart):
            continue
        try:
            check_file_path(f"{FILES_FOLDER}/{path.name}")
        except ValueError:
            skipped.append(path.name)
            continue
        changed.append(path)
    return changed, skipped


def _same_bytes(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            chunk = fa.read(COPY_CHUNK)
            if chunk != fb.read(COPY_CHUNK):
                return False
            if not chunk:
                return True


def _copy_overlays(paths: list[Path], temp: Path) -> list[str]:
    if not paths:
        return []
    (temp / FILES_FOLDER).mkdir()
    for path in paths:
        shutil.copyfile(path, temp / FILES_FOLDER / path.name)
    return sorted(f"{FILES_FOLDER}/{path.name}" for path in paths)


@contextmanager
def _tensor_reader(model: str | os.PathLike[str]) -> Iterator[Any]:
    """A function reading one tensor of a model (any of its shards) by name."""
    with ExitStack() as stack:
        owners = {}
        for path in find_weight_files(model):
            handle = stack.enter_context(safe_open(path, framework="pt"))
            owners.update(dict.fromkeys(read_header_file(path).tensors, handle))
        yield lambda name: owners[name].get_tensor(name)


class StreamingSafetensorsWriter:
    """Writes a safetensors file whose tensors arrive one at a time.

    ``safetensors.torch.save_file`` needs every tensor in memory at once; here each tensor's bytes go to a
    spill file as they come, and ``close`` writes the header (whose offsets need every size) and then the
    data, so memory stays near one tensor.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._spill_path = path.with_name(path.name + ".data")
        self._spill: BinaryIO = open(self._spill_path, "w+b")  # noqa: SIM115 (closed in close)
        self._layout: dict[str, tuple[str, tuple[int, ...]]] = {}

    def add(self, key: str, dtype: str, shape: tuple[int, ...], data: Any) -> None:
        if key in self._layout:
            raise ValueError(f"tensor {key!r} written twice")
        self._spill.write(data)
        self._layout[key] = (dtype, shape)

    def close(self) -> None:
        # The spill's pages were just written, so reading them back costs no new memory; the file itself
        # goes to the disk with O_DIRECT where it can (see OutputFile), not into more page-cache pages.
        try:
            self._spill.flush()
            with OutputFile(self.path) as out:
                out.write(memoryview(encode_header((key, *spec) for key, spec in self._layout.items())))
                out.copy_from(self._spill.fileno(), 0, self._spill.tell())
        finally:
            self._spill.close()
            self._spill_path.unlink()

    def __enter__(self) -> StreamingSafetensorsWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self._spill.close()
            self._spill_path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------
# Decoding and applying


def decode(handle: Any, stored: Stored) -> torch.Tensor:
    """A stored tensor of an open ``delta.safetensors`` (``safe_open``), decoded and checked.

    Raises:
        InvalidDelta: compressed bytes that do not decode to exactly the size the params declare (a frame
            declaring any other size is refused before anything is decompressed).
    """
    tensor = handle.get_tensor(stored.key)
    if stored.codec == "raw":
        raw_tensor: torch.Tensor = tensor  # dtype and shape were checked against the header
        return raw_tensor
    frame = tensor.numpy().tobytes()
    expected = stored.nbytes
    try:
        declared = zstandard.frame_content_size(frame)
        if declared != expected:
            raise InvalidDelta(
                f"{stored.key}: the compressed tensor declares {declared} bytes, expected {expected}"
            )
        raw = zstandard.ZstdDecompressor().decompress(frame, max_output_size=expected) if expected else b""
    except zstandard.ZstdError as exc:
        raise InvalidDelta(f"{stored.key}: the compressed tensor does not decode ({exc})") from None
    if len(raw) != expected:
        raise InvalidDelta(f"{stored.key}: decoded {len(raw)} bytes, expected {expected}")
    flat = _unplanes(raw, SAFETENSORS_DTYPES[stored.dtype])
    return torch.from_numpy(flat).view(torch_dtype(stored.dtype)).reshape(stored.shape)


def apply_entry(
    weight: torch.Tensor | None, entry: DenseEntry, tensors: tuple[torch.Tensor, ...]
) -> torch.Tensor:
    """The tuned tensor from the base one: in place when the layout is unchanged, else a new tensor."""
    if entry.op == "replace":
        if weight is None or entry.changes_layout:
            return tensors[0]
        return weight.copy_(tensors[0])
    assert weight is not None  # add and xor entries are checked to have a base tensor of the same layout
    if entry.op == "xor":
        _bits(weight).bitwise_xor_(tensors[0])  # the stored bits are already integers of the same width
        return weight
    delta = tensors[0]
    if weight.dtype == delta.dtype:
        weight.add_(delta)
    else:
        weight.copy_(delta.add_(weight))  # f32(W) + delta, rounded once to W's dtype
    if len(tensors) == 3:
        weight.view(-1)[tensors[1]] = tensors[2]
    return weight


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(torch_dtype(FLOAT_BITS[safetensors_dtype(tensor.dtype)]))


def _raw(tensor: torch.Tensor) -> memoryview:
    data: memoryview = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data
    return data


def _planes(raw: memoryview, itemsize: int) -> bytes:
    """The bytes of ``raw`` reordered plane by plane: every element's byte 0, then every byte 1, ..."""
    if itemsize == 1:
        return bytes(raw)
    return np.frombuffer(raw, dtype=np.uint8).reshape(-1, itemsize).T.tobytes()


def _unplanes(raw: bytes, itemsize: int) -> np.ndarray[Any, Any]:
    data = np.frombuffer(raw, dtype=np.uint8)
    if itemsize == 1:
        return data.copy()
    return np.ascontiguousarray(data.reshape(itemsize, -1).T).reshape(-1)


@functools.cache
def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name (``InvalidDelta`` if this torch has none)."""
    for value in vars(torch).values():
        if isinstance(value, torch.dtype):
            try:
                if safetensors_dtype(value) == name:
                    return value
            except InvalidModel:
                continue
    raise InvalidDelta(f"dtype {name} has no torch equivalent here")
