"""Server settings, read from ``DELTAREG_*`` environment variables when the app is created."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

GIB = 1 << 30
MIB = 1 << 20


class Settings(BaseSettings):
    """Configuration of one registry server process.

    The defaults describe the embedded setup: a SQLite database and a blob folder inside ``data_dir``.
    """

    model_config = SettingsConfigDict(env_prefix="DELTAREG_", extra="ignore")

    data_dir: Path = Path("./deltareg-data")
    # Empty means "derive from data_dir" (see _fill_defaults).
    database_url: str = ""
    storage_url: str = ""
    max_blob_bytes: int = Field(default=256 * GIB, gt=0)
    max_manifest_bytes: int = Field(default=MIB, gt=0)
    max_json_bytes: int = Field(default=MIB, gt=0)
    # None means: migrate automatically on SQLite (embedded), never on a shared server database.
    auto_migrate: bool | None = None

    @model_validator(mode="after")
    def _fill_defaults(self) -> Settings:
        data_dir = self.data_dir.expanduser().resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{data_dir / 'registry.db'}"
        if not self.storage_url:
            self.storage_url = (data_dir / "blobs").as_uri()
        if self.auto_migrate is None:
            self.auto_migrate = self.database_url.startswith("sqlite")
        return self

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")
