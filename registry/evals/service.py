"""Eval rules: scores recorded on an existing version after its push, each write audited."""

from __future__ import annotations

from sqlalchemy.orm import Session

from deltareg.client.errors import RepoNotFound, VersionNotFound
from deltareg.client.refs import RepoName
from deltareg.registry.audit.repository import AuditRepository
from deltareg.registry.evals.repository import EvalRepository
from deltareg.registry.evals.schemas import EvalIn, EvalsRecorded, eval_out
from deltareg.registry.versions.repository import RepoRepository, VersionRepository


class EvalService:
    def __init__(self, session: Session) -> None:
        self.repos = RepoRepository(session)
        self.versions = VersionRepository(session)
        self.evals = EvalRepository(session)
        self.audit = AuditRepository(session)

    def record(
        self, namespace: str, name: str, number: int, evals: list[EvalIn], *, actor: str
    ) -> EvalsRecorded:
        """Record ``evals`` on version ``number`` of ``namespace/name`` and append one "eval" audit entry.

        Scores only accumulate: a new score of a metric is the newest, earlier ones stay as history.
        A yanked version takes scores too (it stays readable for audit).
        """
        repo_name = RepoName.parse(f"{namespace}/{name}")
        repo = self.repos.get(repo_name.namespace, repo_name.name)
        if repo is None:
            raise RepoNotFound(f"repository {repo_name} does not exist")
        found = self.versions.by_number(repo.id, number)
        if found is None:
            raise VersionNotFound(f"{repo_name} has no version {number}")
        version = found[0]
        recorded = [eval_out(row) for row in self.evals.add(version.id, evals, actor=actor)]
        self.audit.append(
            actor=actor,
            action="eval",
            target=f"{repo.full_name}:{version.number}",
            repo=repo.full_name,
            details={
                "version": version.number,
                "digest": version.digest,
                "evals": [e.model_dump(exclude={"actor", "created_at"}) for e in recorded],
            },
        )
        return EvalsRecorded(
            repo=repo.full_name, number=version.number, digest=version.digest, evals=recorded
        )
