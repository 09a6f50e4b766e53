from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from deltareg.registry.evals.schemas import EvalIn
from deltareg.registry.models import Eval


class EvalRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, version_id: int, evals: list[EvalIn]) -> None:
        self.session.add_all(
            Eval(version_id=version_id, name=e.name, value=e.value, dataset=e.dataset) for e in evals
        )
        self.session.flush()

    def for_version(self, version_id: int) -> list[Eval]:
        statement = select(Eval).where(Eval.version_id == version_id).order_by(Eval.name, Eval.id)
        return list(self.session.scalars(statement))
