"""Safetensors header validation and model file discovery (deltareg.client.weights)."""

from __future__ import annotations

import json
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from deltareg.client.errors import InvalidModel, InvalidSafetensors, UnsafeFile
from deltareg.client.weights import (
    MAX_HEADER_BYTES,
    SAFETENSORS_DTYPES,
    TensorEntry,
    find_weight_files,
    read_header,
    read_header_file,
    validate_safetensors_file,
)

# --------------------------------------------------------------------------------------------------
# Helpers: build safetensors bytes by hand, so every rule can be broken on purpose.


def raw_file(
    header: dict[str, Any] | str | bytes, data: bytes = b"", *, header_len: int | None = None
) -> bytes:
    """8-byte length + header + data; ``header_len`` overrides the length field."""
    if isinstance(header, dict):
        header = json.dumps(header)
    encoded = header.encode() if isinstance(header, str) else header
    length = len(encoded) if header_len is None else header_len
    return struct.pack("<Q", length) + encoded + data


def entry(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def two_tensor_header() -> dict[str, Any]:
    """A valid header: "a" F32 [2] at [0, 8) and "b" I16 [3] at [8, 14)."""
    return {"a": entry("F32", [2], 0, 8), "b": entry("I16", [3], 8, 14), "__metadata__": {"format": "pt"}}


def parse(blob: bytes, **kwargs: Any) -> Any:
    def read_at(offset: int, length: int) -> bytes:
        return blob[offset : offset + length]

    return read_header(read_at, len(blob), source="test.safetensors", **kwargs)


def refused(blob: bytes, *fragments: str, **kwargs: Any) -> str:
    """Parse ``blob``, expect InvalidSafetensors, check the message has every fragment, return it."""
    with pytest.raises(InvalidSafetensors) as caught:
        parse(blob, **kwargs)
    message = str(caught.value)
    assert message.startswith("test.safetensors: ")
    for fragment in fragments:
        assert fragment in message
    return message


VALID = raw_file(two_tensor_header(), bytes(14))


# --------------------------------------------------------------------------------------------------
# Valid files


def test_file_written_by_safetensors_parses_with_exact_entries(tmp_path: Path) -> None:
    tensors = {
        "model.embed.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "model.norm.weight": torch.ones(4, dtype=torch.bfloat16),
        "step": torch.tensor(7, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 5, dtype=torch.float16),
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, path, metadata={"format": "pt", "note": "x"})

    header = read_header_file(path)

    assert header.metadata == {"format": "pt", "note": "x"}
    assert set(header.tensors) == set(tensors)
    blob = path.read_bytes()
    assert header.header_len == struct.unpack("<Q", blob[:8])[0]
    for name, tensor in tensors.items():
        parsed = header.tensors[name]
        assert parsed.name == name
        assert parsed.shape == tuple(tensor.shape)
        assert parsed.nbytes == tensor.numel() * tensor.element_size()
        assert blob[parsed.start : parsed.end] == tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
    dtypes = {n: e.dtype for n, e in header.tensors.items()}
    assert dtypes == {
        "model.embed.weight": "F32",
        "model.norm.weight": "BF16",
        "step": "I64",
        "mask": "BOOL",
        "empty": "F16",
    }
    starts = [e.start for e in header.tensors.values()]
    assert starts == sorted(starts)  # file order
    assert validate_safetensors_file(path) == header


def test_entries_are_absolute_and_in_offset_order() -> None:
    # "b" comes first in the JSON but second in the data area.
    header = {"b": entry("I16", [3], 8, 14), "a": entry("F32", [2], 0, 8)}
    blob = raw_file(header, bytes(14))
    parsed = parse(blob)
    data_start = 8 + parsed.header_len
    assert list(parsed.tensors) == ["a", "b"]
    assert parsed.tensors["a"] == TensorEntry("a", "F32", (2,), data_start, data_start + 8)
    assert parsed.tensors["b"] == TensorEntry("b", "I16", (3,), data_start + 8, data_start + 14)
    assert parsed.metadata == {}


def test_header_padding_and_empty_tensors_are_accepted() -> None:
    header = json.dumps({"z": entry("F32", [0], 0, 0), "a": entry("U8", [2], 0, 2)}) + "   "
    parsed = parse(raw_file(header, b"\x01\x02"))
    assert [e.nbytes for e in parsed.tensors.values()] == [0, 2]


def test_file_with_no_tensors_is_valid() -> None:
    assert parse(raw_file({"__metadata__": {"k": "v"}})).tensors == {}


def test_every_dtype_item_size_is_checked() -> None:
    for dtype, size in SAFETENSORS_DTYPES.items():
        assert (
            parse(raw_file({"t": entry(dtype, [3], 0, 3 * size)}, bytes(3 * size))).tensors["t"].dtype
            == dtype
        )
    for name in ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64", "BOOL"):
        assert name in SAFETENSORS_DTYPES
    assert SAFETENSORS_DTYPES["F8_E4M3"] == SAFETENSORS_DTYPES["F8_E5M2"] == 1


# --------------------------------------------------------------------------------------------------
# Length field


def test_file_shorter_than_8_bytes() -> None:
    refused(b"\x05\x00\x00", "3 bytes", "too short")


def test_truncated_data_area() -> None:
    refused(VALID[:-3], "truncated")


def test_header_length_beyond_the_file() -> None:
    blob = raw_file(two_tensor_header(), bytes(14), header_len=5000)
    refused(blob, f"header length 5000 is beyond the file ({len(blob)} bytes)")


def test_header_length_over_the_limit() -> None:
    refused(VALID, "over the limit of 16", max_header_bytes=16)
    assert MAX_HEADER_BYTES == 100 * 1024 * 1024
    huge = struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}"
    refused(huge, f"header length {MAX_HEADER_BYTES + 1} is over the limit")


