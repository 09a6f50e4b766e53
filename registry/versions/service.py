"""Version rules: pushing an immutable, verified version; reading repos and versions; resolving refs."""

from __future__ import annotations

import json

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from deltareg.client.errors import (
    AliasNotFound,
    Conflict,
    InvalidInput,
    InvalidManifest,
    MissingBlob,
    VersionNotFound,
    VersionYanked,
)
from deltareg.client.lineage import check_recorded
from deltareg.client.manifest import Manifest
from deltareg.client.refs import Reference, RepoName, validate_name_part
from deltareg.registry.aliases.repository import AliasRepository
from deltareg.registry.aliases.service import AliasService
from deltareg.registry.audit.repository import AuditRepository
from deltareg.registry.blobs.repository import BlobRepository
from deltareg.registry.evals.repository import EvalRepository
from deltareg.registry.evals.schemas import EvalIn, eval_out
from deltareg.registry.models import Repo, Version, VersionFile
from deltareg.registry.storage import BlobStore
from deltareg.registry.versions.contents import ContentChecker
from deltareg.registry.versions.repository import RepoRepository, SizedVersion, VersionRepository
from deltareg.registry.versions.schemas import (
    AliasRolledBack,
    RepoDetail,
    RepoList,
    RepoSummary,
    VersionCreated,
    VersionOut,
    VersionSummary,
    YankOut,
    YankRequest,
    YankResult,
)


