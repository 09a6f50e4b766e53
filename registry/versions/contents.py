"""Checks of what a manifest names, against the blob store, before a version may be recorded."""

from __future__ import annotations

import json

from deltareg.client import dense
from deltareg.client.errors import InvalidAdapter, InvalidDelta, InvalidManifest, MissingBlob
from deltareg.client.manifest import FileEntry, Manifest
from deltareg.client.weights import SafetensorsHeader, read_header
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
        headers = {
            entry.path: self._check_safetensors(entry)
            for entry in manifest.files
            if entry.path.lower().endswith(".safetensors")
        }
        if manifest.kind == "lora":
            self._check_lora(manifest)
        elif manifest.kind == "full":
            self._check_dense(manifest, headers)
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

    def _check_safetensors(self, entry: FileEntry) -> SafetensorsHeader:
        # The header is read in two steps (its length, then itself); one read of the file's start
        # usually holds both, which saves a round trip to a remote store.
        start = self.store.read_range(entry.digest, 0, min(entry.size, HEADER_READ_AHEAD))

        def read_at(offset: int, length: int) -> bytes:
            if offset + length <= len(start):
                return start[offset : offset + length]
            data: bytes = self.store.read_range(entry.digest, offset, length)
            return data

        return read_header(read_at, entry.size, source=entry.path)

    def _check_lora(self, manifest: Manifest) -> None:
        paths = {entry.path for entry in manifest.files}
        missing = [path for path in LORA_REQUIRED_FILES if path not in paths]
        if missing:
            needed = ", ".join(LORA_REQUIRED_FILES)
            raise InvalidAdapter(f"a lora version needs the files {needed}; missing: {', '.join(missing)}")
        self._check_adapter_config(manifest.file("adapter_config.json"))

    def _check_dense(self, manifest: Manifest, headers: dict[str, SafetensorsHeader]) -> None:
        """The params are a valid dense delta, equal to the version's delta_config.json, and its weights
        file holds exactly the tensors they name; the files it carries are all in the version."""
        paths = {entry.path for entry in manifest.files}
        missing = [path for path in (dense.CONFIG_FILE, dense.WEIGHTS_FILE) if path not in paths]
        if missing:
            raise InvalidDelta(
                f"a full version needs the files {dense.CONFIG_FILE} and {dense.WEIGHTS_FILE}; "
                f"missing: {', '.join(missing)}"
            )
        params = dense.DenseParams.parse(manifest.params, "manifest params")
        if self._read_json(manifest.file(dense.CONFIG_FILE), dense.MAX_CONFIG_BYTES) != manifest.params:
            raise InvalidDelta(f"{dense.CONFIG_FILE} does not hold the manifest's params")
        dense.check_stored_tensors(params, headers[dense.WEIGHTS_FILE], dense.WEIGHTS_FILE)
        unlisted = sorted(paths - {dense.CONFIG_FILE, dense.WEIGHTS_FILE, *params.files})
        if unlisted or not paths.issuperset(params.files):
            raise InvalidDelta(
                f"the version's files must be {dense.CONFIG_FILE}, {dense.WEIGHTS_FILE} and the files "
                f"its params list; unexpected: {', '.join(unlisted) or 'none'}"
            )

    def _read_json(self, entry: FileEntry, limit: int) -> object:
        if entry.size > limit:
            raise InvalidDelta(f"{entry.path} is {entry.size} bytes; the limit is {limit} bytes")
        raw = self.store.read_range(entry.digest, 0, entry.size)
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise InvalidDelta(f"{entry.path} is not valid UTF-8 JSON ({exc!s:.200})") from None

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