def test_header_length_zero() -> None:
    refused(raw_file(b"", bytes(8), header_len=0), "header length is 0")


# --------------------------------------------------------------------------------------------------
# Not safetensors at all


def test_real_pickle_renamed_to_safetensors_is_recognised(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(pickle.dumps({"weight": [1.0, 2.0, 3.0]}, protocol=4))  # created, never loaded
    with pytest.raises(InvalidSafetensors) as caught:
        read_header_file(path)
    message = str(caught.value)
    assert str(path) in message
    assert "does not look like safetensors" in message
    assert "pickle" in message
    assert "convert the weights to safetensors" in message


def test_torch_zip_checkpoint_is_recognised() -> None:
    import io

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", b"not really")
    refused(buffer.getvalue(), "does not look like safetensors", "zip archive")


def test_header_not_starting_with_brace() -> None:
    refused(raw_file(' {"a": 1}'), "does not start with '{'")
    refused(raw_file("[1, 2]"), "does not start with '{'")


def test_header_not_json() -> None:
    refused(raw_file("{not json}"), "not valid JSON")
    refused(raw_file('{"a": NaN}'), "not valid JSON")


def test_header_not_utf8() -> None:
    refused(raw_file(b'{"\xff\xfe": 1}'), "not valid UTF-8")


def test_duplicate_keys_are_refused() -> None:
    first, second = json.dumps(entry("U8", [1], 0, 1)), json.dumps(entry("U8", [1], 1, 2))
    text = f'{{"a": {first}, "a": {second}}}'
    refused(raw_file(text, bytes(2)), "the key 'a' twice")
    inner = '{"a": {"dtype": "U8", "dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}'
    refused(raw_file(inner, bytes(1)), "the key 'dtype' twice")


# --------------------------------------------------------------------------------------------------
# Entries


def test_unknown_dtype() -> None:
    refused(raw_file({"a": entry("F128", [1], 0, 16)}, bytes(16)), "tensor 'a'", "unknown dtype 'F128'")
    refused(raw_file({"a": entry(["F32"], [1], 0, 4)}, bytes(4)), "unknown dtype")  # type: ignore[arg-type]


def test_sub_byte_dtype_is_refused_clearly() -> None:
    refused(raw_file({"a": entry("F4", [2, 4], 0, 4)}, bytes(4)), "sub-byte dtype F4")


def test_byte_size_not_matching_dtype_and_shape() -> None:
    refused(raw_file({"a": entry("F32", [2, 3], 0, 20)}, bytes(20)), "span 20 bytes", "needs 24")
    refused(raw_file({"a": entry("F32", [2, 3], 0, 28)}, bytes(28)), "span 28 bytes", "needs 24")
    refused(raw_file({"a": entry("BF16", [], 0, 4)}, bytes(4)), "span 4 bytes", "needs 2")


@pytest.mark.parametrize(
    ("shape", "offsets"),
    [
        ([-1], [0, 0]),
        ([True], [0, 4]),
        ([1.0], [0, 4]),
        ("2", [0, 8]),
        ([2], [0, 4, 8]),
        ([2], [8, 0]),
        ([2], [0.0, 8]),
    ],
)
def test_malformed_shape_or_offsets(shape: Any, offsets: Any) -> None:
    header = {"a": {"dtype": "F32", "shape": shape, "data_offsets": offsets}}
    refused(raw_file(header, bytes(8)), "tensor 'a'")


def test_entry_keys() -> None:
    refused(raw_file({"a": {"dtype": "U8", "shape": [1]}}, bytes(1)), "lacks ['data_offsets']")
    extra = {"a": {**entry("U8", [1], 0, 1), "offset": 3}}
    refused(raw_file(extra, bytes(1)), "unknown keys ['offset']")
    refused(raw_file({"a": [1, 2]}, bytes(1)), "entry must be an object")


def test_overlapping_offsets() -> None:
    header = {"a": entry("U8", [4], 0, 4), "b": entry("U8", [4], 2, 6)}
    refused(raw_file(header, bytes(6)), "tensor 'b' overlaps tensor 'a'")


def test_gap_between_tensors() -> None:
    header = {"a": entry("U8", [4], 0, 4), "b": entry("U8", [4], 6, 10)}
    refused(raw_file(header, bytes(10)), "gap of 2 bytes after tensor 'a'")


def test_gap_at_the_start() -> None:
    refused(raw_file({"a": entry("U8", [4], 2, 6)}, bytes(6)), "gap of 2 bytes at the start")


def test_bytes_after_the_last_tensor() -> None:
    refused(raw_file(two_tensor_header(), bytes(15)), "1 bytes after the last tensor")


def test_no_tensors_but_data() -> None:
    refused(raw_file({}, bytes(4)), "4 bytes after the last tensor")


@pytest.mark.parametrize("char", ["\t", "\n", "\r", "\x00", "\x1b", "\x7f", "\x85", "\x9f"])
def test_control_character_in_a_name(char: str) -> None:
    name = f"layer{char}weight"
    message = refused(raw_file({name: entry("U8", [1], 0, 1)}, bytes(1)), "control character")
    assert f"U+{ord(char):04X}" in message


def test_empty_long_and_invalid_unicode_names() -> None:
    refused(raw_file({"": entry("U8", [1], 0, 1)}, bytes(1)), "empty name")
    refused(raw_file({"x" * 1025: entry("U8", [1], 0, 1)}, bytes(1)), "1025 characters")
    assert parse(raw_file({"x" * 1024: entry("U8", [1], 0, 1)}, bytes(1)))
    refused(
        raw_file('{"a\\ud800": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}', bytes(1)), "Unicode"
    )
    assert parse(raw_file({"módulo.权重": entry("U8", [1], 0, 1)}, bytes(1)))


@pytest.mark.parametrize(
    ("metadata", "fragment"),
    [
        ([1], "must be an object of strings"),
        ({"k": 1}, "__metadata__['k'] must be a string"),
        (None, "not null"),
    ],
)
def test_metadata_must_map_strings_to_strings(metadata: Any, fragment: str) -> None:
    refused(raw_file({"__metadata__": metadata}), fragment)


def test_short_read_is_reported() -> None:
    def read_at(offset: int, length: int) -> bytes:
        return (
            VALID[offset : offset + length][: max(0, length - 1)]
            if offset == 8
            else VALID[offset : offset + length]
        )

    with pytest.raises(InvalidSafetensors, match="could read only"):
        read_header(read_at, len(VALID))


def test_missing_file_is_invalid_safetensors(tmp_path: Path) -> None:
    with pytest.raises(InvalidSafetensors, match="cannot read"):
        read_header_file(tmp_path / "absent.safetensors")


MUTATION = st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255))


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutations=st.lists(MUTATION, max_size=6), cut=st.integers(0, len(VALID)), insert=st.binary(max_size=4))
def test_mutated_files_only_ever_raise_invalid_safetensors(
    mutations: list[tuple[int, int]], cut: int, insert: bytes
) -> None:
    blob = bytearray(VALID)
    for position, value in mutations:
        blob[position] = value
    mutated = bytes(blob[:cut]) + insert + bytes(blob[cut:]) if insert else bytes(blob[: max(cut, 8)])
    try:
        header = parse(mutated)
    except InvalidSafetensors:
        return
    # Whatever passed must still describe a file that tiles exactly.
    covered = sum(e.nbytes for e in header.tensors.values())
    assert 8 + header.header_len + covered == len(mutated)