class VersionService:
    def __init__(self, session: Session, store: BlobStore) -> None:
        self.session = session
        self.repos = RepoRepository(session)
        self.versions = VersionRepository(session)
        self.evals = EvalRepository(session)
        self.aliases = AliasRepository(session)
        self.audit = AuditRepository(session)
        self.contents = ContentChecker(BlobRepository(session), store)

    # ---- writes

    def push(
        self,
        namespace: str,
        name: str,
        manifest_json: dict[str, object],
        evals: list[EvalIn] | None = None,
        *,
        actor: str,
    ) -> VersionCreated:
        """Record a version of ``namespace/name``; pushing the same manifest again returns that version.

        ``evals`` are recorded with a new version only: an identical re-push is a retry, not a new score.
        A new version is appended to the audit log in the same transaction.
        """
        repo_name = RepoName(validate_name_part(namespace, "namespace"), validate_name_part(name, "name"))
        manifest = Manifest.parse(manifest_json)
        existing = self._existing(repo_name, manifest.digest)
        if existing is not None:
            return existing
        # Everything is checked before anything is written: a rejected push leaves no trace.
        _check_training_metadata(manifest)
        self.contents.check(manifest)
        self._check_parent(manifest)
        repo = self.repos.get_or_create(repo_name.namespace, repo_name.name)
        self.repos.lock(repo.id)
        # Re-check under the lock: an identical push may have committed since the first look.
        again = self.versions.by_digest(repo.id, manifest.digest)
        if again is not None:
            return self._created(repo, again, created=False)
        try:
            version = self._record(repo, manifest, actor)
        except IntegrityError as exc:
            raise _missing_blob_or(exc) from exc
        recorded = self.evals.add(version.id, evals or [], actor=actor)
        self.audit.append(
            actor=actor,
            action="push",
            target=f"{repo.full_name}:{version.number}",
            repo=repo.full_name,
            details={
                "version": version.number,
                "digest": version.digest,
                "base_fingerprint": version.base_fingerprint,
                "parent": version.parent_digest,
                "evals": [{"name": e.name, "value": e.value, "dataset": e.dataset} for e in recorded],
            },
        )
        return self._created(repo, (version, sum(f.size for f in manifest.files)), created=True)

    def _existing(self, repo_name: RepoName, digest: str) -> VersionCreated | None:
        repo = self.repos.get(repo_name.namespace, repo_name.name)
        found = None if repo is None else self.versions.by_digest(repo.id, digest)
        return None if repo is None or found is None else self._created(repo, found, created=False)

    def _check_parent(self, manifest: Manifest) -> None:
        if manifest.parent is None:
            return
        parent = self.versions.find_in_any_repo(manifest.parent)
        if parent is None:
            raise InvalidManifest(f"parent {manifest.parent} is not a version in this registry")
        if parent.base_fingerprint != manifest.base.fingerprint:
            raise InvalidManifest(
                f"parent {manifest.parent} applies to base {parent.base_fingerprint}, "
                f"not {manifest.base.fingerprint}"
            )

    def _record(self, repo: Repo, manifest: Manifest, actor: str) -> Version:
        version = Version(
            repo_id=repo.id,
            number=self.repos.allocate_version_number(repo.id),
            digest=manifest.digest,
            manifest=manifest.canonical_bytes().decode("utf-8"),
            kind=manifest.kind,
            base_fingerprint=manifest.base.fingerprint,
            parent_digest=manifest.parent,
            pushed_by=actor,
        )
        files = [VersionFile(path=f.path, blob_digest=f.digest, size=f.size) for f in manifest.files]
        self.versions.add(version, files)
        return version

    def yank(self, namespace: str, name: str, number: int, request: YankRequest, *, actor: str) -> YankResult:
        """Mark version ``number`` bad with a reason; it stays readable, but no alias may point to it.

        An alias pointing to it makes the yank 409 unless ``request.rollback``: then each such alias rolls
        back to its previous holder that is not yanked (a ``rollback`` move and an ``alias.rollback``
        audit entry each), and if one has none the whole yank is refused. Audited as ``yank``.

        Raises:
            Conflict: already yanked (the message gives the earlier reason); held by an alias without
                ``rollback``; an alias with no previous holder to roll back to.
        """
        repo = self.repos.require(namespace, name)
        found = self.versions.by_number(repo.id, number)
        if found is None:
            raise VersionNotFound(f"{repo.full_name} has no version {number}")
        version = found[0]
        # The UPDATE locks the row first: a move to this version waits for the yank, or is seen below.
        if not self.versions.mark_yanked(version.id, reason=request.reason, actor=actor):
            raise _already_yanked(repo, self.versions.lock_shared(version.id))
        version = self.versions.lock_shared(version.id)
        holders = self.aliases.pointing_to(repo.id, version.id)
        if holders and not request.rollback:
            names = ", ".join(holders)
            raise Conflict(
                f"cannot yank {repo.full_name}:{number}: alias{'es' if len(holders) > 1 else ''} {names} "
                f"point{'' if len(holders) > 1 else 's'} to it and an alias cannot point to a yanked "
                "version; pass rollback=true (--rollback) to roll each back to its previous holder that "
                "is not yanked, or move them first; nothing changed"
            )
        alias_service = AliasService(self.session)
        reason = f"yank of version {number}: {request.reason}"
        try:
            done = [
                alias_service.roll_back(repo, alias, version, to=None, reason=reason, actor=actor)
                for alias in holders
            ]
        except Conflict as exc:
            raise Conflict(f"cannot yank {repo.full_name}:{number}: {exc.message}") from None
        # Audited last, once every move is made (the audit lock is held until commit).
        for rolled in done:
            alias_service.audit_rollback(repo, rolled, actor=actor, yanked=number)
        yanked = yank_out(version)
        assert yanked is not None
        self.audit.append(
            actor=actor,
            action="yank",
            target=f"{repo.full_name}:{number}",
            repo=repo.full_name,
            details={
                "version": number,
                "digest": version.digest,
                "reason": request.reason,
                "rolled_back": [
                    {"alias": r.alias, "from": r.source.number, "to": r.target.number} for r in done
                ],
            },
        )
        return YankResult(
            repo=repo.full_name,
            number=number,
            digest=version.digest,
            yanked=yanked,
            rolled_back=[
                AliasRolledBack(alias=r.alias, previous=r.source.number, version=r.target.number)
                for r in done
            ],
        )

    # ---- reads

    def list_repos(self, namespace: str | None) -> RepoList:
        """All repos (of one namespace, if given), sorted by name."""
        if namespace is not None:
            validate_name_part(namespace, "namespace")
        rows = self.repos.list_with_counts(namespace)
        return RepoList(
            repos=[
                RepoSummary(name=repo.full_name, versions=count, latest=latest, created_at=repo.created_at)
                for repo, count, latest in rows
            ]
        )

    def show_repo(self, namespace: str, name: str) -> RepoDetail:
        """A repo and its versions, newest first."""
        repo = self.repos.require(namespace, name)
        versions = [_summary(repo, sized) for sized in self.versions.newest_first(repo.id)]
        return RepoDetail(name=repo.full_name, created_at=repo.created_at, versions=versions)

    def get_version(self, namespace: str, name: str, number: int) -> VersionOut:
        """Version ``number`` of ``namespace/name``, yanked or not (it stays readable for audit)."""
        ref = Reference(RepoName.parse(f"{namespace}/{name}"), version=number)
        return self.resolve(ref, allow_yanked=True)

    def resolve(self, ref: Reference, *, allow_yanked: bool = False) -> VersionOut:
        """The version a reference names (newest not yanked, by number, by manifest digest, by alias).

        ``allow_yanked`` matters only for a version named exactly (``:N``, ``@sha256:...``): an alias never
        points to a yanked version, and ``ns/name`` is the newest version that is not yanked, always.

        Raises:
            VersionYanked: a version named exactly is yanked and ``allow_yanked`` is false; or every
                version of the repo is yanked (``ns/name``).
        """
        repo = self.repos.require(ref.repo.namespace, ref.repo.name)
        if ref.alias is not None:
            holder = self.aliases.get(repo.id, ref.alias)
            if holder is None:
                raise AliasNotFound(f"alias {ref.alias!r} is not defined on {ref.repo}")
            found = self.versions.by_number(repo.id, holder[1].number)
            missing = f"alias {ref.alias!r} of {ref.repo} points to a missing version"
        elif ref.version is not None:
            found = self.versions.by_number(repo.id, ref.version)
            missing = f"{ref.repo} has no version {ref.version}"
        elif ref.digest is not None:
            found = self.versions.by_digest(repo.id, ref.digest)
            missing = f"{ref.repo} has no version with manifest digest {ref.digest}"
        else:
            found, missing = self._newest_not_yanked(repo), ""
        if found is None:
            raise VersionNotFound(missing)
        if found[0].yanked_at is not None and not allow_yanked:
            raise _yanked(repo, found[0], "pass allow_yanked=true / --allow-yanked to pull it anyway")
        return self._full(repo, found)

    def _newest_not_yanked(self, repo: Repo) -> SizedVersion:
        found = self.versions.latest_not_yanked(repo.id)
        if found is not None:
            return found
        newest = self.versions.latest(repo.id)
        if newest is None:
            raise VersionNotFound(f"{repo.full_name} has no versions yet")
        raise _yanked(
            repo,
            newest[0],
            f"every version of {repo.full_name} is yanked; name one exactly with "
            "allow_yanked=true / --allow-yanked to pull it anyway",
        )

    def _full(self, repo: Repo, sized: SizedVersion) -> VersionOut:
        version = sized[0]
        evals = [eval_out(e) for e in self.evals.for_version(version.id)]
        return VersionOut(
            **_summary(repo, sized).model_dump(), manifest=json.loads(version.manifest), evals=evals
        )

    def _created(self, repo: Repo, sized: SizedVersion, *, created: bool) -> VersionCreated:
        return VersionCreated(**self._full(repo, sized).model_dump(), created=created)


