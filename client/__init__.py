"""deltareg client: push, pull, verify and apply deltas.

The public names are imported lazily, so that the server (which shares this package's formats) does not
load the HTTP client, and importing a single module stays cheap.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "Registry": "deltareg.client.api",
    "PulledDelta": "deltareg.client.api",
    "VersionInfo": "deltareg.client.api",
    "PushResult": "deltareg.client.api",
    "fingerprint_path": "deltareg.client.fingerprint",
    "fingerprint_state_dict": "deltareg.client.fingerprint",
    "ModelFingerprint": "deltareg.client.fingerprint",
    "Reference": "deltareg.client.refs",
    "Manifest": "deltareg.client.manifest",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'deltareg.client' has no attribute {name!r}")
