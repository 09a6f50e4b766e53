"""Bounded fuzzing of the parsers that read untrusted input (issue 6, item 4).

Each parser either returns or raises its own ``DeltaregError`` subclass (which the server turns into a
4xx and the CLI into exit 1); any other exception (KeyError, TypeError, OverflowError, RecursionError...)
escaping is a bug. Inputs are structured, not only random bytes: valid headers, manifests and params
with one part mutated, random JSON values in every field, and the hostile cases that found real bugs
(non-ASCII digits, huge integers, deep nesting).

Reproducible and bounded: derandomized, no example database, a fixed number of examples per test.
"""

from __future__ import annotations

import base64
import json
import math
import struct
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from deltareg.client import dense, lora
from deltareg.client.errors import (
    DeltaregError,
    InvalidDelta,
    InvalidInput,
    InvalidManifest,
    InvalidName,
    InvalidReference,
    InvalidSafetensors,
)
from deltareg.client.manifest import Manifest
from deltareg.client.refs import Reference, RepoName
from deltareg.client.signing import PublicKey, SigningKey, decode_base64, trusted_signer
from deltareg.client.weights import SAFETENSORS_DTYPES, encode_header, read_header

FUZZ = settings(
    max_examples=150,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
DEEP = 50_000  # nesting far beyond Python's recursion limit

# ---------------------------------------------------------------------------------------------------
# Strategies


def json_values(max_leaves: int = 12) -> st.SearchStrategy[Any]:
    """What json.loads can give: null, booleans, any-size integers, floats (NaN and infinities
    included: Python's json accepts them), text (lone surrogates included: "\\ud800" is valid JSON)."""
    scalars = (
        st.none()
        | st.booleans()
        | st.integers()
        | st.sampled_from([2**53 + 1, -(2**63), 2**64, 10**400])
        | st.floats()
        | st.text(max_size=20)
    )
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
        max_leaves=max_leaves,
    )


def deep(depth: int = DEEP) -> Any:
    """A JSON value nested ``depth`` lists deep, built without recursion."""
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


@st.composite
def mutated(draw: st.DrawFn, original: Any) -> Any:
    """``original`` (JSON) with one value somewhere inside replaced, removed, or given a new sibling."""
    value = json.loads(json.dumps(original))  # a private deep copy
    parent: Any = None
    key: Any = None
    node = value
    while isinstance(node, (dict, list)) and node and draw(st.booleans()):
        parent, key = (
            node,
            draw(st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node)))),
        )
        node = node[key]
    action = draw(st.sampled_from(["replace", "remove", "add"]))
    if parent is None:
        return draw(json_values()) if action == "replace" else value
    if action == "replace":
        parent[key] = draw(json_values())
    elif action == "remove":
        del parent[key]
    elif isinstance(parent, dict):
        parent[draw(st.text(max_size=12))] = draw(json_values())
    else:
        parent.append(draw(json_values()))
    return value


def refused_with(error: type[DeltaregError], parse: Callable[..., Any], *args: Any) -> Any:
    """``parse(*args)``, or None when it refused with ``error`` (a clear message); anything else fails."""
    try:
        return parse(*args)
    except error as exc:
        assert exc.message, f"{type(exc).__name__} without a message"
        return None


# ---------------------------------------------------------------------------------------------------
# Safetensors headers

TENSOR_NAMES = st.text(st.characters(codec="utf-8", exclude_categories=["Cc"]), min_size=1, max_size=20)


@st.composite
def tensor_lists(draw: st.DrawFn) -> list[tuple[str, str, tuple[int, ...]]]:
    names = draw(st.lists(TENSOR_NAMES, max_size=5, unique=True).filter(lambda n: "__metadata__" not in n))
    dtypes = st.sampled_from(sorted(SAFETENSORS_DTYPES))
    shapes = st.lists(st.integers(0, 4), max_size=3).map(tuple)
    return [(name, draw(dtypes), draw(shapes)) for name in names]


def safetensors_file(tensors: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]) -> bytes:
    header = encode_header(tensors, metadata)
    data_size = sum(math.prod(shape) * SAFETENSORS_DTYPES[dtype] for _, dtype, shape in tensors)
    return header + bytes(data_size)


