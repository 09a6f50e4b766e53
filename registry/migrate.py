"""Database migrations (Alembic), run programmatically: ``upgrade``, ``current_revision``, ``check_schema``.

The embedded default migrates at start; a shared server database is migrated by an operator
(``deltareg db upgrade``) and the server refuses to start until the schema is current.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection, Engine

from deltareg.client.errors import ServiceUnavailable
from deltareg.registry.db import make_engine, safe_url, unavailable_error

UPGRADE_COMMAND = "deltareg db upgrade"
# Any constant: replicas that migrate at start (DELTAREG_AUTO_MIGRATE=true) take turns on this lock.
_MIGRATION_LOCK_KEY = 0x64656C7461  # "delta"

T = TypeVar("T")


class SchemaNotReady(ServiceUnavailable):
    """The database schema is missing or not the one this server was built for."""


def migrations_dir() -> Path:
    """The Alembic script folder: ``deltareg/registry/migrations`` in a wheel, ``migrations/`` in the repo.

    Found relative to this file rather than with importlib.resources: the editable install cannot
    import the package ``deltareg.registry.migrations`` (a folder without ``__init__.py`` mapped from
    outside ``registry/``), and in a wheel ``resources.files`` gives a MultiplexedPath, not a folder
    Alembic can use.
    """
    package_dir = Path(__file__).resolve().parent
    candidates = [package_dir / "migrations", package_dir.parent / "migrations"]
    for candidate in candidates:
        if (candidate / "env.py").is_file():
            return candidate
    raise RuntimeError(f"Alembic migrations not found (looked in {', '.join(map(str, candidates))})")


def alembic_config(database_url: str) -> Config:
    """An Alembic config for ``database_url`` without an alembic.ini."""
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.attributes["database_url"] = database_url
    return config


def head_revision() -> str:
    """The newest revision this server's migrations know."""
    head = ScriptDirectory(str(migrations_dir())).get_current_head()
    if head is None:
        raise RuntimeError("the migrations have no head revision")
    return head


def known_revisions() -> set[str]:
    return {script.revision for script in ScriptDirectory(str(migrations_dir())).walk_revisions()}


def upgrade(database_url: str) -> str:
    """Bring the database at ``database_url`` to the newest schema (a no-op when it is current).

    Returns the revision reached. On PostgreSQL concurrent upgrades (replicas starting together) wait
    for each other on an advisory lock; the DDL is transactional, so a failed upgrade changes nothing.
    """

    def migrate(connection: Connection) -> str:
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK_KEY})")
        config = alembic_config(database_url)
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
        return _revision_of(connection) or head_revision()

    return _with_connection(database_url, migrate)


def current_revision(database_url: str, engine: Engine | None = None) -> str | None:
    """The revision the database is at, or None when it has no registry schema yet.

    Uses ``engine`` (an app's pool) when given, else a connection of its own.
    """
    return _with_connection(database_url, _revision_of, engine)


def check_schema(database_url: str, engine: Engine | None = None) -> None:
    """Raise SchemaNotReady, naming the command to run, unless the schema is at this server's head."""
    current = current_revision(database_url, engine)
    head = head_revision()
    where = safe_url(database_url)
    if current == head:
        return
    if current is None:
        raise SchemaNotReady(f"the database {where} has no deltareg schema yet; run `{UPGRADE_COMMAND}`")
    if current not in known_revisions():
        raise SchemaNotReady(
            f"the database {where} is at schema revision {current}, which this server does not know "
            "(a newer deltareg migrated it); upgrade the server"
        )
    raise SchemaNotReady(
        f"the database {where} is at schema revision {current}, this server needs {head}; "
        f"run `{UPGRADE_COMMAND}`"
    )


def _revision_of(connection: Connection) -> str | None:
    revision: str | None = MigrationContext.configure(connection).get_current_revision()
    return revision


def _with_connection(database_url: str, work: Callable[[Connection], T], engine: Engine | None = None) -> T:
    """Run ``work`` in one transaction (on ``engine``, or a connection of its own); a database that is
    down is a 503."""
    own_engine = engine is None
    engine = engine or make_engine(database_url)
    try:
        with engine.begin() as connection:
            return work(connection)
    except Exception as exc:
        unavailable = unavailable_error(exc, database_url)
        if unavailable is None:
            raise
        raise unavailable from None
    finally:
        if own_engine:
            engine.dispose()
