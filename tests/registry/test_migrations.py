"""Alembic: the migration builds the schema the models describe."""

from __future__ import annotations

import sqlite3

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from deltareg.registry.db import make_engine
from deltareg.registry.migrate import head_revision, migrations_dir, upgrade
from deltareg.registry.models import Base

TABLES = {"alembic_version", *Base.metadata.tables}


def _tables(path) -> set[str]:
    with sqlite3.connect(path) as connection:
        rows = connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    return {name for (name,) in rows}


def test_upgrade_creates_the_schema_and_a_second_upgrade_is_a_no_op(tmp_path):
    path = tmp_path / "new" / "registry.db"
    url = f"sqlite:///{path}"
    assert upgrade(url) == head_revision()
    assert _tables(path) == TABLES >= {"repos", "blobs", "versions", "version_files", "evals"}
    with sqlite3.connect(path) as connection:
        connection.execute(
            "INSERT INTO blobs (digest, size, created_at) VALUES ('sha256:x', 1, '2024-01-01')"
        )

    assert upgrade(url) == head_revision()
    with sqlite3.connect(path) as connection:
        assert connection.execute("SELECT version_num FROM alembic_version").fetchall() == [
            (head_revision(),)
        ]
        assert connection.execute("SELECT count(*) FROM blobs").fetchone() == (1,)


def test_models_and_migrations_agree(tmp_path):
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    upgrade(url)
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            differences = compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()
    assert differences == []


def test_migrations_are_found_from_the_installed_package():
    folder = migrations_dir()
    assert (folder / "env.py").is_file()
    assert (folder / "versions" / "0001_initial.py").is_file()
