"""Small JSON files a user hands us (model and delta configs): bounded, parsed, an object, or one error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deltareg.client.errors import DeltaregError


def read_json_object(path: Path, limit: int, error: type[DeltaregError]) -> dict[str, Any]:
    """The JSON object in ``path`` (at most ``limit`` bytes); ``error`` naming the file otherwise."""
    raw = path.read_bytes()
    if len(raw) > limit:
        raise error(f"{path}: {len(raw)} bytes, over the limit of {limit}")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise error(f"{path}: not valid JSON ({exc!s:.200})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object")
    return data
