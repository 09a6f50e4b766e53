from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from deltareg.registry.evals.schemas import EvalIn
from deltareg.registry.models import Eval


class EvalRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, version_id: int, evals: list[EvalIn], *, actor: str | None) -> list[Eval]:
        rows = [Eval(version_id=version_id, actor=actor, **e.model_dump()) for e in evals]
        self.session.add_all(rows)
        self.session.flush()
        return rows

    def for_version(self, version_id: int) -> list[Eval]:
        statement = select(Eval).where(Eval.version_id == version_id).order_by(Eval.name, Eval.id)
        return list(self.session.scalars(statement))
