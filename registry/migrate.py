"""Database migrations (Alembic), run programmatically: ``upgrade(database_url)``."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from deltareg.registry.db import make_engine


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


def upgrade(database_url: str) -> None:
    """Bring the database at ``database_url`` to the newest schema (a no-op when it is current)."""
    engine = make_engine(database_url)
    try:
        with engine.begin() as connection:
            config = alembic_config(database_url)
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
    finally:
        engine.dispose()
