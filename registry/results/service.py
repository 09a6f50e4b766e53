"""Expected results: the fingerprint of the model a version yields on its base, recorded once per dtype."""

from __future__ import annotations

from sqlalchemy.orm import Session

from deltareg.client.errors import Conflict
from deltareg.registry.audit.repository import AuditRepository
from deltareg.registry.models import ExpectedResult, Repo, Version
from deltareg.registry.results.repository import ResultRepository
from deltareg.registry.results.schemas import ResultList, ResultRecorded, check_dtype, result_out
from deltareg.registry.versions.repository import RepoRepository, VersionRepository


class ResultService:
    def __init__(self, session: Session) -> None:
        self.repos = RepoRepository(session)
        self.versions = VersionRepository(session)
        self.results = ResultRepository(session)
        self.audit = AuditRepository(session)

    def record(
        self, namespace: str, name: str, number: int, base_dtype: str, fingerprint: str, *, actor: str
    ) -> ResultRecorded:
        """Record ``fingerprint`` as the result of version ``number`` on a ``base_dtype`` base.

        A result is a claim others check downloads against, so it never changes: recording the same
        fingerprint again returns the first record (``created`` false, nothing audited), a different
        one is refused. A yanked version takes results too, as it takes evals (it stays readable).

        Raises:
            InvalidInput: ``base_dtype`` is not BF16, F16, F32 or F64.
            RepoNotFound, VersionNotFound: no such version.
            Conflict: the dtype already has a different fingerprint.
        """
        check_dtype(base_dtype)
        repo = self.repos.require(namespace, name)
        version = self.versions.require_number(repo, number)
        row, created = self.results.add(version.id, base_dtype, fingerprint, actor=actor)
        if row.fingerprint != fingerprint:
            raise Conflict(
                f"{repo.full_name}:{number} already has the result {row.fingerprint} for base dtype "
                f"{base_dtype}; results are immutable, so {fingerprint} was not recorded"
            )
        if created:
            self.audit.append(
                actor=actor,
                action="result.record",
                target=f"{repo.full_name}:{number}",
                repo=repo.full_name,
                details={
                    "version": number,
                    "digest": version.digest,
                    "dtype": base_dtype,
                    "fingerprint": fingerprint,
                },
            )
        return _recorded(repo, version, row, created)

    def list(self, namespace: str, name: str, number: int) -> ResultList:
        repo = self.repos.require(namespace, name)
        version = self.versions.require_number(repo, number)
        rows = self.results.for_version(version.id)
        return ResultList(
            repo=repo.full_name,
            number=number,
            digest=version.digest,
            results=[result_out(row) for row in rows],
        )


def _recorded(repo: Repo, version: Version, row: ExpectedResult, created: bool) -> ResultRecorded:
    return ResultRecorded(
        **result_out(row).model_dump(),
        repo=repo.full_name,
        number=version.number,
        digest=version.digest,
        created=created,
    )