def _check_training_metadata(manifest: Manifest) -> None:
    """The well-known training metadata keys (datasets, code_commit, hyperparameters), well formed."""
    try:
        check_recorded(manifest.metadata)
    except InvalidInput as exc:
        raise InvalidManifest(f"manifest metadata: {exc.message}") from None


def _missing_blob_or(exc: IntegrityError) -> Exception:
    """A version file whose blob row vanished after the content check: garbage collection removed it.

    The foreign key from version_files to blobs refuses the insert (PostgreSQL; SQLite serializes
    writers, so its check cannot be overtaken). The client uploads the blob again and retries.
    """
    if "fk_version_files_blob_digest_blobs" in str(exc.orig) or "FOREIGN KEY" in str(exc.orig):
        return MissingBlob(
            "a blob of this version was removed by garbage collection while the version was being "
            "committed; upload it again and retry the push"
        )
    return exc


def _summary(repo: Repo, sized: SizedVersion) -> VersionSummary:
    version, size = sized
    return VersionSummary(
        repo=repo.full_name,
        number=version.number,
        digest=version.digest,
        kind=version.kind,
        base_fingerprint=version.base_fingerprint,
        parent=version.parent_digest,
        created_at=version.created_at,
        size=size,
        pushed_by=version.pushed_by,
        yanked=yank_out(version),
    )


def _yanked(repo: Repo, version: Version, hint: str) -> VersionYanked:
    by = f" by {version.yanked_by}" if version.yanked_by else ""
    at = version.yanked_at.isoformat(timespec="seconds") if version.yanked_at else "?"
    return VersionYanked(
        f"{repo.full_name}:{version.number} was yanked{by} at {at}: {version.yank_reason}; {hint}"
    )


def _already_yanked(repo: Repo, version: Version) -> Conflict:
    by = f" by {version.yanked_by}" if version.yanked_by else ""
    at = version.yanked_at.isoformat(timespec="seconds") if version.yanked_at else "?"
    return Conflict(
        f"{repo.full_name}:{version.number} was already yanked{by} at {at}: {version.yank_reason}; "
        "nothing changed"
    )


def yank_out(version: Version) -> YankOut | None:
    if version.yanked_at is None:
        return None
    return YankOut(at=version.yanked_at, reason=version.yank_reason or "", by=version.yanked_by)
