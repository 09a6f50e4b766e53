"""End-to-end fixtures: a real registry process (uvicorn) on loopback and the real `deltareg` CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from _support.auth import token_in_database
from _support.servers import Backend, ServerProcess, free_port, wait_healthy

DELTAREG = str(Path(sys.executable).with_name("deltareg"))


@dataclass
class Server:
    url: str
    data_dir: Path
    database_url: str | None = None  # None: the embedded default's SQLite file in data_dir
    tokens: dict[str, str] = field(default_factory=dict)

    def token_for(self, name: str) -> str:
        """An admin token named ``name`` on this server (made once): acting as ``name``."""
        if name not in self.tokens:
            url = self.database_url or f"sqlite:///{self.data_dir.resolve() / 'registry.db'}"
            self.tokens[name] = token_in_database(url, name)
        return self.tokens[name]

    def blob_files(self) -> list[Path]:
        return sorted(p for p in (self.data_dir / "blobs").rglob("*") if p.is_file() and "tmp" not in p.parts)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A registry on the embedded default (SQLite + blob folder), one per test module."""
    yield from _serve(tmp_path_factory.mktemp("registry"))


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def db_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A registry on SQLite, then on PostgreSQL (a database of the module's own; blobs in a folder).

    For CLI tests of rules the database enforces: every test of a module using it runs on both.
    """
    data_dir = tmp_path_factory.mktemp("registry")
    if request.param == "sqlite":
        yield from _serve(data_dir)
        return
    postgres = request.getfixturevalue("postgres_server")
    database_url = postgres.create_database(migrated=True)
    try:
        yield from _serve(data_dir, database_url)
    finally:
        postgres.drop_database(database_url)


def _serve(data_dir: Path, database_url: str | None = None) -> Iterator[Server]:
    env = {} if database_url is None else {"DELTAREG_DATABASE_URL": database_url}
    port = free_port()
    log = (data_dir.parent / f"server-{port}.log").open("wb")
    proc = subprocess.Popen(
        [DELTAREG, "serve", "--port", str(port), "--data-dir", str(data_dir)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **env},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, data_dir.parent / f"server-{port}.log")
        yield Server(url=url, data_dir=data_dir, database_url=database_url)
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        log.close()


@dataclass
class Cli:
    env: dict[str, str]
    cache_dir: Path
    server: Server

    def __call__(self, *args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [DELTAREG, *map(str, args)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    def as_actor(self, actor: str) -> Cli:
        """The same CLI with a token named ``actor`` (who the registry records), with the same cache."""
        return Cli({**self.env, "DELTAREG_TOKEN": self.server.token_for(actor)}, self.cache_dir, self.server)


@pytest.fixture
def cli(server: Server, tmp_path: Path) -> Cli:
    """The real CLI, pointed at the module's server, with a cache of its own and a token named ``alice``."""
    return _cli_for(server, tmp_path)


@pytest.fixture
def db_cli(db_server: Server, tmp_path: Path) -> Cli:
    """The real CLI, pointed at ``db_server`` (SQLite, then PostgreSQL), with a token named ``alice``.

    Act as someone else with ``db_cli.as_actor("bob")``.
    """
    return _cli_for(db_server, tmp_path)


def _cli_for(server: Server, tmp_path: Path) -> Cli:
    cache = tmp_path / "cache"
    env = {
        **os.environ,
        "DELTAREG_URL": server.url,
        "DELTAREG_CACHE_DIR": str(cache),
        "DELTAREG_TOKEN": server.token_for("alice"),
    }
    env.pop("DELTAREG_DEBUG", None)
    return Cli(env=env, cache_dir=cache, server=server)


@pytest.fixture(params=["sqlite-fs", "postgres-s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """SQLite + blob folder in one data dir, or a fresh PostgreSQL database + a fresh moto S3 bucket."""
    data_dir = tmp_path / "data"
    if request.param == "sqlite-fs":
        # Migrated once here: two processes migrating one SQLite file at the same moment would race.
        from deltareg.registry.config import Settings
        from deltareg.registry.migrate import upgrade

        upgrade(Settings(data_dir=data_dir).database_url)
        # DELTAREG_DATA_DIR too, for operator commands (`deltareg gc`) run against the same state.
        return Backend("sqlite-fs", {"DELTAREG_DATA_DIR": str(data_dir)}, data_dir)
    database_url = request.getfixturevalue("migrated_postgres_database")
    s3 = request.getfixturevalue("moto_s3")
    env = {
        "DELTAREG_DATABASE_URL": database_url,
        "DELTAREG_STORAGE_URL": f"s3://{s3.make_bucket()}/registry",
        "DELTAREG_S3_ENDPOINT_URL": s3.endpoint_url,
    }
    return Backend("postgres-s3", env, data_dir)


@pytest.fixture
def backend_server(backend: Backend, tmp_path: Path) -> Iterator[ServerProcess]:
    """A registry process on the test's ``backend``; the test fails if it answered any 5xx."""
    process = ServerProcess(backend, tmp_path / "server.log")
    process.start()
    try:
        yield process
    finally:
        process.stop()
    assert process.server_errors() == [], f"{process.log_path} shows 5xx answers"
