"""Eval rules: scores recorded on an existing version after its push, each write audited."""

from __future__ import annotations

from sqlalchemy.orm import Session

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
        repo = self.repos.require(namespace, name)
        version = self.versions.require_number(repo, number)
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
