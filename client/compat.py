"""The base model's configuration: recorded at push, compared at apply.

Two models can hold identical weights and still differ where it matters (another architecture class, another
vocabulary, another rope_theta): a delta made for one is then wrong on the other even though every tensor
fits. So push records what the base's ``config.json`` says (architecture, model type, vocabulary size and a
digest of the whole file) and apply compares it with the base it is given, reporting every difference at
once together with the tensor problems.

The digest is over the config without the keys that change with tooling rather than with the model
(``transformers_version``, the dtype, the local path) and without null values, in RFC 8785 canonical form,
so re-saving the same model with another transformers version keeps it. In memory only the architecture,
model type and vocabulary size are compared (a loaded config's ``to_dict`` holds defaults that the file
leaves out, so its digest would differ); a base given as a single ``.safetensors`` file has no config.json
to compare, so only its tensors are checked.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import rfc8785

from deltareg.client.errors import InvalidModel
from deltareg.client.jsonfile import read_json_object
from deltareg.client.manifest import BaseConfig, digest_of_json

CONFIG_FILE = "config.json"
MAX_CONFIG_BYTES = 1 << 20
VOLATILE_KEYS = frozenset({"transformers_version", "_name_or_path", "_commit_hash", "dtype", "torch_dtype"})


def read_base_config(model: str | os.PathLike[str]) -> BaseConfig | None:
    """What a model folder's config.json says; None for a single weights file or a folder without one.

    Raises:
        InvalidModel: config.json is too large, not JSON, or not an object.
    """
    path = Path(model) / CONFIG_FILE
    if not Path(model).is_dir() or not path.is_file():
        return None
    return describe_config(read_json_object(path, MAX_CONFIG_BYTES, InvalidModel), source=str(path))


def describe_config(config: Mapping[str, Any], *, source: str = "config") -> BaseConfig:
    architectures = config.get("architectures")
    names = architectures if isinstance(architectures, list) else []
    model_type = config.get("model_type")
    try:
        digest = digest_of_json(normalized(config))
    except rfc8785.CanonicalizationError as exc:
        raise InvalidModel(f"{source}: cannot be put in canonical form ({exc})") from None
    return BaseConfig(
        architecture=",".join(str(n) for n in names)[:256] or None,
        model_type=model_type[:256] if isinstance(model_type, str) else None,
        vocab_size=_vocab_size(config),
        digest=digest,
    )


def normalized(config: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in config.items() if key not in VOLATILE_KEYS and value is not None}


def module_config(module: Any) -> BaseConfig | None:
    """The architecture, model type and vocabulary size of a loaded transformers model (None otherwise);
    its digest is not comparable with a file's and is left as the digest of nothing."""
    config = getattr(module, "config", None)
    to_dict = getattr(config, "to_dict", None)
    if not callable(to_dict):
        return None
    values = to_dict()
    if not isinstance(values, dict):
        return None
    described = describe_config({k: v for k, v in values.items() if k in ("architectures", "model_type")})
    architecture = described.architecture or type(module).__name__
    return described.model_copy(update={"architecture": architecture, "vocab_size": _vocab_size(values)})


def _vocab_size(config: Mapping[str, Any]) -> int | None:
    vocab = config.get("vocab_size")
    if vocab is None and isinstance(config.get("text_config"), dict):
        vocab = config["text_config"].get("vocab_size")  # multimodal configs nest the language model's
    return vocab if type(vocab) is int and vocab >= 0 else None


def config_problems(
    recorded: BaseConfig | None, actual: BaseConfig | None, *, compare_digest: bool
) -> list[str]:
    """How ``actual`` differs from what the version recorded; nothing to compare when either is unknown."""
    if recorded is None or actual is None:
        return []
    problems = [
        f"the base's {label} is {have!r}, the delta was made for {want!r}"
        for label, want, have in (
            ("architecture", recorded.architecture, actual.architecture),
            ("model_type", recorded.model_type, actual.model_type),
            ("vocab_size", recorded.vocab_size, actual.vocab_size),
        )
        if want is not None and have != want
    ]
    if compare_digest and not problems and recorded.digest != actual.digest:
        problems.append(
            f"the base's {CONFIG_FILE} differs from the one the delta was made with (digest {actual.digest}, "
            f"recorded {recorded.digest}): same architecture and vocabulary, other settings"
        )
    return problems