# --------------------------------------------------------------------------------------------------
# find_weight_files


def save(path: Path, **tensors: torch.Tensor) -> Path:
    save_file(tensors, path)
    return path


def write_index(folder: Path, weight_map: dict[str, str], name: str = "model.safetensors.index.json") -> Path:
    index = folder / name
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return index


def test_single_file(tmp_path: Path) -> None:
    path = save(tmp_path / "model.safetensors", a=torch.zeros(2))
    assert find_weight_files(path) == [path]
    assert find_weight_files(str(path)) == [path]


def test_folder_without_index_takes_all_top_level_safetensors_sorted(tmp_path: Path) -> None:
    b = save(tmp_path / "b.safetensors", b=torch.zeros(2))
    a = save(tmp_path / "a.safetensors", a=torch.zeros(2))
    save(tmp_path / ".hidden.safetensors", h=torch.zeros(2))
    (tmp_path / "sub").mkdir()
    save(tmp_path / "sub" / "c.safetensors", c=torch.zeros(2))
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "old.bin").write_bytes(b"\x80\x04")  # a pickle beside safetensors is simply ignored
    assert find_weight_files(tmp_path) == [a, b]


def test_folder_with_index_uses_exactly_the_files_it_names(tmp_path: Path) -> None:
    one = save(tmp_path / "model-00001-of-00002.safetensors", a=torch.zeros(2), b=torch.zeros(1))
    two = save(tmp_path / "model-00002-of-00002.safetensors", c=torch.zeros(3))
    save(tmp_path / "stray.safetensors", d=torch.zeros(1))
    write_index(tmp_path, {"a": one.name, "b": one.name, "c": two.name})
    assert find_weight_files(tmp_path) == [one, two]
    assert find_weight_files(tmp_path / "model.safetensors.index.json") == [one, two]


