"""Client configuration: explicit arguments first, then ``DELTAREG_*`` variables, read when asked."""

from __future__ import annotations

import json
import os
from pathlib import Path

DEFAULT_URL = "http://127.0.0.1:8000"
CREDENTIALS_FILE = "credentials.json"


def registry_url(explicit: str | None = None) -> str:
    return (explicit or os.environ.get("DELTAREG_URL") or DEFAULT_URL).rstrip("/")


def registry_token(explicit: str | None = None, url: str | None = None) -> str | None:
    """The API token: ``explicit``, else ``DELTAREG_TOKEN``, else the one stored for ``url`` in the
    credentials file (where ``deltareg serve`` puts the admin token it creates on this machine)."""
    found = explicit or os.environ.get("DELTAREG_TOKEN")
    if found:
        return found
    return stored_tokens().get(registry_url(url)) if url is not None else None


def config_dir() -> Path:
    """``DELTAREG_CONFIG_DIR``, else ``$XDG_CONFIG_HOME/deltareg``, else ``~/.config/deltareg``."""
    env = os.environ.get("DELTAREG_CONFIG_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CONFIG_HOME")
    return (Path(xdg) if xdg else Path.home() / ".config") / "deltareg"


def credentials_file() -> Path:
    return config_dir() / CREDENTIALS_FILE


def stored_tokens() -> dict[str, str]:
    """Registry URL -> token, from the credentials file (empty when there is none or it is unreadable)."""
    try:
        data = json.loads(credentials_file().read_text())
    except (OSError, ValueError):
        return {}
    tokens = data.get("tokens") if isinstance(data, dict) else None
    if not isinstance(tokens, dict):
        return {}
    return {str(k): v for k, v in tokens.items() if isinstance(v, str)}


def store_token(urls: list[str], token: str) -> Path:
    """Remember ``token`` for each of ``urls`` in the credentials file, readable by its owner only."""
    path = credentials_file()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tokens = {**stored_tokens(), **{registry_url(url): token for url in urls}}
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump({"tokens": tokens}, out, indent=2, sort_keys=True)
    temp.replace(path)
    return path


def cache_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Where pulled versions and fingerprints are cached: ``DELTAREG_CACHE_DIR`` or ``~/.cache/deltareg``."""
    if explicit is not None:
        return Path(explicit)
    env = os.environ.get("DELTAREG_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "deltareg"
