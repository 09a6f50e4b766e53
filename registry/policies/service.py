"""Policy rules: setting and showing promotion policies, approvals, and judging a promotion.

``PolicyService.check_promotion`` is called by the alias move in its own transaction, before the
compare-and-swap, with the holder the move swaps from: a move that passes is judged against exactly the
version it replaces, and one that fails changes nothing.
"""

from __future__ import annotations

import json

from sqlalchemy.orm import Session

from deltareg.client.errors import (
    NotFound,
    PermissionDenied,
    PolicyViolation,
    VersionYanked,
)
from deltareg.client.refs import validate_alias
from deltareg.registry.audit.repository import AuditRepository
from deltareg.registry.auth.principal import ANONYMOUS
from deltareg.registry.evals.repository import EvalRepository
from deltareg.registry.models import AliasPolicy, Approval, Repo, Version
from deltareg.registry.policies.repository import ApprovalRepository, PolicyRepository
from deltareg.registry.policies.rules import Candidate, Promotion, failures
from deltareg.registry.policies.schemas import (
    ApprovalCreated,
    ApprovalList,
    ApprovalOut,
    ApproveRequest,
    Policy,
    PolicyList,
    PolicyOut,
)
from deltareg.registry.signing.repository import SignatureRepository
from deltareg.registry.versions.repository import RepoRepository, VersionRepository


