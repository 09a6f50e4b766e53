"""Client configuration: explicit arguments first, then ``DELTAREG_*`` variables, read when asked."""

from __future__ import annotations

import getpass
import os
from pathlib import Path

DEFAULT_URL = "http://127.0.0.1:8000"


def registry_url(explicit: str | None = None) -> str:
    return (explicit or os.environ.get("DELTAREG_URL") or DEFAULT_URL).rstrip("/")


def registry_token(explicit: str | None = None) -> str | None:
    return explicit or os.environ.get("DELTAREG_TOKEN") or None


def actor(explicit: str | None = None) -> str | None:
    """Who this client acts as, for the audit log: ``DELTAREG_ACTOR``, else the local user name.

    Until tokens carry identities this is the name the registry records (an attribution, not a proof).
    """
    if explicit or os.environ.get("DELTAREG_ACTOR"):
        return explicit or os.environ["DELTAREG_ACTOR"]
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no user name for this uid (some containers)
        return None


def cache_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Where pulled versions and fingerprints are cached: ``DELTAREG_CACHE_DIR`` or ``~/.cache/deltareg``."""
    if explicit is not None:
        return Path(explicit)
    env = os.environ.get("DELTAREG_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "deltareg"