def read_bytes(data: bytes, file_size: int | None = None) -> Any:
    def read_at(offset: int, length: int) -> bytes:
        return data[offset : offset + length]

    size = len(data) if file_size is None else file_size
    return refused_with(InvalidSafetensors, read_header, read_at, size)


def with_header(header: Any, data_size: int = 0) -> bytes:
    raw = json.dumps(header).encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(raw)) + raw + bytes(data_size)


@FUZZ
@given(tensor_lists(), st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=2))
def test_valid_safetensors_headers_parse_back(tensors: Any, metadata: dict[str, str]) -> None:
    header = read_bytes(safetensors_file(tensors, metadata))
    assert header is not None
    assert {name: (e.dtype, e.shape) for name, e in header.tensors.items()} == {
        name: (dtype, shape) for name, dtype, shape in tensors
    }
    assert header.metadata == metadata


@FUZZ
@given(st.binary(max_size=300))
@example(b"\x80\x04" + bytes(14))  # a pickle's first bytes
@example(struct.pack("<Q", 2**64 - 1) + b"{}")
@example(struct.pack("<Q", 2) + b"{}")
def test_random_bytes_are_refused_cleanly(data: bytes) -> None:
    read_bytes(data)


@FUZZ
@given(st.data(), tensor_lists())
def test_corrupted_safetensors_files_are_refused_cleanly(data: st.DataObject, tensors: Any) -> None:
    original = bytearray(safetensors_file(tensors, {"format": "pt"}))
    corruption = data.draw(st.sampled_from(["flip", "truncate", "extend", "size"]))
    if corruption == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            original[data.draw(st.integers(0, len(original) - 1))] = data.draw(st.integers(0, 255))
        read_bytes(bytes(original))
    elif corruption == "truncate":
        read_bytes(bytes(original[: data.draw(st.integers(0, len(original)))]))
    elif corruption == "extend":
        read_bytes(bytes(original) + data.draw(st.binary(min_size=1, max_size=16)))
    else:  # the caller's idea of the file size is wrong
        read_bytes(bytes(original), data.draw(st.integers(0, 2 * len(original) + 8)))


@FUZZ
@given(st.data(), tensor_lists())
def test_mutated_headers_are_refused_cleanly(data: st.DataObject, tensors: Any) -> None:
    file = safetensors_file(tensors, {"format": "pt"})
    (header_len,) = struct.unpack("<Q", file[:8])
    header = json.loads(file[8 : 8 + header_len])
    read_bytes(with_header(data.draw(mutated(header)), data.draw(st.integers(0, 64))))


@FUZZ
@given(json_values(max_leaves=30), st.integers(0, 64))
def test_random_json_headers_are_refused_cleanly(header: Any, data_size: int) -> None:
    read_bytes(with_header(header, data_size))


@pytest.mark.parametrize(
    "raw",
    [
        b"{" + b'"a":' * 30_000 + b"1" + b"}" * 30_000,  # deep nesting: RecursionError in json
        b'{"t": ' + b"[" * DEEP + b"]" * DEEP + b"}",
        b'{"t": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}',  # huge int
        b'{"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "t": {}}',  # duplicate key
        b'{"t": NaN}',
        b'{"\\ud800": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',  # lone surrogate
        b'{"__metadata__": {"\\udfff": "x"}}',
    ],
)
def test_hostile_headers_are_refused_cleanly(raw: bytes) -> None:
    assert read_bytes(struct.pack("<Q", len(raw)) + raw + bytes(4)) is None


# ---------------------------------------------------------------------------------------------------
# Manifests

FINGERPRINT = "tmv1:" + "ab" * 32
DIGEST = "sha256:" + "cd" * 32


def valid_manifest() -> dict[str, Any]:
    return {
        "schema": "deltareg.manifest.v1",
        "kind": "lora",
        "files": [
            {"path": "adapter_config.json", "digest": DIGEST, "size": 120},
            {"path": "adapter_model.safetensors", "digest": "sha256:" + "ef" * 32, "size": 4096},
        ],
        "base": {
            "fingerprint": FINGERPRINT,
            "name": "tiny",
            "tensors": {"model.q_proj.weight": "12" * 32},
            "config": {"architecture": "LlamaForCausalLM", "vocab_size": 256, "digest": DIGEST},
        },
        "parent": DIGEST,
        "params": {"rank": 2, "nested": {"list": [1, 2.5, "x", None, True]}},
        "metadata": {"dataset": "d", "steps": 100},
    }


