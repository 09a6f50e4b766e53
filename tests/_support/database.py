"""Direct access to a test registry's database: to look at what a write left, or to change a row behind
the registry's back (a tampered audit entry, a version yanked before the yank API is in play)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from deltareg.registry.db import make_engine
from deltareg.registry.models import Repo, Version, utcnow


def sql(settings: Any, statement: str, **params: Any) -> list[tuple[Any, ...]]:
    """Run one statement in its own transaction on ``settings.database_url``; the rows, if any."""
    engine = make_engine(settings.database_url)
    try:
        with engine.begin() as connection:
            result = connection.execute(text(statement), params)
            return [tuple(row) for row in result] if result.returns_rows else []
    finally:
        engine.dispose()


def yank_in_database(settings: Any, repo: str, number: int, reason: str) -> None:
    """Mark version ``number`` of ``repo`` yanked (by carol) straight in the database."""
    namespace, name = repo.split("/")
    engine = make_engine(settings.database_url)
    try:
        with Session(engine) as session, session.begin():
            version = session.scalars(
                select(Version)
                .join(Repo, Repo.id == Version.repo_id)
                .where(Repo.namespace == namespace, Repo.name == name, Version.number == number)
            ).one()
            version.yanked_at, version.yank_reason, version.yanked_by = utcnow(), reason, "carol"
    finally:
        engine.dispose()
