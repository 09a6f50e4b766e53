"""Checks of what a manifest names, against the blob store, before a version may be recorded."""

from __future__ import annotations

import json

from deltareg.client.errors import InvalidAdapter, InvalidManifest, MissingBlob
from deltareg.client.manifest import FileEntry, Manifest
from deltareg.client.weights import read_header
from deltareg.registry.blobs.repository import BlobRepository
from deltareg.registry.storage import BlobStore

MIB = 1 << 20
MAX_ADAPTER_CONFIG_BYTES = MIB
HEADER_READ_AHEAD = 64 * 1024
# The files a PEFT LoRA adapter folder must contain (save_pretrained's names).
LORA_REQUIRED_FILES = ("adapter_config.json", "adapter_model.safetensors")


class ContentChecker:
    """Every file present with its declared size, every safetensors header sound, the kind's files valid."""

    def __init__(self, blobs: BlobRepository, store: BlobStore) -> None:
        self.blobs = blobs
        self.store = store

    def check(self, manifest: Manifest) -> None:
        """Store checks first (no transaction is held while they read), then the database: every blob
        recorded (= verified), marked in use so garbage collection keeps it until the version commits."""
        self._check_blobs_stored(manifest.files)
        for entry in manifest.files:
            if entry.path.lower().endswith(".safetensors"):
                self._check_safetensors(entry)
        if manifest.kind == "lora":
            self._check_lora(manifest)
        self._check_blobs_recorded(manifest.files)

    def _check_blobs_stored(self, files: list[FileEntry]) -> None:
        sizes = self.store.sizes_of(entry.digest for entry in files)
        for entry in files:
            stored_size = sizes[entry.digest]
            if stored_size is None:
                raise _missing(entry)
            if stored_size != entry.size:
                raise _wrong_size(entry, stored_size)

    def _check_blobs_recorded(self, files: list[FileEntry]) -> None:
        recorded = self.blobs.mark_in_use(entry.digest for entry in files)
        for entry in files:
            size = recorded.get(entry.digest)
            if size is None:
                raise _missing(entry)
            if size != entry.size:
                raise _wrong_size(entry, size)

    def _check_safetensors(self, entry: FileEntry) -> None:
        # The header is read in two steps (its length, then itself); one read of the file's start
        # usually holds both, which saves a round trip to a remote store.
        start = self.store.read_range(entry.digest, 0, min(entry.size, HEADER_READ_AHEAD))

        def read_at(offset: int, length: int) -> bytes:
            if offset + length <= len(start):
                return start[offset : offset + length]
            data: bytes = self.store.read_range(entry.digest, offset, length)
            return data

        read_header(read_at, entry.size, source=entry.path)

    def _check_lora(self, manifest: Manifest) -> None:
        paths = {entry.path for entry in manifest.files}
        missing = [path for path in LORA_REQUIRED_FILES if path not in paths]
        if missing:
            needed = ", ".join(LORA_REQUIRED_FILES)
            raise InvalidAdapter(f"a lora version needs the files {needed}; missing: {', '.join(missing)}")
        self._check_adapter_config(manifest.file("adapter_config.json"))

    def _check_adapter_config(self, entry: FileEntry) -> None:
        if entry.size > MAX_ADAPTER_CONFIG_BYTES:
            raise InvalidAdapter(
                f"adapter_config.json is {entry.size} bytes; the limit is {MAX_ADAPTER_CONFIG_BYTES} bytes"
            )
        raw = self.store.read_range(entry.digest, 0, entry.size)
        try:
            config = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise InvalidAdapter(f"adapter_config.json is not valid UTF-8 JSON ({exc!s:.200})") from None
        if not isinstance(config, dict):
            raise InvalidAdapter("adapter_config.json must hold a JSON object")


def _missing(entry: FileEntry) -> MissingBlob:
    return MissingBlob(f"file {entry.path!r}: blob {entry.digest} is not in the registry; upload it first")


def _wrong_size(entry: FileEntry, size: int) -> InvalidManifest:
    return InvalidManifest(
        f"file {entry.path!r}: the manifest says {entry.size} bytes but blob {entry.digest} has {size} bytes"
    )
