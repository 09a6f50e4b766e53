"""docker-compose.yml and the Dockerfile cannot run here (no Docker engine): check what can be checked.

The compose file parses, every DELTAREG_* setting it passes is one the server reads, the services the
registry waits for exist, and every path the Dockerfile copies exists in the repository.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from deltareg.registry.config import Settings
from deltareg.registry.gc.settings import GcSettings

ROOT = Path(__file__).resolve().parents[2]
STANDARD_AWS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_SESSION_TOKEN"}


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _server_env_names() -> set[str]:
    """Every DELTAREG_* variable the server's settings classes read."""
    names = set()
    for settings in (Settings, GcSettings):
        prefix = settings.model_config.get("env_prefix", "")
        names |= {f"{prefix}{name}".upper() for name in settings.model_fields}
    return names


def test_compose_parses_with_the_production_services():
    services = _compose()["services"]
    assert {"postgres", "minio", "minio-setup", "migrate", "registry"} <= services.keys()
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown service {dependency}"
    assert services["registry"]["healthcheck"]["test"]
    assert "mb --ignore-existing local/deltareg" in services["minio-setup"]["entrypoint"]


def test_every_setting_the_compose_file_passes_is_read_by_the_server():
    known = _server_env_names() | STANDARD_AWS
    for name in ("registry", "migrate"):
        env = _compose()["services"][name]["environment"]
        unknown = sorted(set(env) - known)
        assert not unknown, f"{name} passes settings the server does not read: {unknown}"
        assert env["DELTAREG_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["DELTAREG_STORAGE_URL"].startswith("s3://deltareg/")


def test_the_settings_check_would_catch_a_typo():
    assert "DELTAREG_DATABSE_URL" not in _server_env_names()
    assert "DELTAREG_DATABASE_URL" in _server_env_names()


def test_the_dockerfile_copies_files_that_exist_and_serves_without_torch():
    dockerfile = (ROOT / "Dockerfile").read_text()
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            *sources, _destination = line.split()[1:]
            for source in sources:
                assert (ROOT / source).exists(), f"Dockerfile copies missing {source}"
    install = re.search(r'pip install "([^"]+)"', dockerfile)
    assert install is not None and install.group(1) == ".[server]"
