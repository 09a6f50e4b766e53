"""The local cache of pulled versions.

Layout: ``<cache>/versions/<manifest hex>/`` holds the version's files exactly as pushed, plus
``.deltareg.json`` (repo, number, digest and manifest). A version folder is built in a temporary folder
beside it and renamed into place only when every file has verified and is on the disk (fsync), so a folder
that exists is complete, after a crash or a power cut too.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltareg.client.errors import DigestMismatch, InvalidInput
from deltareg.client.manifest import FileEntry, Manifest
from deltareg.client.outputs import refuse_existing_output, write_atomically
from deltareg.client.transfer import file_digest

RECORD_NAME = ".deltareg.json"


@dataclass(frozen=True)
class VersionRecord:
    """What a pulled folder says about itself."""

    repo: str
    number: int
    digest: str
    manifest: Manifest

    def to_json(self) -> dict[str, Any]:
        return {
            "repo": self.repo,
            "number": self.number,
            "digest": self.digest,
            "manifest": self.manifest.to_json_obj(),
        }

    @classmethod
    def read(cls, folder: Path) -> VersionRecord:
        path = folder / RECORD_NAME
        if not path.is_file():
            raise InvalidInput(f"{folder} is not a pulled deltareg version (no {RECORD_NAME})")
        try:
            data = json.loads(path.read_text())
            return cls(
                repo=str(data["repo"]),
                number=int(data["number"]),
                digest=str(data["digest"]),
                manifest=Manifest.parse(data["manifest"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidInput(f"{path} is damaged: {exc}") from exc

    def write(self, folder: Path) -> None:
        (folder / RECORD_NAME).write_text(json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n")


def verify_folder(folder: Path) -> VersionRecord:
    """Re-hash every file of a pulled folder against its manifest, and the manifest against its digest."""
    record = VersionRecord.read(folder)
    if record.manifest.digest != record.digest:
        raise DigestMismatch(
            f"{folder}: the manifest hashes to {record.manifest.digest}, not the recorded {record.digest}"
        )
    problems = [problem for entry in record.manifest.files if (problem := _file_problem(folder, entry))]
    if problems:
        raise DigestMismatch(f"{folder} does not match {record.repo}:{record.number}: " + "; ".join(problems))
    return record


def _file_problem(folder: Path, entry: FileEntry) -> str | None:
    path = folder / entry.path
    if not path.is_file():
        return f"{entry.path} is missing"
    if path.stat().st_size != entry.size:
        return f"{entry.path} has {path.stat().st_size} bytes, expected {entry.size}"
    if file_digest(path) != entry.digest:
        return f"{entry.path} does not hash to {entry.digest}"
    return None


class VersionCache:
    def __init__(self, root: Path) -> None:
        self.root = root / "versions"

    def folder_for(self, digest: str) -> Path:
        return self.root / digest.removeprefix("sha256:")

    def lookup(self, digest: str) -> Path | None:
        """A complete cached folder for this manifest digest, or None. Sizes are checked, not hashes."""
        folder = self.folder_for(digest)
        try:
            record = VersionRecord.read(folder)
        except InvalidInput:
            return None
        intact = record.digest == digest and all(
            (folder / f.path).is_file() and (folder / f.path).stat().st_size == f.size
            for f in record.manifest.files
        )
        return folder if intact else None

    def install(self, record: VersionRecord, fetch: Callable[[FileEntry, Path], None]) -> Path:
        """Build the version folder with ``fetch(entry, destination)`` for each file, then move it in (over a
        damaged earlier copy, or a concurrent pull's that finished first)."""
        final = self.folder_for(record.digest)

        def build(staging: Path) -> None:
            for entry in record.manifest.files:
                dest = staging / entry.path
                dest.parent.mkdir(parents=True, exist_ok=True)
                fetch(entry, dest)
            record.write(staging)

        # Flushed before the rename: lookup checks sizes only, which a crash's folder of zeros would pass.
        write_atomically(final, build, replace=True)
        return final


def copy_folder(source: Path, output: Path) -> Path:
    """Copy a pulled folder to ``output`` (absent or empty), via a temporary folder beside it that is flushed
    to the disk before it is renamed."""
    refuse_existing_output(output)
    write_atomically(output, lambda temp: shutil.copytree(source, temp, dirs_exist_ok=True))
    return output