def test_index_naming_a_missing_file(tmp_path: Path) -> None:
    save(tmp_path / "one.safetensors", a=torch.zeros(2))
    write_index(tmp_path, {"a": "one.safetensors", "b": "two.safetensors"})
    with pytest.raises(InvalidModel, match="two.safetensors, which does not exist"):
        find_weight_files(tmp_path)


def test_index_naming_a_tensor_its_file_lacks(tmp_path: Path) -> None:
    save(tmp_path / "one.safetensors", a=torch.zeros(2))
    write_index(tmp_path, {"a": "one.safetensors", "ghost": "one.safetensors"})
    with pytest.raises(InvalidModel, match="'ghost' in one.safetensors, which does not contain it"):
        find_weight_files(tmp_path)


@pytest.mark.parametrize("bad", ["../outside.safetensors", "/etc/passwd", "notes.txt"])
def test_index_may_only_name_safetensors_inside_the_folder(tmp_path: Path, bad: str) -> None:
    model = tmp_path / "model"
    model.mkdir()
    save(tmp_path / "outside.safetensors", a=torch.zeros(2))
    write_index(model, {"a": bad})
    with pytest.raises(InvalidModel, match="not a .safetensors file in the folder"):
        find_weight_files(model)


@pytest.mark.parametrize("content", ["not json", "[]", '{"weight_map": {}}', '{"weight_map": {"a": 3}}'])
def test_malformed_index(tmp_path: Path, content: str) -> None:
    (tmp_path / "model.safetensors.index.json").write_text(content)
    with pytest.raises(InvalidModel, match="model.safetensors.index.json"):
        find_weight_files(tmp_path)


def test_index_with_a_bad_shard_reports_the_shard(tmp_path: Path) -> None:
    (tmp_path / "one.safetensors").write_bytes(pickle.dumps({"a": 1}))
    write_index(tmp_path, {"a": "one.safetensors"})
    with pytest.raises(InvalidSafetensors, match="pickle"):
        find_weight_files(tmp_path)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "model.pth", "model.ckpt", "weights.pkl"])
def test_pickle_only_folder_is_refused(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(pickle.dumps({"w": [1.0]}))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UnsafeFile) as caught:
        find_weight_files(tmp_path)
    assert "refusing to read pickle weights" in str(caught.value)
    assert name in str(caught.value)
    assert "convert to safetensors" in str(caught.value)
    with pytest.raises(UnsafeFile):
        find_weight_files(tmp_path / name)


def test_folder_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(InvalidModel, match="no weights found"):
        find_weight_files(tmp_path)


def test_missing_path_and_other_files(tmp_path: Path) -> None:
    with pytest.raises(InvalidModel, match="no such file or folder"):
        find_weight_files(tmp_path / "nope")
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(InvalidModel, match="not a .safetensors file"):
        find_weight_files(tmp_path / "weights.txt")


def test_several_indexes_prefer_model_index(tmp_path: Path) -> None:
    one = save(tmp_path / "one.safetensors", a=torch.zeros(2))
    two = save(tmp_path / "two.safetensors", b=torch.zeros(2))
    write_index(tmp_path, {"a": one.name})
    write_index(tmp_path, {"b": two.name}, name="other.safetensors.index.json")
    assert find_weight_files(tmp_path) == [one]
    (tmp_path / "model.safetensors.index.json").unlink()
    write_index(tmp_path, {"a": one.name}, name="third.safetensors.index.json")
    with pytest.raises(InvalidModel, match="several safetensors indexes"):
        find_weight_files(tmp_path)
