"""Engine, sessions and the per-request unit of work."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Request
from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session, sessionmaker

# HTTP methods whose unit of work may write: on SQLite they take the write lock when they begin.
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
SQLITE_BUSY_TIMEOUT_MS = 30_000
_WRITE_OPTION = "deltareg_write"


@dataclass(frozen=True)
class Database:
    """The engine and the two session factories of one app (read and write units of work)."""

    engine: Engine
    read_sessions: sessionmaker[Session]
    write_sessions: sessionmaker[Session]

    @classmethod
    def connect(cls, url: str) -> Database:
        """Create the engine for ``url`` (no connection is opened yet)."""
        engine = make_engine(url)
        write_engine = engine.execution_options(**{_WRITE_OPTION: True})
        return cls(
            engine=engine,
            read_sessions=sessionmaker(engine, expire_on_commit=False),
            write_sessions=sessionmaker(write_engine, expire_on_commit=False),
        )

    def dispose(self) -> None:
        self.engine.dispose()


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL, foreign keys, a busy timeout and real transactions."""
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    _create_sqlite_folder(url)
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
    event.listen(engine, "connect", _configure_sqlite_connection)
    event.listen(engine, "begin", _begin_sqlite_transaction)
    return engine


def _create_sqlite_folder(url: str) -> None:
    database = make_url(url).database
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).parent.mkdir(parents=True, exist_ok=True)


def _configure_sqlite_connection(dbapi_connection: Any, _record: Any) -> None:
    # pysqlite's own transaction handling defers BEGIN to the first write and breaks SAVEPOINT;
    # switch it off and emit BEGIN ourselves in _begin_sqlite_transaction.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    finally:
        cursor.close()


def _begin_sqlite_transaction(connection: Connection) -> None:
    # A writer takes the lock up front (waiting up to the busy timeout): a deferred transaction that
    # reads first and writes later fails at once with "database is locked" when another writer got in
    # between. Readers stay deferred so they never wait for writers (WAL).
    immediate = connection.get_execution_options().get(_WRITE_OPTION, False)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def get_session(request: Request) -> Iterator[Session]:
    """The request's unit of work: commit when the route returns, roll back when it raises."""
    database: Database = request.app.state.database
    factory = database.write_sessions if request.method in WRITE_METHODS else database.read_sessions
    with factory() as session:
        try:
            yield session
        except BaseException:
            session.rollback()
            raise
        session.commit()