def test_the_valid_manifest_parses() -> None:
    manifest = Manifest.parse(valid_manifest())
    assert Manifest.parse(manifest.to_json_obj()) == manifest
    assert manifest.parent == DIGEST


@FUZZ
@given(st.data())
def test_mutated_manifests_parse_or_are_refused_cleanly(data: st.DataObject) -> None:
    manifest = refused_with(InvalidManifest, Manifest.parse, data.draw(mutated(valid_manifest())))
    if manifest is not None:  # what parses has a digest (the canonical JSON exists)
        assert manifest.digest.startswith("sha256:")


@FUZZ
@given(json_values(max_leaves=30))
def test_random_json_manifests_are_refused_cleanly(value: Any) -> None:
    refused_with(InvalidManifest, Manifest.parse, value)


@pytest.mark.parametrize(
    "field, value",
    [
        ("metadata", {"deep": deep()}),
        ("params", {"deep": deep()}),
        ("metadata", {"big": 10**400}),
        ("metadata", {"text": "lone surrogate \udfff"}),
    ],
)
def test_hostile_manifest_values_are_refused_cleanly(field: str, value: Any) -> None:
    assert refused_with(InvalidManifest, Manifest.parse, {**valid_manifest(), field: value}) is None


@pytest.mark.parametrize("metadata", [{"nan": math.nan}, {"inf": -math.inf}, {"\ud800": "surrogate key"}])
def test_non_json_values_get_a_canonical_form_or_are_refused(metadata: dict[str, Any]) -> None:
    # pydantic's JSON mode writes NaN and infinities as null and replaces a lone surrogate in a key: the
    # manifest that parses is the one whose canonical JSON (hence digest) exists.
    manifest = refused_with(InvalidManifest, Manifest.parse, {**valid_manifest(), "metadata": metadata})
    if manifest is not None:
        assert Manifest.parse(manifest.to_json_obj()).digest == manifest.digest


# ---------------------------------------------------------------------------------------------------
# References and repository names

NAME_PARTS = st.from_regex(r"[a-z0-9][a-z0-9_-]{0,20}", fullmatch=True)
ALIASES = st.from_regex(r"[a-z][a-z0-9_-]{0,20}", fullmatch=True)


@st.composite
def valid_references(draw: st.DrawFn) -> str:
    repo = f"{draw(NAME_PARTS)}/{draw(NAME_PARTS)}"
    target = draw(
        st.sampled_from(["", ":", "@alias", "@digest"]),
    )
    if target == ":":
        return f"{repo}:{draw(st.integers(1, 2**31 - 1))}"
    if target == "@alias":
        return f"{repo}@{draw(ALIASES)}"
    if target == "@digest":
        return f"{repo}@sha256:{draw(st.binary(min_size=32, max_size=32)).hex()}"
    return repo


@FUZZ
@given(valid_references())
def test_valid_references_parse_back(text: str) -> None:
    assert str(Reference.parse(text)) == text


@st.composite
def mangled_references(draw: st.DrawFn) -> str:
    """A valid reference with a few characters replaced, inserted or cut."""
    text = draw(valid_references())
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(text)))
        piece = draw(st.text(max_size=3) | st.sampled_from(["/", ":", "@", "²", "٣", "..", "sha256:"]))
        cut = draw(st.integers(0, 2))
        text = text[:at] + piece + text[at + cut :]
    return text


@FUZZ
@given(mangled_references() | st.text(max_size=80))
@example("ns/name:²")  # str.isdigit() is true for superscripts, int() refuses them
@example("ns/name:٣")  # Arabic-Indic digit: int() takes it, a version number must not
@example("ns/name:" + "9" * 5000)  # beyond int()'s digit limit
@example("ns/name:0")
@example("ns/name@")
@example("/")
def test_references_parse_or_are_refused_cleanly(text: str) -> None:
    reference = refused_with(InvalidInput, Reference.parse, text)
    if reference is not None:
        assert str(reference) == text  # what parses is exactly what was written
        assert text.isascii()


