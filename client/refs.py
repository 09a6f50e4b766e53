"""Repository names and references.

``ns/name`` (newest), ``ns/name:7``, ``ns/name@alias``, ``ns/name@sha256:<hex>``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from deltareg.client.errors import InvalidName, InvalidReference

NAME_PART = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
ALIAS = re.compile(r"[a-z][a-z0-9._-]{0,63}")
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
MAX_VERSION = 2**31 - 1
# Names a repository part may not take: device names that Windows refuses as a file or folder name, whatever
# the extension (a pulled version's folder or a mirror could be named after its repository).
RESERVED_NAMES = frozenset(
    {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}
)


def validate_name_part(part: str, what: str = "name") -> str:
    """Check one part of a repository name; the error says what a valid name looks like."""
    if not NAME_PART.fullmatch(part) or ".." in part or part.endswith("."):
        raise InvalidName(
            f"invalid repository {what} {part!r}: use lower-case letters, digits, '.', '_' and '-', "
            "starting with a letter or digit, at most 64 characters, no '..', not ending with '.'"
        )
    if part.split(".", 1)[0] in RESERVED_NAMES:
        raise InvalidName(f"invalid repository {what} {part!r}: {part.split('.', 1)[0]!r} is a reserved name")
    return part


def validate_alias(alias: str) -> str:
    if not ALIAS.fullmatch(alias):
        raise InvalidName(
            f"invalid alias {alias!r}: use lower-case letters, digits, '.', '_' and '-', "
            "starting with a letter, at most 64 characters"
        )
    return alias


def validate_digest(digest: str) -> str:
    if not DIGEST.fullmatch(digest):
        raise InvalidReference(f"invalid digest {digest!r}: expected 'sha256:' followed by 64 hex digits")
    return digest


@dataclass(frozen=True)
class RepoName:
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"

    @classmethod
    def parse(cls, text: str) -> RepoName:
        parts = text.split("/")
        if len(parts) != 2:
            raise InvalidName(f"invalid repository {text!r}: expected 'namespace/name'")
        return cls(validate_name_part(parts[0], "namespace"), validate_name_part(parts[1], "name"))


@dataclass(frozen=True)
class Reference:
    """A parsed reference. At most one of ``version``, ``alias`` and ``digest`` is set; none means newest."""

    repo: RepoName
    version: int | None = None
    alias: str | None = None
    digest: str | None = None

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.repo}:{self.version}"
        if self.alias is not None:
            return f"{self.repo}@{self.alias}"
        if self.digest is not None:
            return f"{self.repo}@{self.digest}"
        return str(self.repo)

    @classmethod
    def parse(cls, text: str) -> Reference:
        if "@" in text:
            repo_text, _, target = text.partition("@")
            repo = RepoName.parse(repo_text)
            if target.startswith("sha256:"):
                return cls(repo, digest=validate_digest(target))
            return cls(repo, alias=validate_alias(target))
        if ":" in text:
            repo_text, _, number = text.partition(":")
            return cls(RepoName.parse(repo_text), version=parse_version_number(number))
        return cls(RepoName.parse(text))


def parse_version_number(text: str) -> int:
    # isdigit() alone takes "²" (which int() refuses) and "٣" (which int() reads as 3); only ASCII digits,
    # and few enough of them for int() to accept (it refuses strings of over 4300 digits).
    too_long = len(text) > len(str(MAX_VERSION))
    if not (text.isascii() and text.isdigit()) or too_long or text.startswith("0") or int(text) > MAX_VERSION:
        raise InvalidReference(f"invalid version number {text!r}: expected a whole number from 1")
    return int(text)