class PolicyService:
    def __init__(self, session: Session) -> None:
        self.repos = RepoRepository(session)
        self.versions = VersionRepository(session)
        self.evals = EvalRepository(session)
        self.policies = PolicyRepository(session)
        self.approvals = ApprovalRepository(session)
        self.signatures = SignatureRepository(session)
        self.audit = AuditRepository(session)

    # ---- policies

    def set(self, namespace: str, name: str, alias: str, policy: Policy, *, actor: str) -> PolicyOut:
        """Create or replace the policy of ``alias``; audited as ``policy.set`` with old and new policy."""
        validate_alias(alias)
        repo = self.repos.require(namespace, name)
        self.repos.lock(repo.id)  # policy writes of one repo in turn, so "old" is the one replaced
        old = _policy_json(self.policies.get(repo.id, alias))  # read before the row is overwritten
        row = self.policies.put(repo.id, alias, policy.model_dump_json(), actor=actor)
        self.audit.append(
            actor=actor,
            action="policy.set",
            target=f"{repo.full_name}@{alias}",
            repo=repo.full_name,
            details={"alias": alias, "old": old, "new": policy.model_dump(mode="json")},
        )
        return _out(repo, row)

    def get(self, namespace: str, name: str, alias: str) -> PolicyOut:
        validate_alias(alias)
        repo = self.repos.require(namespace, name)
        return _out(repo, self._require_policy(repo, alias))

    def list(self, namespace: str, name: str) -> PolicyList:
        repo = self.repos.require(namespace, name)
        return PolicyList(
            repo=repo.full_name, policies=[_out(repo, row) for row in self.policies.list(repo.id)]
        )

    def delete(self, namespace: str, name: str, alias: str, *, actor: str) -> PolicyOut:
        """Remove the policy of ``alias`` (404 if it has none); audited as ``policy.delete``. Returns it."""
        validate_alias(alias)
        repo = self.repos.require(namespace, name)
        self.repos.lock(repo.id)
        row = self._require_policy(repo, alias)
        removed = _out(repo, row)
        self.policies.delete(repo.id, alias)
        self.audit.append(
            actor=actor,
            action="policy.delete",
            target=f"{repo.full_name}@{alias}",
            repo=repo.full_name,
            details={"alias": alias, "old": _policy_json(row)},
        )
        return removed

    # ---- approvals

    def approve(
        self, namespace: str, name: str, number: int, request: ApproveRequest, *, actor: str
    ) -> ApprovalCreated:
        """``actor`` approves moving ``request.alias`` to version ``number``; audited as ``approve``.

        Approving again is idempotent: the first approval is returned with ``created`` false, and nothing
        is written or audited.

        Raises:
            PermissionDenied: the actor is anonymous or pushed the version.
            VersionYanked: the version was yanked (it can never be promoted).
        """
        repo = self.repos.require(namespace, name)
        version = self.versions.require_number(repo, number)
        if actor == ANONYMOUS:
            raise PermissionDenied("an approval needs a named approver: use an API token (DELTAREG_TOKEN)")
        if version.pushed_by is not None and actor == version.pushed_by:
            raise PermissionDenied(
                f"{actor} pushed {repo.full_name}:{number} and cannot approve it; "
                "approvals must come from someone other than the pusher"
            )
        if version.yanked_at is not None:
            raise VersionYanked(
                f"{repo.full_name}:{number} was yanked ({version.yank_reason}); it cannot be approved"
            )
        approval, created = self.approvals.add(version.id, request.alias, actor, request.comment)
        if created:
            self.audit.append(
                actor=actor,
                action="approve",
                target=f"{repo.full_name}:{number}",
                repo=repo.full_name,
                details={"version": number, "alias": request.alias, "comment": request.comment},
            )
        return ApprovalCreated(**_approval(repo, version, approval).model_dump(), created=created)

    def list_approvals(
        self, namespace: str, name: str, number: int, alias: str | None = None
    ) -> ApprovalList:
        if alias is not None:
            validate_alias(alias)
        repo = self.repos.require(namespace, name)
        version = self.versions.require_number(repo, number)
        rows = self.approvals.for_version(version.id, alias)
        return ApprovalList(
            repo=repo.full_name, version=number, approvals=[_approval(repo, version, a) for a in rows]
        )

    # ---- enforcement

    def check_promotion(self, repo: Repo, alias: str, target: Version, holder: Version | None) -> None:
        """Raise PolicyViolation listing every rule of the alias's policy that moving it to ``target``
        fails. ``holder`` is the version the move compare-and-swaps from (None: it creates the alias)."""
        row = self.policies.get(repo.id, alias)
        if row is None:
            return
        policy = Policy.model_validate_json(row.policy)
        promotion = Promotion(
            alias=alias,
            target=self._candidate(repo, target),
            holder=None if holder is None else self._candidate(repo, holder),
            approvers=[a.actor for a in self.approvals.for_version(target.id, alias)],
        )
        failed = failures(policy, promotion)
        if failed:
            rules = "1 rule" if len(failed) == 1 else f"{len(failed)} rules"
            raise PolicyViolation(
                f"the policy of alias {alias} of {repo.full_name} refuses version {target.number} "
                f"({rules} failed): " + "; ".join(failed) + "; nothing changed",
                failed_rules=failed,
            )

    def _candidate(self, repo: Repo, version: Version) -> Candidate:
        # The newest value of each metric counts: rows come by (name, id), so later ones overwrite.
        metrics = {row.name: row.value for row in self.evals.for_version(version.id)}
        signed = self.signatures.has_valid(version.id, repo.namespace)
        return Candidate(number=version.number, pushed_by=version.pushed_by, metrics=metrics, signed=signed)

    # ---- lookups

    def _require_policy(self, repo: Repo, alias: str) -> AliasPolicy:
        row = self.policies.get(repo.id, alias)
        if row is None:
            raise NotFound(f"alias {alias} of {repo.full_name} has no policy")
        return row


def _policy_json(row: AliasPolicy | None) -> object:
    return None if row is None else json.loads(row.policy)


def _out(repo: Repo, row: AliasPolicy) -> PolicyOut:
    return PolicyOut(
        repo=repo.full_name,
        alias=row.alias,
        policy=Policy.model_validate_json(row.policy),
        updated_by=row.updated_by,
        updated_at=row.updated_at,
    )


def _approval(repo: Repo, version: Version, row: Approval) -> ApprovalOut:
    return ApprovalOut(
        repo=repo.full_name,
        version=version.number,
        alias=row.alias,
        actor=row.actor,
        comment=row.comment,
        created_at=row.created_at,
    )
