"""All SQL of promotion policies and approvals."""

from __future__ import annotations

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from deltareg.registry.models import AliasPolicy, Approval, utcnow


class PolicyRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def get(self, repo_id: int, alias: str) -> AliasPolicy | None:
        """The alias's policy as committed now (a fresh read, not the session's cache)."""
        statement = (
            select(AliasPolicy)
            .where(AliasPolicy.repo_id == repo_id, AliasPolicy.alias == alias)
            .execution_options(populate_existing=True)
        )
        return self.session.scalars(statement).first()

    def list(self, repo_id: int) -> list[AliasPolicy]:
        statement = select(AliasPolicy).where(AliasPolicy.repo_id == repo_id).order_by(AliasPolicy.alias)
        return list(self.session.scalars(statement))

    def put(self, repo_id: int, alias: str, policy_json: str, *, actor: str) -> AliasPolicy:
        """Create or replace the policy (the caller holds the repo's lock, so no writer races this one)."""
        row = self.get(repo_id, alias)
        if row is None:
            row = AliasPolicy(repo_id=repo_id, alias=alias)
            self.session.add(row)
        row.policy, row.updated_by, row.updated_at = policy_json, actor, utcnow()
        self.session.flush()
        return row

    def delete(self, repo_id: int, alias: str) -> None:
        self.session.execute(
            delete(AliasPolicy).where(AliasPolicy.repo_id == repo_id, AliasPolicy.alias == alias)
        )


class ApprovalRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, version_id: int, alias: str, actor: str, comment: str | None) -> tuple[Approval, bool]:
        """Record the approval; ``(the existing one, False)`` if this actor already approved.

        The unique constraint decides: of two identical approvals racing, the second INSERT waits for the
        first transaction and then fails, and finds the first one's row.
        """
        approval = Approval(version_id=version_id, alias=alias, actor=actor, comment=comment)
        try:
            with self.session.begin_nested():
                self.session.add(approval)
        except IntegrityError:
            existing = self.find(version_id, alias, actor)
            if existing is None:
                raise
            return existing, False
        return approval, True

    def find(self, version_id: int, alias: str, actor: str) -> Approval | None:
        statement = select(Approval).where(
            Approval.version_id == version_id, Approval.alias == alias, Approval.actor == actor
        )
        return self.session.scalars(statement).first()

    def for_version(self, version_id: int, alias: str | None = None) -> list[Approval]:
        statement = select(Approval).where(Approval.version_id == version_id).order_by(Approval.id)
        if alias is not None:
            statement = statement.where(Approval.alias == alias)
        return list(self.session.scalars(statement))
