"""The schema on PostgreSQL: the same migrations as SQLite, `deltareg db`, and a server that refuses to
start on a schema that is not current (one line naming the command to run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from _support.auth import TEST_TOKEN, bearer
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from click.testing import CliRunner
from fastapi.testclient import TestClient
from sqlalchemy import text

from deltareg.client.cli import cli
from deltareg.registry.config import Settings
from deltareg.registry.db import make_engine
from deltareg.registry.main import create_app
from deltareg.registry.migrate import (
    SchemaNotReady,
    alembic_config,
    check_schema,
    current_revision,
    head_revision,
    upgrade,
)
from deltareg.registry.models import Base

DELTAREG = str(Path(sys.executable).with_name("deltareg"))
GUARD_SECONDS = 120  # only stops a hung test


def differences(url: str) -> list[object]:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return list(compare_metadata(context, Base.metadata))
    finally:
        engine.dispose()


def test_the_migrations_build_the_models_schema_on_postgres(postgres_database):
    assert current_revision(postgres_database) is None
    assert upgrade(postgres_database) == head_revision()
    assert differences(postgres_database) == []
    assert upgrade(postgres_database) == head_revision()  # a no-op the second time


def test_concurrent_upgrades_wait_for_each_other(postgres_database):
    results: list[object] = []
    barrier = threading.Barrier(3)

    def run() -> None:
        barrier.wait()
        try:
            results.append(upgrade(postgres_database))
        except Exception as exc:  # collected: the assertion below names it
            results.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [head_revision()] * 3


def at_revision(url: str, revision: str) -> None:
    command.upgrade(alembic_config(url), revision)


def test_the_server_refuses_an_empty_schema_and_names_the_command(postgres_database, tmp_path):
    with pytest.raises(SchemaNotReady) as raised:
        create_app(Settings(data_dir=tmp_path, database_url=postgres_database))
    assert raised.value.message == (
        f"the database {postgres_database} has no deltareg schema yet; run `deltareg db upgrade`"
    )


def test_the_server_refuses_an_outdated_schema_and_names_the_command(postgres_database, tmp_path):
    at_revision(postgres_database, "0002")
    with pytest.raises(
        SchemaNotReady, match=r"at schema revision 0002, this server needs .*deltareg db upgrade"
    ):
        create_app(Settings(data_dir=tmp_path, database_url=postgres_database))


def test_the_server_refuses_a_schema_from_a_newer_release(migrated_postgres_database):
    engine = make_engine(migrated_postgres_database)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()
    with pytest.raises(SchemaNotReady, match="revision 9999, which this server does not know"):
        check_schema(migrated_postgres_database)


def test_auto_migrate_can_be_asked_for_on_postgres(postgres_database, tmp_path):
    settings = Settings(data_dir=tmp_path, database_url=postgres_database, auto_migrate=True)
    with TestClient(create_app(settings), headers=bearer(TEST_TOKEN)) as client:
        assert client.get("/readyz").json() == {"status": "ready"}
    assert current_revision(postgres_database) == head_revision()


def test_db_commands(postgres_database):
    runner = CliRunner()
    env = {"DELTAREG_DATABASE_URL": postgres_database}

    before = runner.invoke(cli, ["db", "current", "--json"], env=env)
    assert before.exit_code == 0, before.output
    assert json.loads(before.output) == {
        "database": postgres_database,
        "current": None,
        "head": head_revision(),
        "up_to_date": False,
    }

    upgraded = runner.invoke(cli, ["db", "upgrade"], env=env)
    assert upgraded.exit_code == 0, upgraded.output
    assert upgraded.output == (
        f"database {postgres_database} upgraded from an empty schema to revision {head_revision()} (head)\n"
    )
    again = runner.invoke(cli, ["db", "upgrade"], env=env)
    assert again.output == f"database {postgres_database} is already at revision {head_revision()} (head)\n"

    after = runner.invoke(cli, ["db", "current"], env=env)
    assert after.exit_code == 0
    assert after.output == f"current: {head_revision()}\nhead:    {head_revision()}\n"


def test_db_commands_on_the_embedded_default(tmp_path):
    env = {"DELTAREG_DATA_DIR": str(tmp_path / "data"), "DELTAREG_DATABASE_URL": ""}
    result = CliRunner().invoke(cli, ["db", "upgrade", "--json"], env=env)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["revision"] == head_revision()
    assert (tmp_path / "data" / "registry.db").is_file()


def test_db_upgrade_of_an_unreachable_database_is_one_line_and_exit_1():
    url = "postgresql+psycopg://postgres:pw-secret@127.0.0.1:1/registry"
    result = CliRunner().invoke(cli, ["db", "upgrade"], env={"DELTAREG_DATABASE_URL": url})
    assert result.exit_code == 1
    assert result.output.startswith("error: database unavailable: ")
    assert "Connection refused" in result.output and "pw-secret" not in result.output
    assert len(result.output.splitlines()) == 1


def test_serve_refuses_an_empty_schema_with_one_line_and_exit_1(postgres_database, tmp_path):
    env = {
        **os.environ,
        "DELTAREG_DATABASE_URL": postgres_database,
        "DELTAREG_STORAGE_URL": (tmp_path / "blobs").as_uri(),
    }
    env.pop("DELTAREG_DEBUG", None)
    done = subprocess.run(
        [DELTAREG, "serve", "--port", "0"], env=env, capture_output=True, text=True, timeout=GUARD_SECONDS
    )
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr == (
        f"error: the database {postgres_database} has no deltareg schema yet; run `deltareg db upgrade`\n"
    )
