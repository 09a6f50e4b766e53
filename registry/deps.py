"""FastAPI dependencies as ``Annotated`` aliases, so routes declare what they need in one word.

Dependencies that do no I/O are ``async def``: FastAPI runs a sync one in the thread pool, a hop to a
worker thread and back for every request (bench/bench_metadata.py measured it).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Request
from sqlalchemy.orm import Session

from deltareg.client.errors import InvalidInput
from deltareg.client.refs import MAX_VERSION
from deltareg.registry.config import Settings
from deltareg.registry.db import get_session
from deltareg.registry.storage import BlobStore


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_store(request: Request) -> BlobStore:
    store: BlobStore = request.app.state.store
    return store


# scope="function": commit before the response is sent, so a failed commit is the client's error too.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
SettingsDep = Annotated[Settings, Depends(get_settings)]
VersionNumber = Annotated[int, Path(ge=1, le=MAX_VERSION)]
StoreDep = Annotated[BlobStore, Depends(get_store)]


async def refuse_nul_in_query(request: Request) -> None:
    """Every route: a query parameter holding a NUL is a 400 (PostgreSQL text cannot hold one)."""
    for name, value in request.query_params.multi_items():
        if "\x00" in value or "\x00" in name:
            raise InvalidInput(f"query parameter {name!r} may not contain NUL characters")
