"""Training metadata recorded with a version (datasets, code commit, hyperparameters), checked before a push.

They live in the manifest's ``metadata`` under well-known keys, next to free-form entries:

- ``datasets``: ``[{"name": ..., "revision": ... or null}, ...]``
- ``code_commit``: the commit of the training code
- ``hyperparameters``: ``{name: string, bool, int or finite float}``
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

from deltareg.client.errors import InvalidInput

DATASETS, CODE_COMMIT, HYPERPARAMETERS = "datasets", "code_commit", "hyperparameters"
RESERVED_KEYS = (DATASETS, CODE_COMMIT, HYPERPARAMETERS)
MAX_DATASETS = 64
MAX_HYPERPARAMETERS = 128
MAX_NAME = 256
MAX_KEY = 128
MAX_TEXT_VALUE = 1024
MAX_SAFE_INTEGER = 2**53 - 1  # canonical JSON (RFC 8785) holds integers exactly up to this
# A git commit (abbreviated or full, SHA-1 or SHA-256) or another revision name without spaces.
CODE_COMMIT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/+-]{0,127}")
_PRINTABLE = re.compile(r"[^\x00-\x1f\x7f]+")

Dataset = tuple[str, str | None]
Hyperparameter = str | bool | int | float


def training_metadata(
    metadata: Mapping[str, Any] | None = None,
    *,
    datasets: Iterable[Dataset] | None = None,
    code_commit: str | None = None,
    hyperparameters: Mapping[str, Hyperparameter] | None = None,
) -> dict[str, Any]:
    """The manifest metadata: free-form ``metadata`` plus the well-known keys, each checked.

    Raises:
        InvalidInput: naming the entry that is too long, empty, not finite, or a reserved free-form key.
    """
    result = dict(metadata or {})
    reserved = sorted(key for key in result if key in RESERVED_KEYS)
    if reserved:
        raise InvalidInput(
            f"metadata key {reserved[0]!r} is reserved for structured training metadata; use the "
            "datasets / code_commit / hyperparameters arguments (--dataset, --code-commit, --hparam)"
        )
    if datasets is not None:
        listed = [_dataset(item) for item in datasets]
        if len(listed) > MAX_DATASETS:
            raise InvalidInput(f"at most {MAX_DATASETS} datasets may be recorded, got {len(listed)}")
        if listed:
            result[DATASETS] = listed
    if code_commit is not None:
        if not CODE_COMMIT_PATTERN.fullmatch(code_commit):
            raise InvalidInput(
                f"invalid code commit {code_commit!r}: expected a commit id (letters, digits, '.', '_', "
                "'/', '+', '-', at most 128 characters, no spaces)"
            )
        result[CODE_COMMIT] = code_commit
    if hyperparameters is not None:
        if len(hyperparameters) > MAX_HYPERPARAMETERS:
            raise InvalidInput(
                f"at most {MAX_HYPERPARAMETERS} hyperparameters may be recorded, got {len(hyperparameters)}"
            )
        checked = {_key(key): _value(key, value) for key, value in hyperparameters.items()}
        if checked:
            result[HYPERPARAMETERS] = checked
    return result


def parse_dataset(text: str) -> Dataset:
    """``NAME[@REVISION]`` (``--dataset``): the revision is what follows the last '@'."""
    name, sep, revision = text.rpartition("@")
    if not sep:
        name, revision = text, ""
    elif not name or not revision:
        raise InvalidInput(f"invalid dataset {text!r}: expected NAME or NAME@REVISION")
    checked = _dataset((name, revision or None))
    return checked["name"] or name, checked["revision"]


def parse_hyperparameter(text: str) -> tuple[str, Hyperparameter]:
    """``KEY=VALUE`` (``--hparam``): a value that parses as a number is recorded as one (finite only)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise InvalidInput(f"invalid hyperparameter {text!r}: expected KEY=VALUE")
    value: Hyperparameter = raw
    try:
        value = int(raw)
    except ValueError:
        try:
            value = float(raw)
        except ValueError:
            pass
    return _key(key), _value(key, value)


def _dataset(item: Any) -> dict[str, str | None]:
    try:
        name, revision = item
    except (TypeError, ValueError):
        raise InvalidInput(f"invalid dataset {item!r}: expected a (name, revision or None) pair") from None
    if (
        not isinstance(name, str)
        or not name.strip()
        or len(name) > MAX_NAME
        or not _PRINTABLE.fullmatch(name)
    ):
        raise InvalidInput(f"invalid dataset name {name!r}: expected 1 to {MAX_NAME} printable characters")
    if revision is not None and (
        not isinstance(revision, str)
        or not revision
        or len(revision) > MAX_NAME
        or not _PRINTABLE.fullmatch(revision)
    ):
        raise InvalidInput(
            f"invalid revision {revision!r} of dataset {name!r}: expected 1 to {MAX_NAME} printable "
            "characters, or none"
        )
    return {"name": name, "revision": revision}


def _key(key: Any) -> str:
    if not isinstance(key, str) or not key or len(key) > MAX_KEY or not _PRINTABLE.fullmatch(key):
        raise InvalidInput(
            f"invalid hyperparameter name {key!r}: expected 1 to {MAX_KEY} printable characters"
        )
    return key


def _value(key: str, value: Any) -> Hyperparameter:
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        if abs(value) > MAX_SAFE_INTEGER:
            raise InvalidInput(f"hyperparameter {key}: {value} is too large (at most 2**53 - 1 in magnitude)")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidInput(f"hyperparameter {key}: {value} is not a finite number")
        return value
    if isinstance(value, str):
        if len(value) > MAX_TEXT_VALUE:
            raise InvalidInput(f"hyperparameter {key}: the value is longer than {MAX_TEXT_VALUE} characters")
        return value
    raise InvalidInput(f"hyperparameter {key}: {value!r} is not a string, boolean, integer or finite number")


def check_recorded(metadata: Mapping[str, Any]) -> None:
    """The well-known keys of a manifest's metadata as a registry receives it, if present, well formed.

    The client builds them with ``training_metadata``; the registry checks them again at push, because
    lineage and search read them and any client can send a manifest.

    Raises:
        InvalidInput: naming the malformed entry.
    """
    datasets = metadata.get(DATASETS)
    if datasets is not None and not (
        isinstance(datasets, list) and all(isinstance(d, dict) for d in datasets)
    ):
        raise InvalidInput('metadata "datasets" must be a list of {"name": ..., "revision": ...} objects')
    hyperparameters = metadata.get(HYPERPARAMETERS)
    if hyperparameters is not None and not isinstance(hyperparameters, dict):
        raise InvalidInput('metadata "hyperparameters" must be an object of name -> value')
    code_commit = metadata.get(CODE_COMMIT)
    if code_commit is not None and not isinstance(code_commit, str):
        raise InvalidInput('metadata "code_commit" must be a string')
    for item in datasets or []:
        if set(item) - {"name", "revision"}:
            raise InvalidInput(f"dataset {item!r}: only name and revision may be recorded")
    training_metadata(
        {key: value for key, value in metadata.items() if key not in RESERVED_KEYS},
        datasets=[(item.get("name"), item.get("revision")) for item in datasets or []],
        code_commit=code_commit,
        hyperparameters=hyperparameters,
    )
