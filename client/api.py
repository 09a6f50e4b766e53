"""The deltareg client library: push, pull, verify and apply deltas against a registry."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import httpx

from deltareg.client import config
from deltareg.client._http import make_client, request_json
from deltareg.client.cache import VersionCache, VersionRecord, copy_folder, verify_folder
from deltareg.client.errors import AliasNotFound, BaseMismatch, DigestMismatch, InvalidInput, MissingBlob
from deltareg.client.fingerprint import (
    FingerprintCache,
    ModelFingerprint,
    fingerprint_path,
    is_fingerprint,
)
from deltareg.client.lora import check_against_base, read_peft_adapter
from deltareg.client.manifest import BaseModelRef, FileEntry, Manifest
from deltareg.client.progress import TransferProgress, resolve_progress
from deltareg.client.refs import Reference, RepoName, validate_alias
from deltareg.client.transfer import BlobDownload, Transfers, TransferSettings, UploadPlan, file_digest
from deltareg.client.weights import validate_safetensors_file

if TYPE_CHECKING:
    import torch

    from deltareg.client.apply import ApplyResult

VerifyMode = Literal["full", "touched"]


@dataclass(frozen=True)
class VersionInfo:
    """One version as the registry describes it; the manifest is checked against its digest."""

    repo: str
    number: int
    digest: str
    kind: str
    base_fingerprint: str
    parent: str | None
    created_at: str
    size: int
    manifest: Manifest
    evals: tuple[dict[str, Any], ...] = ()

    @property
    def ref(self) -> str:
        return f"{self.repo}:{self.number}"

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> VersionInfo:
        manifest = Manifest.parse(data["manifest"])
        if manifest.digest != data["digest"]:
            raise DigestMismatch(
                f"the registry's manifest for {data['repo']}:{data['number']} hashes to {manifest.digest}, "
                f"not to its recorded digest {data['digest']}"
            )
        return cls(
            repo=data["repo"],
            number=data["number"],
            digest=data["digest"],
            kind=data["kind"],
            base_fingerprint=data["base_fingerprint"],
            parent=data.get("parent"),
            created_at=data["created_at"],
            size=data["size"],
            manifest=manifest,
            evals=tuple(data.get("evals", ())),
        )

    def summary(self) -> dict[str, Any]:
        return {
            "repo": self.repo,
            "number": self.number,
            "digest": self.digest,
            "kind": self.kind,
            "base_fingerprint": self.base_fingerprint,
            "parent": self.parent,
            "created_at": self.created_at,
            "size": self.size,
            "evals": list(self.evals),
        }


@dataclass(frozen=True)
class PushResult:
    version: VersionInfo
    created: bool
    uploaded_blobs: int
    uploaded_bytes: int


@dataclass(frozen=True)
class PulledDelta:
    """A verified local copy of a version."""

    path: Path
    version: VersionRecord
    fingerprints: FingerprintCache | None = None

    @property
    def manifest(self) -> Manifest:
        return self.version.manifest

    def apply(self, model: torch.nn.Module | dict[str, torch.Tensor], *, verify: VerifyMode = "full") -> None:
        """Apply in place to a torch module or state dict; the base is checked before anything changes."""
        import torch

        from deltareg.client.apply import apply_to_module, apply_to_state_dict

        if isinstance(model, torch.nn.Module):
            apply_to_module(model, self.path, self.manifest, verify=verify)
        else:
            apply_to_state_dict(model, self.path, self.manifest, verify=verify)

    def apply_files(
        self, base: str | os.PathLike[str], output: str | os.PathLike[str], *, verify: VerifyMode = "full"
    ) -> ApplyResult:
        """Write base + delta to ``output`` file to file; nothing is written if the base does not match."""
        from deltareg.client.apply import apply_files

        return apply_files(base, self.path, self.manifest, output, verify=verify, cache=self.fingerprints)

    def verify(self, base: str | os.PathLike[str] | None = None) -> None:
        """Re-hash the files (and, with ``base``, check the base model's fingerprint)."""
        verify_folder(self.path)
        if base is not None:
            check_base_fingerprint(self.manifest, fingerprint_path(base, cache=self.fingerprints))


def _eval_list(evals: Mapping[str, float] | None) -> list[dict[str, Any]]:
    items = []
    for name, value in (evals or {}).items():
        if not math.isfinite(float(value)):
            raise InvalidInput(f"eval {name}: {value} is not a finite number")
        items.append({"name": name, "value": float(value)})
    return items


def check_base_fingerprint(manifest: Manifest, base: ModelFingerprint) -> None:
    if base.value != manifest.base.fingerprint:
        raise BaseMismatch(
            f"wrong base model: it has fingerprint {base.value}, but this delta was made for "
            f"{manifest.base.fingerprint}" + (f" ({manifest.base.name})" if manifest.base.name else "")
        )


class Registry:
    """A deltareg registry.

    Args:
        url: the registry's base URL (default ``DELTAREG_URL``, then ``http://127.0.0.1:8000``).
        token: API token (default ``DELTAREG_TOKEN``).
        actor: who to record as acting in the audit log (default ``DELTAREG_ACTOR``, then the local user).
        cache_dir: where pulled versions and fingerprints are cached (default ``DELTAREG_CACHE_DIR``, then
            ``~/.cache/deltareg``).
        http: an httpx client to use instead of a new one (its base URL must be the registry).
        progress: progress bars for large files on stderr: None (default) shows them only when stderr is
            a terminal, True always, False never; or a ``TransferProgress`` to report to instead.
        transfer_settings: parallelism, range sizes and retries of blob transfers.
    """

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        actor: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        http: httpx.Client | None = None,
        progress: bool | TransferProgress | None = None,
        transfer_settings: TransferSettings | None = None,
    ) -> None:
        self.url = config.registry_url(url)
        self._http = http or make_client(self.url, config.registry_token(token), actor=config.actor(actor))
        self.transfers = Transfers(
            self._http, settings=transfer_settings, progress=resolve_progress(progress)
        )
        root = config.cache_dir(cache_dir)
        self.cache = VersionCache(root)
        self.fingerprints = FingerprintCache(root / "fingerprints")
        # Interrupted downloads, kept under a name derived from the digest so a later pull resumes them.
        self.partials = root / "partials"

    def close(self) -> None:
        self.transfers.close()
        self._http.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading -------------------------------------------------------------------------------

    def resolve(self, ref: str | Reference) -> VersionInfo:
        """Resolve ``ns/name``, ``ns/name:N``, ``ns/name@alias`` or ``ns/name@sha256:…`` to a version."""
        reference = ref if isinstance(ref, Reference) else Reference.parse(ref)
        info = VersionInfo.from_json(
            request_json(self._http, "GET", "/api/v1/resolve", params={"ref": str(reference)})
        )
        if reference.digest is not None and info.digest != reference.digest:
            raise DigestMismatch(f"asked for {reference.digest}, the registry answered with {info.digest}")
        return info

    def list_repos(self, namespace: str | None = None) -> list[dict[str, Any]]:
        params = {"namespace": namespace} if namespace else None
        return list(request_json(self._http, "GET", "/api/v1/repos", params=params)["repos"])

    def repo(self, name: str) -> dict[str, Any]:
        repo = RepoName.parse(name)
        return dict(request_json(self._http, "GET", f"/api/v1/repos/{repo.namespace}/{repo.name}"))

    # -- push ----------------------------------------------------------------------------------

    def push(
        self,
        delta: str | os.PathLike[str],
        repo: str,
        *,
        base: str | os.PathLike[str],
        parent: str | None = None,
        evals: Mapping[str, float] | None = None,
        metadata: Mapping[str, Any] | None = None,
        base_name: str | None = None,
        base_revision: str | None = None,
    ) -> PushResult:
        """Push a PEFT LoRA adapter folder as a new version of ``repo``.

        Args:
            delta: the adapter folder as ``PeftModel.save_pretrained`` wrote it.
            repo: ``namespace/name``; created on first push.
            base: the base model (a safetensors file or folder) or its ``tmv1:`` fingerprint. With a model,
                every target tensor is checked (name and shape) and the touched tensors' digests are
                recorded so that a fast apply can check just those.
            parent: a reference to the version this delta stacks on.
            evals: scores to record with the new version (metric name -> finite value).
            metadata: free-form training metadata (datasets, code commit, hyperparameters).

        Raises:
            InvalidAdapter, UnsafeFile, InvalidSafetensors: the adapter folder is not acceptable.
            BaseMismatch: the adapter does not fit the given base model.
        """
        repo_name = RepoName.parse(repo)
        adapter = read_peft_adapter(delta)
        base_ref = self._base_ref(base, adapter.targets, base_name, base_revision)
        files = self._describe_files(adapter.folder, adapter.files)
        manifest = Manifest(
            kind="lora",
            files=files,
            base=base_ref,
            params=adapter.params(),
            parent=self.resolve(parent).digest if parent else None,
            metadata=dict(metadata or {}),
        )
        path = f"/api/v1/repos/{repo_name.namespace}/{repo_name.name}/versions"
        payload = {"manifest": manifest.to_json_obj(), "evals": _eval_list(evals)}
        uploaded, uploaded_bytes = self._upload_missing(adapter.folder, files)
        try:
            body = request_json(self._http, "POST", path, json=payload)
        except MissingBlob:
            # Garbage collection removed a blob between the upload plan and the commit (the server
            # refuses such a commit): upload what is missing again and commit once more.
            again, again_bytes = self._upload_missing(adapter.folder, files)
            uploaded, uploaded_bytes = uploaded + again, uploaded_bytes + again_bytes
            body = request_json(self._http, "POST", path, json=payload)
        return PushResult(VersionInfo.from_json(body), bool(body.get("created")), uploaded, uploaded_bytes)

    def _base_ref(
        self, base: str | os.PathLike[str], targets: Any, name: str | None, revision: str | None
    ) -> BaseModelRef:
        text = os.fspath(base)
        if is_fingerprint(text) and not Path(text).exists():
            return BaseModelRef(fingerprint=text, name=name, revision=revision)
        fingerprint = fingerprint_path(text, cache=self.fingerprints)
        check_against_base(targets, fingerprint.tensors)
        touched = {t.base_tensor: fingerprint.tensors[t.base_tensor].digest for t in targets}
        return BaseModelRef(fingerprint=fingerprint.value, name=name, revision=revision, tensors=touched)

    @staticmethod
    def _describe_files(folder: Path, paths: list[str]) -> list[FileEntry]:
        entries = []
        for rel in sorted(paths):
            path = folder / rel
            if rel.endswith(".safetensors"):
                validate_safetensors_file(path)
            entries.append(FileEntry(path=rel, digest=file_digest(path), size=path.stat().st_size))
        return entries

    def _upload_missing(self, folder: Path, files: list[FileEntry]) -> tuple[int, int]:
        wanted = [{"digest": f.digest, "size": f.size} for f in files]
        answer = request_json(self._http, "POST", "/api/v1/blobs/uploads", json={"blobs": wanted})
        by_digest = {f.digest: f for f in files}
        count = total = 0
        for blob in answer["blobs"]:
            plan = UploadPlan.from_json(blob)
            entry = by_digest[plan.digest]
            if self.transfers.upload(plan, folder / entry.path, label=entry.path):
                count, total = count + 1, total + entry.size
        return count, total

    # -- pull, verify, apply -------------------------------------------------------------------

    def pull(self, ref: str, *, output: str | os.PathLike[str] | None = None) -> PulledDelta:
        """Download and verify a version (reusing the cache), optionally copying it to ``output``.

        The folder loads unchanged with ``PeftModel.from_pretrained``.

        Raises:
            DigestMismatch: a downloaded file does not match the manifest; nothing is kept.
        """
        return self.pull_version(self.resolve(ref), output=output)

    def pull_version(self, info: VersionInfo, *, output: str | os.PathLike[str] | None = None) -> PulledDelta:
        """``pull`` for a version already resolved."""
        record = VersionRecord(repo=info.repo, number=info.number, digest=info.digest, manifest=info.manifest)
        folder = self.cache.lookup(info.digest) or self.cache.install(record, self._fetcher(info))
        if output is not None:
            folder = copy_folder(folder, Path(output))
        return PulledDelta(path=folder, version=record, fingerprints=self.fingerprints)

    def _fetcher(self, info: VersionInfo) -> Any:
        located = self.transfers.locate([entry.digest for entry in info.manifest.files])

        def fetch(entry: FileEntry, dest: Path) -> None:
            # The manifest's size is the one to verify against, whatever the registry's URL answer says.
            blob = BlobDownload(entry.digest, entry.size, located[entry.digest].url)
            self.transfers.download(blob, dest, partials=self.partials, label=f"{info.ref} {entry.path}")

        return fetch

    def verify(
        self, target: str | os.PathLike[str], *, base: str | os.PathLike[str] | None = None
    ) -> VersionRecord:
        """Verify a pulled folder, or a reference (pulled first), and optionally the base model.

        Raises:
            DigestMismatch, BaseMismatch: something does not verify (CLI exit code 3).
        """
        folder = Path(target)
        if folder.is_dir():
            record = verify_folder(folder)
        else:
            pulled = self.pull(os.fspath(target))
            record = verify_folder(pulled.path)
        if base is not None:
            check_base_fingerprint(record.manifest, fingerprint_path(base, cache=self.fingerprints))
        return record

    def apply(
        self,
        ref: str,
        base: str | os.PathLike[str],
        output: str | os.PathLike[str],
        *,
        verify: VerifyMode = "full",
    ) -> ApplyResult:
        """Pull ``ref`` and write base + delta to ``output`` (nothing is written on a wrong base)."""
        out = Path(output)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise InvalidInput(f"output {out} already exists and is not an empty folder")
        return self.pull(ref).apply_files(base, out, verify=verify)

    # -- aliases -------------------------------------------------------------------------------

    def promote(
        self,
        ref: str | Reference,
        alias: str,
        *,
        expected: int | None | Literal["current"] = "current",
        reason: str | None = None,
    ) -> dict[str, Any]:
        """Point ``alias`` of the ref's repo at the version ``ref`` names, by compare-and-swap.

        Args:
            ref: the version to promote (``ns/name:N``, ``ns/name@staging``, ...).
            alias: the alias to move (``production``); created if ``expected`` is None.
            expected: the version number the alias points to now, None if it must not exist yet, or
                ``"current"`` (default) to read the current holder first and expect that one: a concurrent
                move in between still makes this call fail rather than overwrite it.
            reason: why, kept in the alias history.

        Returns:
            The alias as moved: ``repo``, ``name``, ``version``, ``digest``, ``previous``, ``moved``.

        Raises:
            Conflict: the alias does not point where expected (the message names the current holder).
        """
        reference = ref if isinstance(ref, Reference) else Reference.parse(ref)
        validate_alias(alias)
        version = self.resolve(reference)
        if expected == "current":
            expected = self._alias_holder(reference.repo, alias)
        body = {"version": version.number, "expected": expected, "reason": reason}
        return dict(request_json(self._http, "PUT", self._alias_path(reference.repo, alias), json=body))

    def aliases(self, repo: str) -> list[dict[str, Any]]:
        """The aliases of ``repo`` (``name``, ``version``, ``digest``, ``updated_at``), by name."""
        repo_name = RepoName.parse(repo)
        path = f"/api/v1/repos/{repo_name.namespace}/{repo_name.name}/aliases"
        return list(request_json(self._http, "GET", path)["aliases"])

    def _alias_holder(self, repo: RepoName, alias: str) -> int | None:
        try:
            found = request_json(self._http, "GET", self._alias_path(repo, alias))
        except AliasNotFound:
            return None
        return int(found["version"])

    @staticmethod
    def _alias_path(repo: RepoName, alias: str) -> str:
        return f"/api/v1/repos/{repo.namespace}/{repo.name}/aliases/{alias}"