@FUZZ
@given(st.text(max_size=80))
def test_repo_names_parse_or_are_refused_cleanly(text: str) -> None:
    name = refused_with(InvalidName, RepoName.parse, text)
    if name is not None:
        assert str(name) == text


def test_reference_errors_are_typed() -> None:
    with pytest.raises(InvalidReference):
        Reference.parse("ns/name:²")
    with pytest.raises(InvalidName):
        Reference.parse("NS/name")


# ---------------------------------------------------------------------------------------------------
# Dense delta params


def valid_dense_params() -> dict[str, Any]:
    return {
        "format": "deltareg.dense.v1",
        "encoding": "xor",
        "compression": "zstd",
        "weights": "delta.safetensors",
        "base_fingerprint": FINGERPRINT,
        "result_fingerprint": "tmv1:" + "cd" * 32,
        "result_dtype": "BF16",
        "tensors": {
            "model.embed.weight": {
                "op": "xor",
                "dtype": "BF16",
                "shape": [4, 2],
                "base_dtype": "BF16",
                "base_shape": [4, 2],
                "data": {"key": "model.embed.weight", "dtype": "I16", "shape": [4, 2], "codec": "raw"},
            },
            "model.norm.weight": {
                "op": "add",
                "dtype": "F32",
                "shape": [3],
                "base_dtype": "F32",
                "base_shape": [3],
                "data": {"key": "model.norm.weight", "dtype": "F32", "shape": [3], "codec": "zstd-planes"},
                "fix_index": {"key": "fix.i", "dtype": "I64", "shape": [1], "codec": "raw"},
                "fix_value": {"key": "fix.v", "dtype": "F32", "shape": [1], "codec": "raw"},
            },
            "lm_head.bias": {
                "op": "replace",
                "dtype": "F16",
                "shape": [2],
                "data": {"key": "lm_head.bias", "dtype": "F16", "shape": [2], "codec": "raw"},
            },
        },
        "files": ["files/config.json"],
        "stats": {"identical": 1, "changed_bytes": 100, "stored_bytes": 50},
    }


def test_the_valid_dense_params_parse() -> None:
    assert len(dense.targets_from_params(valid_dense_params())) == 3


@FUZZ
@given(st.data())
def test_mutated_dense_params_parse_or_are_refused_cleanly(data: st.DataObject) -> None:
    refused_with(InvalidDelta, dense.targets_from_params, data.draw(mutated(valid_dense_params())))


@FUZZ
@given(json_values(max_leaves=30))
def test_random_dense_params_are_refused_cleanly(value: Any) -> None:
    refused_with(InvalidDelta, dense.DenseParams.parse, value, "fuzz")


def test_deep_dense_params_are_refused_cleanly() -> None:
    assert (
        refused_with(InvalidDelta, dense.targets_from_params, {**valid_dense_params(), "x": deep()}) is None
    )


# ---------------------------------------------------------------------------------------------------
# LoRA params


def valid_lora_params() -> dict[str, Any]:
    return {
        "peft_type": "LORA",
        "use_rslora": False,
        "fan_in_fan_out": False,
        "weights": "adapter_model.safetensors",
        "modules": {
            "model.q_proj": {
                "r": 8,
                "alpha": 16.0,
                "scale": 2.0,
                "base_tensor": "model.q_proj.weight",
                "shape": [64, 64],
                "lora_A": "base_model.model.q_proj.lora_A.weight",
                "lora_B": "base_model.model.q_proj.lora_B.weight",
                "lora_B_bias": "base_model.model.q_proj.lora_B.bias",
                "lora_magnitude_vector": "base_model.model.q_proj.lora_magnitude_vector",
            },
            "model.embed": {
                "r": 4,
                "alpha": 8,
                "scale": 2.0,
                "base_tensor": "model.embed.weight",
                "shape": [256, 64],
                "lora_A": "base_model.model.embed.lora_embedding_A",
                "lora_B": "base_model.model.embed.lora_embedding_B",
                "layer": "embedding",
            },
            "lm_head": {
                "replace": {
                    "lm_head.weight": {
                        "tensor": "lm_head.modules_to_save.weight",
                        "shape": [256, 64],
                        "dtype": "F32",
                    }
                }
            },
        },
    }


