"""The deltareg client library: push, pull, verify and apply deltas against a registry."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import httpx

from deltareg.client import config
from deltareg.client._http import make_client, request_json
from deltareg.client.cache import VersionCache, VersionRecord, copy_folder, verify_folder
from deltareg.client.compat import read_base_config
from deltareg.client.dense import DenseDelta, is_dense_folder, main_dtype, read_dense_delta
from deltareg.client.errors import (
    AliasNotFound,
    AuditChainBroken,
    BaseMismatch,
    DigestMismatch,
    InvalidInput,
    MissingBlob,
    SignatureInvalid,
    SigningKeyNotFound,
)
from deltareg.client.fingerprint import (
    FingerprintCache,
    ModelFingerprint,
    fingerprint_path,
    is_fingerprint,
)
from deltareg.client.lineage import training_metadata
from deltareg.client.lora import check_against_base, read_peft_adapter
from deltareg.client.manifest import BaseModelRef, FileEntry, Manifest
from deltareg.client.outputs import refuse_existing_output
from deltareg.client.progress import TransferProgress, resolve_progress
from deltareg.client.refs import Reference, RepoName, validate_alias, validate_name_part
from deltareg.client.signing import (
    PublicKey,
    SigningKey,
    is_key_id,
    load_signing_key,
    resolve_trusted_keys,
    trusted_signer,
)
from deltareg.client.transfer import (
    BlobDownload,
    PartChecksums,
    Transfers,
    TransferSettings,
    UploadPlan,
    describe_blob,
)
from deltareg.client.weights import validate_safetensors_file

if TYPE_CHECKING:
    import torch

    from deltareg.client.apply import ApplyResult

VerifyMode = Literal["full", "touched"]
# Keys a pull trusts: PublicKey objects or public key text ("ed25519 <base64> [comment]" or PEM).
TrustedKeys = Sequence[PublicKey | str]
KeyFile = str | os.PathLike[str] | SigningKey
SEARCH_PAGE = 1000  # the registry's largest search page


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
    pushed_by: str | None = None
    yanked: dict[str, Any] | None = None  # at, reason, by: the version was yanked

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
            pushed_by=data.get("pushed_by"),
            yanked=data.get("yanked"),
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
            "pushed_by": self.pushed_by,
            "yanked": self.yanked,
        }


@dataclass(frozen=True)
class _DescribedFile:
    """A file of a delta being pushed: its manifest entry, and its part checksums for the upload plan."""

    entry: FileEntry
    parts: PartChecksums


@dataclass(frozen=True)
class PushResult:
    version: VersionInfo
    created: bool
    uploaded_blobs: int
    uploaded_bytes: int
    signature: dict[str, Any] | None = None  # with push(sign_key=...): the signature added


@dataclass(frozen=True)
class PulledDelta:
    """A verified local copy of a version (and of its ancestors, oldest first, when it has a parent)."""

    path: Path
    version: VersionRecord
    fingerprints: FingerprintCache | None = None
    ancestors: tuple[PulledDelta, ...] = ()

    @property
    def manifest(self) -> Manifest:
        return self.version.manifest

    def apply(self, model: torch.nn.Module | dict[str, torch.Tensor], *, verify: VerifyMode = "full") -> None:
        """Apply in place to a torch module or state dict; the base is checked before anything changes.

        A version with a parent applies its chain: the ancestors oldest first, then itself.
        """
        from deltareg.client.chain import apply_pulled

        apply_pulled(self, model, verify=verify)

    def apply_files(
        self,
        base: str | os.PathLike[str],
        output: str | os.PathLike[str],
        *,
        verify: VerifyMode = "full",
        expect: str | None = None,
    ) -> ApplyResult:
        """Write base + delta (its chain, for a version with a parent) to ``output`` file to file; nothing is
        written if the base does not match, or if the result's fingerprint is not ``expect`` (when given)."""
        from deltareg.client.chain import apply_pulled_files

        return apply_pulled_files(self, base, output, verify=verify, expect=expect)

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
        token: API token (default ``DELTAREG_TOKEN``, then the token stored for ``url`` in the credentials
            file, where ``deltareg serve`` puts the admin token it creates). Its name is who the registry
            records as acting.
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
        cache_dir: str | os.PathLike[str] | None = None,
        http: httpx.Client | None = None,
        progress: bool | TransferProgress | None = None,
        transfer_settings: TransferSettings | None = None,
    ) -> None:
        self.url = config.registry_url(url)
        self._http = http or make_client(self.url, config.registry_token(token, self.url))
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

    def resolve(self, ref: str | Reference, *, allow_yanked: bool = False) -> VersionInfo:
        """Resolve ``ns/name``, ``ns/name:N``, ``ns/name@alias`` or ``ns/name@sha256:…`` to a version.

        ``ns/name`` is the newest version that is not yanked. A yanked version named exactly (``:N``,
        ``@sha256:``) raises VersionYanked (with the reason) unless ``allow_yanked``; the flag changes
        nothing for an alias (never on a yanked version) or ``ns/name``.
        """
        reference = ref if isinstance(ref, Reference) else Reference.parse(ref)
        params = {"ref": str(reference)}
        if allow_yanked and (reference.version is not None or reference.digest is not None):
            params["allow_yanked"] = "true"
        info = VersionInfo.from_json(request_json(self._http, "GET", "/api/v1/resolve", params=params))
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
        datasets: Iterable[tuple[str, str | None]] | None = None,
        code_commit: str | None = None,
        hyperparameters: Mapping[str, str | bool | int | float] | None = None,
        sign_key: KeyFile | None = None,
    ) -> PushResult:
        """Push a delta folder as a new version of ``repo``: a PEFT LoRA adapter (kind ``lora``) or a dense
        delta written by ``deltareg diff`` (kind ``full``; the fingerprint of the tuned model it reproduces
        is recorded as the version's expected result for its dtype).

        Args:
            delta: the adapter folder as ``PeftModel.save_pretrained`` wrote it, or a ``diff`` output folder.
            repo: ``namespace/name``; created on first push.
            base: the base model (a safetensors file or folder) or its ``tmv1:`` fingerprint. With a model,
                every target tensor is checked (name and shape) and the touched tensors' digests are
                recorded so that a fast apply can check just those. A dense delta names the base it was
                computed from, and only that one is accepted.
            parent: a reference to the version this delta stacks on (not for a dense delta).
            evals: scores to record with the new version (metric name -> finite value).
            metadata: free-form training metadata (string keys other than the three below).
            datasets: the training datasets as (name, revision or None) pairs.
            code_commit: the commit of the training code.
            hyperparameters: name -> string, bool, int or finite float. These three are stored in the
                manifest's metadata under ``datasets``, ``code_commit`` and ``hyperparameters``.
            sign_key: a private key file (``deltareg key generate``) to sign the new version with, right
                after it is created (the key must be registered in the repo's namespace). The key file is
                read before anything is uploaded.

        Raises:
            InvalidAdapter, InvalidDelta, UnsafeFile, InvalidSafetensors: the folder is not acceptable.
            BaseMismatch: the delta does not fit the given base model.
            SigningKeyNotFound, InvalidInput: ``sign_key`` is not registered in the namespace, or was
                revoked (checked before anything is uploaded).
        """
        repo_name = RepoName.parse(repo)
        signer = _signing_key(sign_key) if sign_key is not None else None
        if signer is not None:
            self._check_key_usable(repo_name.namespace, signer.key_id)
        recorded = training_metadata(
            metadata, datasets=datasets, code_commit=code_commit, hyperparameters=hyperparameters
        )
        folder, kind, described, params, base_ref = self._read_delta(delta, base, base_name, base_revision)
        if kind == "full" and parent:
            raise InvalidInput(
                "a dense delta is the whole difference from its base model: push it without a parent"
            )
        manifest = Manifest(
            kind=kind,
            files=[blob.entry for blob in described],
            base=base_ref,
            params=params,
            parent=self.resolve(parent).digest if parent else None,
            metadata=recorded,
        )
        path = f"/api/v1/repos/{repo_name.namespace}/{repo_name.name}/versions"
        payload = {"manifest": manifest.to_json_obj(), "evals": _eval_list(evals)}
        uploaded, uploaded_bytes = self._upload_missing(folder, described)
        try:
            body = request_json(self._http, "POST", path, json=payload)
        except MissingBlob:
            # Garbage collection removed a blob between the upload plan and the commit (the server
            # refuses such a commit): upload what is missing again and commit once more.
            again, again_bytes = self._upload_missing(folder, described)
            uploaded, uploaded_bytes = uploaded + again, uploaded_bytes + again_bytes
            body = request_json(self._http, "POST", path, json=payload)
        info = VersionInfo.from_json(body)
        if kind == "full":
            # diff computed the tuned model's fingerprint, which is exactly what applying this delta yields.
            self.record_result(info.ref, params["result_dtype"], params["result_fingerprint"])
        signature = self.sign(info.ref, signer) if signer is not None else None
        return PushResult(info, bool(body.get("created")), uploaded, uploaded_bytes, signature)

    def _read_delta(
        self,
        delta: str | os.PathLike[str],
        base: str | os.PathLike[str],
        name: str | None,
        revision: str | None,
    ) -> tuple[Path, Literal["lora", "full"], list[_DescribedFile], dict[str, Any], BaseModelRef]:
        """The delta folder's kind, files (described), params and base reference, all checked."""
        if is_dense_folder(delta):
            dense = read_dense_delta(delta)
            base_ref = self._dense_base_ref(base, dense, name, revision)
            return (
                dense.folder,
                "full",
                self._describe_files(dense.folder, dense.files),
                dense.raw_params,
                base_ref,
            )
        adapter = read_peft_adapter(delta)
        base_ref = self._base_ref(base, adapter.targets, name, revision)
        return (
            adapter.folder,
            "lora",
            self._describe_files(adapter.folder, adapter.files),
            adapter.params(),
            base_ref,
        )

    def _dense_base_ref(
        self, base: str | os.PathLike[str], dense: DenseDelta, name: str | None, revision: str | None
    ) -> BaseModelRef:
        """A dense delta was computed from one exact base: ``base`` must be it (its fingerprint or model)."""
        text = os.fspath(base)
        expected = dense.params.base_fingerprint
        if is_fingerprint(text) and not Path(text).exists():
            if text != expected:
                raise BaseMismatch(f"this dense delta was computed from base {expected}, not {text}")
            return BaseModelRef(fingerprint=text, name=name, revision=revision)
        fingerprint = fingerprint_path(text, cache=self.fingerprints)
        if fingerprint.value != expected:
            raise BaseMismatch(
                f"{text} has fingerprint {fingerprint.value}, "
                f"but this dense delta was computed from {expected}"
            )
        targets = [t for t in dense.targets if not t.entry.is_new]
        touched = {t.base_tensor: fingerprint.tensors[t.base_tensor].digest for t in targets}
        return BaseModelRef(
            fingerprint=expected, name=name, revision=revision, tensors=touched, config=read_base_config(text)
        )

    def _base_ref(
        self, base: str | os.PathLike[str], targets: Any, name: str | None, revision: str | None
    ) -> BaseModelRef:
        text = os.fspath(base)
        if is_fingerprint(text) and not Path(text).exists():
            return BaseModelRef(fingerprint=text, name=name, revision=revision)
        fingerprint = fingerprint_path(text, cache=self.fingerprints)
        check_against_base(targets, fingerprint.tensors)
        touched = {t.base_tensor: fingerprint.tensors[t.base_tensor].digest for t in targets}
        return BaseModelRef(
            fingerprint=fingerprint.value,
            name=name,
            revision=revision,
            tensors=touched,
            config=read_base_config(text),
        )

    def _describe_files(self, folder: Path, paths: list[str]) -> list[_DescribedFile]:
        described = []
        for rel in sorted(paths):
            path = folder / rel
            if rel.endswith(".safetensors"):
                validate_safetensors_file(path)
            digest, parts = describe_blob(path, self.transfers.settings.part_bytes)
            entry = FileEntry(path=rel, digest=digest, size=path.stat().st_size)
            described.append(_DescribedFile(entry, parts))
        return described

    def _upload_missing(self, folder: Path, described: list[_DescribedFile]) -> tuple[int, int]:
        wanted = [
            {"digest": blob.entry.digest, "size": blob.entry.size, "parts": blob.parts.to_json_obj()}
            for blob in described
        ]
        answer = request_json(self._http, "POST", "/api/v1/blobs/uploads", json={"blobs": wanted})
        by_digest = {blob.entry.digest: blob.entry for blob in described}
        count = total = 0
        for blob in answer["blobs"]:
            plan = UploadPlan.from_json(blob)
            entry = by_digest[plan.digest]
            if self.transfers.upload(plan, folder / entry.path, label=entry.path):
                count, total = count + 1, total + entry.size
        return count, total

    # -- pull, verify, apply -------------------------------------------------------------------

    def pull(
        self,
        ref: str,
        *,
        output: str | os.PathLike[str] | None = None,
        allow_yanked: bool = False,
        require_signature: bool = False,
        trusted_keys: TrustedKeys | None = None,
    ) -> PulledDelta:
        """Download and verify a version (reusing the cache), optionally copying it to ``output``.

        The folder loads unchanged with ``PeftModel.from_pretrained``. The registry is asked first, so a
        yanked version is refused even when it is cached, unless named exactly with ``allow_yanked``.

        With ``require_signature``, the version (and every ancestor) must carry a signature that verifies
        here, under one of ``trusted_keys`` (default: the keys of the files ``DELTAREG_TRUSTED_KEYS``
        names); the registry's own check is not relied on. This is checked on every pull, before the
        version is downloaded or taken from the cache.

        Raises:
            DigestMismatch: a downloaded file does not match the manifest; nothing is kept.
            VersionYanked: the version (or an ancestor) is yanked and ``allow_yanked`` is off.
            SignatureInvalid: a signature is required and none verifies under a trusted key; nothing of
                that version is downloaded or marked valid in the cache.
            InvalidInput: a signature is required but no key is trusted.
        """
        info = self.resolve(ref, allow_yanked=allow_yanked)
        return self.pull_version(
            info,
            output=output,
            allow_yanked=allow_yanked,
            require_signature=require_signature,
            trusted_keys=trusted_keys,
        )

    def pull_version(
        self,
        info: VersionInfo,
        *,
        output: str | os.PathLike[str] | None = None,
        allow_yanked: bool = False,
        chain: bool = True,
        require_signature: bool = False,
        trusted_keys: TrustedKeys | None = None,
    ) -> PulledDelta:
        """``pull`` for a version already resolved.

        A version with a parent has its ancestors pulled too (unless ``chain`` is off), first: a yanked
        ancestor is refused with VersionYanked unless ``allow_yanked`` (see deltareg.client.chain), and
        with ``require_signature`` every ancestor must be signed by a trusted key as well.
        """
        from deltareg.client.chain import pull_ancestors

        trusted = resolve_trusted_keys(trusted_keys) if require_signature else None
        if trusted is not None:
            self.check_signed(info.repo, info.number, info.digest, trusted)
        ancestors = (
            pull_ancestors(self, info, allow_yanked=allow_yanked, trusted_keys=trusted) if chain else ()
        )
        record = VersionRecord(repo=info.repo, number=info.number, digest=info.digest, manifest=info.manifest)
        folder = self.cache.lookup(info.digest) or self.cache.install(record, self._fetcher(info))
        if output is not None:
            folder = copy_folder(folder, Path(output))
        return PulledDelta(path=folder, version=record, fingerprints=self.fingerprints, ancestors=ancestors)

    def _fetcher(self, info: VersionInfo) -> Any:
        located = self.transfers.locate([entry.digest for entry in info.manifest.files])

        def fetch(entry: FileEntry, dest: Path) -> None:
            # The manifest's size is the one to verify against, whatever the registry's URL answer says.
            blob = BlobDownload(entry.digest, entry.size, located[entry.digest].url)
            self.transfers.download(blob, dest, partials=self.partials, label=f"{info.ref} {entry.path}")

        return fetch

    def verify(
        self,
        target: str | os.PathLike[str],
        *,
        base: str | os.PathLike[str] | None = None,
        allow_yanked: bool = False,
        require_signature: bool = False,
        trusted_keys: TrustedKeys | None = None,
    ) -> VersionRecord:
        """Verify a pulled folder, or a reference (pulled first), and optionally the base model.

        ``require_signature`` / ``trusted_keys``: as for ``pull``; for a folder, the version it holds (not
        its ancestors) must be signed, as the registry lists its signatures, verified here.

        Raises:
            DigestMismatch, BaseMismatch, SignatureInvalid: something does not verify (CLI exit code 3).
        """
        folder = Path(target)
        if folder.is_dir():
            record = verify_folder(folder)
            if require_signature:
                trusted = resolve_trusted_keys(trusted_keys)
                self.check_signed(record.repo, record.number, record.digest, trusted)
        else:
            pulled = self.pull(
                os.fspath(target),
                allow_yanked=allow_yanked,
                require_signature=require_signature,
                trusted_keys=trusted_keys,
            )
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
        allow_yanked: bool = False,
        expect: str | None = None,
        require_signature: bool = False,
        trusted_keys: TrustedKeys | None = None,
    ) -> ApplyResult:
        """Pull ``ref`` and write base + delta to ``output`` (nothing is written on a wrong base).

        ``expect``: the fingerprint the merged model must have (ResultMismatch, nothing written, if not);
        ``"recorded"`` takes the one recorded on the version for the base's dtype (InvalidInput if none).
        ``require_signature`` / ``trusted_keys``: as for ``pull`` (SignatureInvalid, nothing written).
        """
        out = Path(output)
        refuse_existing_output(out)
        pulled = self.pull(
            ref, allow_yanked=allow_yanked, require_signature=require_signature, trusted_keys=trusted_keys
        )
        if expect == "recorded":
            expect = self._recorded_result(pulled, base)
        return pulled.apply_files(base, out, verify=verify, expect=expect)

    def _recorded_result(self, pulled: PulledDelta, base: str | os.PathLike[str]) -> str:
        dtype = main_dtype(fingerprint_path(base, cache=self.fingerprints).tensors)
        ref = f"{pulled.version.repo}:{pulled.version.number}"
        recorded = self.expected_results(ref)
        if dtype not in recorded:
            known = ", ".join(sorted(recorded)) or "none"
            raise InvalidInput(
                f"{ref} has no recorded result for a {dtype} base (recorded: {known}); "
                "record one with deltareg result record, or pass the fingerprint to expect"
            )
        return recorded[dtype]

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
        # A yanked version named exactly is resolved, so that the registry refuses (and audits) the move.
        version = self.resolve(reference, allow_yanked=True)
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

    # -- alias history and audit ---------------------------------------------------------------

    def alias_history(self, repo: str, alias: str, *, limit: int = 100) -> list[dict[str, Any]]:
        """The moves of ``alias`` of ``repo``, newest first (kind, from/to version, reason, actor, at)."""
        repo_name = RepoName.parse(repo)
        validate_alias(alias)
        path = f"{self._alias_path(repo_name, alias)}/history"
        return list(request_json(self._http, "GET", path, params={"limit": limit})["moves"])

    def alias_at(self, repo: str, alias: str, at: datetime) -> VersionInfo:
        """The version ``alias`` of ``repo`` pointed to at time ``at`` (timezone-aware), yanked or not.

        Raises:
            AliasNotFound: the alias did not exist at that time.
        """
        repo_name = RepoName.parse(repo)
        validate_alias(alias)
        if at.tzinfo is None:
            raise InvalidInput("the time must be timezone-aware (e.g. datetime.now(UTC))")
        path = f"{self._alias_path(repo_name, alias)}/at"
        found = request_json(self._http, "GET", path, params={"time": at.isoformat()})
        version = f"/api/v1/repos/{repo_name.namespace}/{repo_name.name}/versions/{found['version']}"
        return VersionInfo.from_json(request_json(self._http, "GET", version))

    def audit(
        self, repo: str | None = None, *, limit: int = 100, before_id: int | None = None
    ) -> dict[str, Any]:
        """A page of the audit log, newest first: ``entries`` and ``next_before_id`` for the next page."""
        params: dict[str, Any] = {"limit": limit}
        if repo is not None:
            params["repo"] = str(RepoName.parse(repo))
        if before_id is not None:
            params["before_id"] = before_id
        return dict(request_json(self._http, "GET", "/api/v1/audit", params=params))

    def verify_audit(self) -> dict[str, Any]:
        """Have the registry recompute the audit log's hash chain.

        Returns the report (``entries`` checked, ``head_hash``) when the chain is intact.

        Raises:
            AuditChainBroken: naming the first entry that does not match (CLI exit code 3).
        """
        report = dict(request_json(self._http, "GET", "/api/v1/audit/verify"))
        if not report["ok"]:
            broken = report["first_broken"]
            raise AuditChainBroken(
                f"audit log entry {broken['id']} does not verify: {broken['problem']} "
                f"({report['entries'] - 1} entries before it are intact)"
            )
        return report

    # -- evals and search ----------------------------------------------------------------------

    def eval(
        self,
        ref: str | Reference,
        scores: Mapping[str, float],
        *,
        dataset: str | None = None,
        dataset_revision: str | None = None,
        suite: str | None = None,
    ) -> dict[str, Any]:
        """Record scores on the version ``ref`` names (yanked versions too, when named by number).

        Args:
            ref: the version (``ns/name:N``; ``ns/name``, ``@alias`` and ``@sha256:…`` are resolved first).
            scores: metric name -> finite value (at least one, at most 64).
            dataset, dataset_revision: what the scores were measured on.
            suite: the eval suite's version.

        Returns:
            ``repo``, ``number``, ``digest`` and the recorded ``evals`` (with ``actor`` and ``created_at``).

        Raises:
            InvalidInput: no scores, or a value that is not finite (nothing is recorded).
            RepoNotFound, VersionNotFound: the version does not exist.
        """
        reference = ref if isinstance(ref, Reference) else Reference.parse(ref)
        if not scores:
            raise InvalidInput("no scores given: pass at least one NAME=VALUE")
        extra = {"dataset": dataset, "dataset_revision": dataset_revision, "suite_version": suite}
        items = [{**item, **extra} for item in _eval_list(scores)]
        number = reference.version if reference.version is not None else self.resolve(reference).number
        repo = reference.repo
        path = f"/api/v1/repos/{repo.namespace}/{repo.name}/versions/{number}/evals"
        return dict(request_json(self._http, "POST", path, json={"evals": items}))

    def search(
        self,
        *,
        repo: str | None = None,
        namespace: str | None = None,
        base: str | None = None,
        where: Sequence[str] = (),
        dataset: str | None = None,
        alias: str | None = None,
        include_yanked: bool = False,
        limit: int | None = 100,
    ) -> list[dict[str, Any]]:
        """Versions matching every filter given, newest first (each with its ``evals`` and ``matched``).

        Args:
            repo: ``namespace/name``; or ``namespace`` for all of its repositories.
            base: a ``tmv1:`` base fingerprint.
            where: conditions like ``accuracy>=0.8`` (ops >=, <=, >, <, =): the version's newest score of
                the metric (on ``dataset``, if given) must satisfy each.
            dataset: versions with a score on this dataset; also scopes ``where`` to it.
            alias: versions that an alias of this name points to now.
            include_yanked: yanked versions are left out unless this is set.
            limit: at most this many versions (None: all), fetched a page at a time.
        """
        params: dict[str, Any] = {"where": list(where), "include_yanked": include_yanked}
        optional = {"repo": repo, "namespace": namespace, "base": base, "dataset": dataset, "alias": alias}
        params.update({key: value for key, value in optional.items() if value is not None})
        found: list[dict[str, Any]] = []
        cursor: str | None = None
        while limit is None or len(found) < limit:
            page_size = SEARCH_PAGE if limit is None else min(SEARCH_PAGE, limit - len(found))
            page_params = {**params, "limit": page_size, **({"cursor": cursor} if cursor else {})}
            page = request_json(self._http, "GET", "/api/v1/versions", params=page_params)
            found.extend(page["versions"])
            cursor = page.get("next_cursor")
            if not cursor:
                break
        return found

    # -- lineage -------------------------------------------------------------------------------

    def lineage(self, ref: str, *, depth: int | None = None, manifests: bool = False) -> dict[str, Any]:
        """The lineage graph of ``ref``: ``root``, ``nodes``, ``edges`` (parent -> child digests),
        ``ancestors`` (nearest first), ``descendants`` (breadth-first, ``depth`` levels) and ``truncated``.

        ``manifests`` adds the manifests of the root and its ancestors to their nodes.
        """
        params: dict[str, Any] = {"ref": str(Reference.parse(ref))}
        if depth is not None:
            params["depth"] = depth
        if manifests:
            params["manifests"] = "true"
        return dict(request_json(self._http, "GET", "/api/v1/lineage", params=params))

    # -- policies, approvals, rollback, yank ---------------------------------------------------

    def set_policy(self, repo: str, alias: str, policy: Mapping[str, Any]) -> dict[str, Any]:
        """Set (or replace) the promotion policy of ``alias`` of ``repo``.

        ``policy``: ``min`` / ``max`` (metric -> value), ``no_regression`` (``[{"metric", "tolerance",
        "higher_is_better"}]``), ``approvals`` (count), ``require_signature`` (bool); at least one rule.
        """
        return dict(request_json(self._http, "PUT", self._policy_path(repo, alias), json=dict(policy)))

    def policy(self, repo: str, alias: str) -> dict[str, Any]:
        """The policy of ``alias`` (``repo``, ``alias``, ``policy``, ``updated_by``, ``updated_at``)."""
        return dict(request_json(self._http, "GET", self._policy_path(repo, alias)))

    def policies(self, repo: str) -> list[dict[str, Any]]:
        """Every policy of ``repo``, by alias."""
        repo_name = RepoName.parse(repo)
        path = f"/api/v1/repos/{repo_name.namespace}/{repo_name.name}/policies"
        return list(request_json(self._http, "GET", path)["policies"])

    def clear_policy(self, repo: str, alias: str) -> dict[str, Any]:
        """Remove the policy of ``alias`` (NotFound if it has none); returns the removed policy."""
        return dict(request_json(self._http, "DELETE", self._policy_path(repo, alias)))

    def approve(self, ref: str, alias: str, *, comment: str | None = None) -> dict[str, Any]:
        """Approve moving ``alias`` to the version ``ref`` names, as this client's token.

        Returns the approval with ``created`` (false: this actor had approved already, nothing changed).

        Raises:
            PermissionDenied: the actor pushed the version, or is anonymous.
        """
        validate_alias(alias)
        path = self._version_path(ref, "approvals")
        return dict(request_json(self._http, "POST", path, json={"alias": alias, "comment": comment}))

    def approvals(self, ref: str, *, alias: str | None = None) -> list[dict[str, Any]]:
        """The approvals of the version ``ref`` names (of one alias, if given), oldest first."""
        params = {"alias": validate_alias(alias)} if alias is not None else None
        path = self._version_path(ref, "approvals")
        return list(request_json(self._http, "GET", path, params=params)["approvals"])

    def rollback(
        self,
        repo: str,
        alias: str,
        *,
        to: int | None = None,
        reason: str | None = None,
        expected: int | None | Literal["current"] = "current",
    ) -> dict[str, Any]:
        """Move ``alias`` back to its previous holder that is not yanked, or to version ``to``.

        ``expected`` (default: read the current holder first) makes a concurrent move fail with Conflict
        instead of being rolled back too. Returns the alias as moved (``previous``: where it was).
        """
        repo_name = RepoName.parse(repo)
        validate_alias(alias)
        if expected == "current":
            expected = self._alias_holder(repo_name, alias)
        body = {"to": to, "reason": reason, "expected": expected}
        path = self._alias_path(repo_name, alias) + "/rollback"
        return dict(request_json(self._http, "POST", path, json=body))

    def yank(self, ref: str, reason: str, *, rollback: bool = False) -> dict[str, Any]:
        """Yank the version ``ref`` names (``ns/name:N``, ``@sha256:...`` or ``@alias``), with a reason.

        With ``rollback``, every alias pointing to it rolls back to its previous holder that is not
        yanked; without, a yank of an alias holder is refused (Conflict naming the aliases).
        """
        reference = Reference.parse(ref)
        if reference.version is None and reference.digest is None and reference.alias is None:
            raise InvalidInput(f"name the version to yank: {ref}:N, {ref}@sha256:... or {ref}@ALIAS")
        path = self._version_path(reference, "yank")
        return dict(request_json(self._http, "POST", path, json={"reason": reason, "rollback": rollback}))

    # -- expected results ----------------------------------------------------------------------

    def record_result(self, ref: str | Reference, base_dtype: str, fingerprint: str) -> dict[str, Any]:
        """Record ``fingerprint`` (``tmv1:…``) as the model the version ``ref`` names yields when applied
        to its base in ``base_dtype`` (BF16, F16, F32 or F64; yanked versions too, when named exactly).

        Returns the record: ``repo``, ``number``, ``digest``, ``base_dtype``, ``fingerprint``, ``actor``,
        ``created_at`` and ``created`` (false: this fingerprint was recorded before, nothing changed).

        Raises:
            InvalidInput: a malformed fingerprint or an unknown dtype (nothing is recorded).
            Conflict: the dtype already has a different fingerprint (results are immutable).
            RepoNotFound, VersionNotFound: the version does not exist.
        """
        dtype = base_dtype.upper()
        if not (dtype.isascii() and dtype.isalnum()):
            raise InvalidInput(f"unknown base dtype {base_dtype!r}: expected BF16, F16, F32 or F64")
        if not is_fingerprint(fingerprint):
            raise InvalidInput(
                f"invalid fingerprint {fingerprint!r}: expected 'tmv1:' followed by 64 lower-case hex digits"
            )
        path = self._version_path(ref, f"results/{dtype}")
        return dict(request_json(self._http, "PUT", path, json={"fingerprint": fingerprint}))

    def expected_results(self, ref: str | Reference) -> dict[str, str]:
        """The recorded result fingerprints of the version ``ref`` names: base dtype -> ``tmv1:…``
        (empty when none was recorded)."""
        return {item["base_dtype"]: item["fingerprint"] for item in self.results(ref)}

    def results(self, ref: str | Reference) -> list[dict[str, Any]]:
        """The recorded results of the version ``ref`` names, by dtype: ``base_dtype``, ``fingerprint``,
        ``actor``, ``created_at``."""
        return list(request_json(self._http, "GET", self._version_path(ref, "results"))["results"])

    # -- tokens --------------------------------------------------------------------------------

    def create_token(
        self,
        name: str,
        scopes: Sequence[str],
        *,
        namespaces: Sequence[str] = ("*",),
        expires_in_days: int | None = 90,
    ) -> dict[str, Any]:
        """Create an API token (needs an admin token). The answer's ``token`` is the secret, shown once.

        ``name`` is who the token is (the actor its writes record); ``scopes`` from read, write, promote,
        admin; ``namespaces`` patterns ("*", "acme", "team-*"); ``expires_in_days`` None: never.
        """
        body = {
            "name": name,
            "scopes": list(scopes),
            "namespaces": list(namespaces),
            "expires_in_days": expires_in_days,
        }
        return dict(request_json(self._http, "POST", "/api/v1/tokens", json=body))

    def tokens(self) -> list[dict[str, Any]]:
        """Every token (needs an admin token): never secrets."""
        return list(request_json(self._http, "GET", "/api/v1/tokens")["tokens"])

    def revoke_token(self, token_id: int) -> dict[str, Any]:
        """Revoke a token (needs an admin token); it is refused from its next request on."""
        return dict(request_json(self._http, "POST", f"/api/v1/tokens/{int(token_id)}/revoke"))

    def whoami(self) -> dict[str, Any]:
        """The name, scopes and namespaces of this client's token (``anonymous`` without one)."""
        return dict(request_json(self._http, "GET", "/api/v1/whoami"))

    # -- signing -------------------------------------------------------------------------------

    def sign(self, ref: str | Reference, key: KeyFile) -> dict[str, Any]:
        """Sign the manifest digest of the version ``ref`` names with ``key`` (a private key file or a
        loaded SigningKey) and add the signature; the registry verifies it against the key registered in
        the repo's namespace. Signing again with the same key changes nothing (``created`` false).

        Returns the record: ``repo``, ``number``, ``digest``, ``key_id``, ``signature``, ``actor``,
        ``created_at``, ``created``.

        Raises:
            SigningKeyNotFound: the key is not registered in the namespace.
            InvalidInput: the key file is not a private key, or the key was revoked.
        """
        signer = _signing_key(key)
        info = self.resolve(ref, allow_yanked=True)
        body = {"key_id": signer.key_id, "signature": signer.sign(info.digest)}
        return dict(request_json(self._http, "POST", _signatures_path(info.repo, info.number), json=body))

    def signatures(self, ref: str | Reference) -> list[dict[str, Any]]:
        """The signatures of the version ``ref`` names, oldest first: ``key_id``, ``signature``, ``actor``,
        ``created_at``, ``key_revoked``. As the registry says: ``check_signed`` verifies them here."""
        return list(request_json(self._http, "GET", self._version_path(ref, "signatures"))["signatures"])

    def check_signed(self, repo: str, number: int, digest: str, trusted: Sequence[PublicKey]) -> PublicKey:
        """The trusted key a signature of version ``number`` of ``repo`` verifies under, for ``digest``
        (checked here; the registry's answer is only where the signatures come from).

        Raises:
            SignatureInvalid: no signature verifies under a trusted key.
        """
        entries = request_json(self._http, "GET", _signatures_path(repo, number))["signatures"]
        signer = trusted_signer(digest, entries, trusted)
        if signer is not None:
            return signer
        if not entries:
            raise SignatureInvalid(
                f"{repo}:{number} ({digest}) is not signed, and a signature by a trusted key is required"
            )
        keys = sorted(
            {
                str(entry.get("key_id")) + (" (revoked)" if entry.get("key_revoked") else "")
                for entry in entries
            }
        )
        raise SignatureInvalid(
            f"{repo}:{number} ({digest}) has no valid signature by a trusted key (signed by "
            f"{', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''}; trusted: "
            f"{', '.join(key.key_id for key in trusted[:5])}{', ...' if len(trusted) > 5 else ''})"
        )

    def _check_key_usable(self, namespace: str, key_id: str) -> None:
        """Before a signed push uploads anything: the key is registered in the namespace, not revoked."""
        found = next((key for key in self.keys(namespace) if key["key_id"] == key_id), None)
        if found is None:
            raise SigningKeyNotFound(
                f"namespace {namespace} has no key {key_id}; register it with deltareg key register "
                "(nothing was pushed)"
            )
        if found["revoked_at"] is not None:
            raise InvalidInput(f"key {key_id} of namespace {namespace} was revoked (nothing was pushed)")

    def register_key(
        self, namespace: str, public_key: str | PublicKey, name: str | None = None
    ) -> dict[str, Any]:
        """Register a public key (``ed25519 <base64> [comment]``, PEM, or a PublicKey) in ``namespace``;
        its signatures then count for the namespace's repos. ``name`` defaults to the key's comment.

        Returns the key: ``namespace``, ``key_id``, ``public_key``, ``name``, ``actor``, ``created_at``,
        ``revoked_at``, ``revoked_by``, ``created`` (false: it was registered before).

        Raises:
            InvalidInput: not an Ed25519 public key.
            Conflict: the key was revoked in the namespace.
        """
        key = public_key if isinstance(public_key, PublicKey) else PublicKey.parse(public_key)
        body = {"public_key": key.base64, "name": name if name is not None else key.comment}
        return dict(request_json(self._http, "POST", _keys_path(namespace), json=body))

    def keys(self, namespace: str) -> list[dict[str, Any]]:
        """The keys registered in ``namespace``, oldest first, revoked ones included."""
        return list(request_json(self._http, "GET", _keys_path(namespace))["keys"])

    def revoke_key(self, namespace: str, key_id: str) -> dict[str, Any]:
        """Revoke a key of ``namespace``: its signatures no longer satisfy a policy's signature rule.

        Raises:
            SigningKeyNotFound: the namespace has no such key.
        """
        if not is_key_id(key_id):
            raise InvalidInput(f"invalid key id {key_id!r}: expected 'ed25519:' followed by 32 hex digits")
        path = f"{_keys_path(namespace)}/{key_id}/revoke"
        return dict(request_json(self._http, "POST", path))

    # -- webhooks ------------------------------------------------------------------------------

    def add_webhook(
        self, repo: str, url: str, *, events: Sequence[str] | None = None, secret: str | None = None
    ) -> dict[str, Any]:
        """Register ``url`` to receive events of ``repo`` (needs admin on its namespace): ``push``,
        ``eval``, ``alias.promote``, ``alias.rollback``, ``yank`` (default: all).

        Returns the webhook with its ``secret`` (``secret`` given, or generated): shown this once, it
        keys the ``X-Deltareg-Signature`` of every delivery.

        Raises:
            InvalidInput: not an http(s) URL, an unknown event, a secret under 16 characters.
        """
        body: dict[str, Any] = {"url": url}
        if events:
            body["events"] = list(events)
        if secret is not None:
            body["secret"] = secret
        return dict(request_json(self._http, "POST", _webhooks_path(repo), json=body))

    def webhooks(self, repo: str) -> list[dict[str, Any]]:
        """The active webhooks of ``repo``, oldest first: ``id``, ``url``, ``events``, ... (no secrets)."""
        return list(request_json(self._http, "GET", _webhooks_path(repo))["webhooks"])

    def remove_webhook(self, repo: str, webhook_id: int) -> dict[str, Any]:
        """Stop sending to webhook ``webhook_id`` of ``repo`` (NotFound if it has none such)."""
        return dict(request_json(self._http, "DELETE", f"{_webhooks_path(repo)}/{int(webhook_id)}"))

    def webhook_deliveries(self, repo: str, webhook_id: int, *, limit: int = 100) -> list[dict[str, Any]]:
        """The newest deliveries of a webhook: ``id``, ``event``, ``status`` (pending, delivered, failed),
        ``attempts``, ``last_status_code``, ``last_error``, times."""
        path = f"{_webhooks_path(repo)}/{int(webhook_id)}/deliveries"
        return list(request_json(self._http, "GET", path, params={"limit": limit})["deliveries"])

    def _policy_path(self, repo: str, alias: str) -> str:
        return self._alias_path(RepoName.parse(repo), validate_alias(alias)) + "/policy"

    def _version_path(self, ref: str | Reference, suffix: str) -> str:
        """``/api/v1/repos/<ns>/<name>/versions/<N>/<suffix>`` for the version ``ref`` names (a yanked
        one too, so the registry's own answer says what is wrong with it)."""
        reference = ref if isinstance(ref, Reference) else Reference.parse(ref)
        number = reference.version or self.resolve(reference, allow_yanked=True).number
        return f"/api/v1/repos/{reference.repo.namespace}/{reference.repo.name}/versions/{number}/{suffix}"


def _signing_key(key: KeyFile) -> SigningKey:
    return key if isinstance(key, SigningKey) else load_signing_key(key)


def _keys_path(namespace: str) -> str:
    return f"/api/v1/namespaces/{validate_name_part(namespace, 'namespace')}/keys"


def _signatures_path(repo: str, number: int) -> str:
    repo_name = RepoName.parse(repo)
    return f"/api/v1/repos/{repo_name.namespace}/{repo_name.name}/versions/{number}/signatures"


def _webhooks_path(repo: str) -> str:
    repo_name = RepoName.parse(repo)
    return f"/api/v1/repos/{repo_name.namespace}/{repo_name.name}/webhooks"
