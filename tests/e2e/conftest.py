"""End-to-end fixtures: a real registry process (uvicorn) on loopback and the real `deltareg` CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from _support.servers import Backend, free_port, wait_healthy

DELTAREG = str(Path(sys.executable).with_name("deltareg"))


@dataclass
class Server:
    url: str
    data_dir: Path

    def blob_files(self) -> list[Path]:
        return sorted(p for p in (self.data_dir / "blobs").rglob("*") if p.is_file() and "tmp" not in p.parts)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data_dir = tmp_path_factory.mktemp("registry")
    port = free_port()
    log = (data_dir.parent / f"server-{port}.log").open("wb")
    proc = subprocess.Popen(
        [DELTAREG, "serve", "--port", str(port), "--data-dir", str(data_dir)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, data_dir.parent / f"server-{port}.log")
        yield Server(url=url, data_dir=data_dir)
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        log.close()


@dataclass
class Cli:
    env: dict[str, str]
    cache_dir: Path

    def __call__(self, *args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [DELTAREG, *map(str, args)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )


@pytest.fixture
def cli(server: Server, tmp_path: Path) -> Cli:
    """The real CLI, pointed at the module's server, with a cache of its own."""
    cache = tmp_path / "cache"
    env = {**os.environ, "DELTAREG_URL": server.url, "DELTAREG_CACHE_DIR": str(cache)}
    env.pop("DELTAREG_DEBUG", None)
    return Cli(env=env, cache_dir=cache)


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