def test_the_valid_lora_params_parse() -> None:
    assert len(lora.targets_from_params(valid_lora_params())) == 4


@FUZZ
@given(st.data())
def test_mutated_lora_params_parse_or_are_refused_cleanly(data: st.DataObject) -> None:
    params = data.draw(mutated(valid_lora_params()).filter(lambda p: isinstance(p, dict)))  # a Mapping
    refused_with(InvalidManifest, lora.targets_from_params, params)


@FUZZ
@given(st.dictionaries(st.text(max_size=12), json_values(), max_size=3))
def test_random_lora_module_entries_are_refused_cleanly(entry: dict[str, Any]) -> None:
    params = valid_lora_params()
    params["modules"]["model.q_proj"] = entry
    refused_with(InvalidManifest, lora.targets_from_params, params)


@FUZZ
@given(st.dictionaries(st.text(max_size=12), json_values(), max_size=6))
def test_random_lora_params_are_refused_cleanly(params: dict[str, Any]) -> None:
    refused_with(InvalidManifest, lora.targets_from_params, params)


@pytest.mark.parametrize(
    "field, value",
    [
        ("r", 10**400),  # alpha / r overflows a float
        ("alpha", 10**400),  # math.isfinite overflows
        ("scale", 10**400),
        ("r", True),
        ("alpha", math.nan),
        ("shape", [2**64, 10**400]),
        ("layer", ["embedding"]),  # unhashable where a set lookup happens
        ("replace", {"model.q_proj.weight": {"tensor": "t", "shape": [1], "dtype": ["F32"]}}),
        ("replace", {"model.q_proj.weight": {"tensor": "t", "shape": [1], "dtype": {"F32": 1}}}),
    ],
)
def test_hostile_lora_values_are_refused_cleanly(field: str, value: Any) -> None:
    params = valid_lora_params()
    params["modules"]["model.q_proj"][field] = value
    assert refused_with(InvalidManifest, lora.targets_from_params, params) is None


# ---------------------------------------------------------------------------------------------------
# Signing: public keys and signatures

SIGNER = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
SIGNER_KEY = SigningKey(SIGNER, PublicKey(SIGNER.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)))
KEY_LINE = SIGNER_KEY.public.line()
KEY_PEM = SIGNER.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()


@st.composite
def mangled_keys(draw: st.DrawFn) -> str:
    text = draw(st.sampled_from([KEY_LINE, KEY_LINE + " alice@example", KEY_PEM]))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.text(max_size=3)) + text[at + draw(st.integers(0, 3)) :]
    return text


@FUZZ
@given(mangled_keys() | st.text(max_size=120))
@example(KEY_LINE)
@example(KEY_PEM)
@example("ed25519 " + base64.b64encode(bytes(31)).decode())
@example("-----BEGIN PUBLIC KEY-----\n\u00e9\n-----END PUBLIC KEY-----")
@example("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----")
def test_public_keys_parse_or_are_refused_cleanly(text: str) -> None:
    key = refused_with(InvalidInput, PublicKey.parse, text)
    if text in (KEY_LINE, KEY_PEM):
        assert key == SIGNER_KEY.public


@FUZZ
@given(st.text(max_size=100) | st.binary(max_size=70).map(lambda b: base64.b64encode(b).decode()))
def test_base64_is_decoded_or_refused_cleanly(text: str) -> None:
    raw = refused_with(InvalidInput, decode_base64, text, 32, "the key")
    assert raw is None or len(raw) == 32


@FUZZ
@given(st.text(max_size=80), st.text(max_size=100))
@example(DIGEST, SIGNER_KEY.sign(DIGEST))
def test_signature_checks_answer_yes_or_no(digest: str, signature: str) -> None:
    assert SIGNER_KEY.public.verifies(digest, signature) is (
        digest == DIGEST and signature == SIGNER_KEY.sign(DIGEST)
    )


@FUZZ
@given(
    st.lists(
        st.dictionaries(st.sampled_from(["key_id", "signature", "key_revoked"]), json_values()), max_size=4
    )
)
def test_trusted_signer_never_trusts_garbage(entries: list[dict[str, Any]]) -> None:
    assert trusted_signer(DIGEST, entries, [SIGNER_KEY.public]) is None
