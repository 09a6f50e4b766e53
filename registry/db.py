"""Engine, sessions and the per-request unit of work."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from fastapi import Request
from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session, sessionmaker

from deltareg.client.errors import ServiceUnavailable

_T = TypeVar("_T")

# HTTP methods whose unit of work may write: on SQLite they take the write lock when they begin.
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
SQLITE_BUSY_TIMEOUT_MS = 30_000
_WRITE_OPTION = "deltareg_write"
_ONE_STATEMENT_OPTION = "deltareg_one_statement"  # see _begin_sqlite_transaction
POSTGRES_CONNECT_TIMEOUT_SECONDS = 10
# Connections kept open per process. SQLAlchemy's default (5, +10 overflow, closed again after use) is far
# below the 40 threads that run sync routes: under concurrent reads every request waited for a connection
# or opened and closed one (bench/bench_metadata.py). At most 32 + 8 per process on PostgreSQL.
POOL_SIZE, POOL_OVERFLOW = 32, 8
# Database.single_read's own pool on PostgreSQL: its reads take well under a millisecond, so a few
# connections serve many requests (a request waits for a free one; 8 served as many resolves per second
# as 24 on 2 cores, with 30 fewer PostgreSQL backends for 2 workers). No overflow: an overflow connection
# is closed again when returned, and under steady load that meant a new backend every few requests
# (bench/bench_metadata.py).
SINGLE_READ_POOL_SIZE, SINGLE_READ_POOL_OVERFLOW = 8, 0
# PostgreSQL error classes that mean "the database cannot serve us right now" rather than a bad query:
# connection exceptions, insufficient resources, operator intervention (shutdown, terminated backend,
# statement timeout), invalid catalog (the database does not exist), invalid authorization, and
# transaction rollbacks (deadlock, serialization failure: worth a retry).
_UNAVAILABLE_SQLSTATE_CLASSES = frozenset({"08", "53", "57", "3D", "28", "40"})
_UNAVAILABLE_SQLSTATES = frozenset({"55P03"})  # lock_not_available (lock_timeout)
# SQLite's: another writer holds the lock past the busy timeout; the file cannot be opened.
_UNAVAILABLE_SQLITE_MESSAGES = ("database is locked", "unable to open database file", "disk i/o error")


@dataclass(frozen=True)
class Database:
    """The engine and the two session factories of one app (read and write units of work)."""

    engine: Engine
    read_sessions: sessionmaker[Session]
    write_sessions: sessionmaker[Session]
    # One-statement reads (see single_read); on SQLite the engine's own pool, without a BEGIN.
    single_reads: Engine

    @classmethod
    def connect(cls, url: str) -> Database:
        """Create the engine for ``url`` (no connection is opened yet)."""
        engine = make_engine(url)
        write_engine = engine.execution_options(**{_WRITE_OPTION: True})
        sqlite = engine.dialect.name == "sqlite"
        return cls(
            engine=engine,
            read_sessions=sessionmaker(engine, expire_on_commit=False),
            write_sessions=sessionmaker(write_engine, expire_on_commit=False),
            single_reads=(
                engine.execution_options(**{_ONE_STATEMENT_OPTION: True})
                if sqlite
                else make_single_read_engine(url)
            ),
        )

    def dispose(self) -> None:
        self.engine.dispose()
        if self.single_reads.pool is not self.engine.pool:
            self.single_reads.dispose()

    def single_read(self, read: Callable[[Connection], _T]) -> _T:
        """``read(connection)`` for a read of one statement, retried once if its connection was dead.

        On PostgreSQL these connections come from their own pool, without a ping on checkout and without
        a transaction around the statement (psycopg's autocommit, a client-side switch; one statement
        reads one snapshot anyway): three round trips fewer than a session's SELECT 1, BEGIN and ROLLBACK
        on the registry's hottest request (bench/bench_metadata.py). A connection the server closed
        shows up as an error on use instead; SQLAlchemy then drops every pooled connection of that
        age, and a read is safe to repeat, so the one retry runs on a fresh connection. On SQLite they
        share the engine's pool but send no BEGIN and ROLLBACK, for the same reason.
        """
        try:
            with self.single_reads.connect() as connection:
                return read(connection)
        except DBAPIError as exc:
            if not exc.connection_invalidated:
                raise
        with self.single_reads.connect() as connection:
            return read(connection)


def make_single_read_engine(url: str) -> Engine:
    """The PostgreSQL engine of Database.single_read: autocommit, no pre-ping, a pool of its own."""
    return create_engine(
        url,
        isolation_level="AUTOCOMMIT",
        pool_size=SINGLE_READ_POOL_SIZE,
        max_overflow=SINGLE_READ_POOL_OVERFLOW,
        connect_args={"connect_timeout": POSTGRES_CONNECT_TIMEOUT_SECONDS},
    )


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL, foreign keys, a busy timeout and real transactions."""
    if not url.startswith("sqlite"):
        # pre_ping: a connection the server closed (restart, pg_terminate_backend) is replaced on
        # checkout, so the registry recovers by itself once the database is back.
        return create_engine(
            url,
            pool_pre_ping=True,
            pool_size=POOL_SIZE,
            max_overflow=POOL_OVERFLOW,
            connect_args={"connect_timeout": POSTGRES_CONNECT_TIMEOUT_SECONDS},
        )
    _create_sqlite_folder(url)
    database = make_url(url).database or ""
    in_memory = database in ("", ":memory:") or "mode=memory" in url  # one connection, no pool to size
    pool = {} if in_memory else {"pool_size": POOL_SIZE, "max_overflow": POOL_OVERFLOW}
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}, **pool)
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
    # Database.single_read's one statement needs no BEGIN: SQLite runs it on one snapshot by itself.
    options = connection.get_execution_options()
    if options.get(_ONE_STATEMENT_OPTION, False):
        return
    connection.exec_driver_sql("BEGIN IMMEDIATE" if options.get(_WRITE_OPTION, False) else "BEGIN")


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


def safe_url(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "(unparseable database URL)"


def unavailable_error(exc: Exception, url: str) -> ServiceUnavailable | None:
    """A 503 naming the problem when ``exc`` means the database is down or unreachable, else None.

    Errors of the query itself (a missing table, a constraint) are not availability problems and stay
    500s. The message never holds the password, even if the driver repeats it.
    """
    if isinstance(exc, PoolTimeoutError):
        return ServiceUnavailable(f"database unavailable: no free connection in the pool ({safe_url(url)})")
    if not isinstance(exc, DBAPIError) or not _is_unavailable(exc):
        return None
    reason = _first_line(str(exc.orig)) or type(exc.orig).__name__
    password = make_url(url).password if "://" in url else None
    if password:
        reason = reason.replace(str(password), "***")
    return ServiceUnavailable(f"database unavailable: {reason} ({safe_url(url)})")


def _is_unavailable(exc: DBAPIError) -> bool:
    if exc.connection_invalidated:
        return True
    if not isinstance(exc, OperationalError):
        return False
    sqlstate = getattr(exc.orig, "sqlstate", None)
    if sqlstate is not None:
        return str(sqlstate)[:2] in _UNAVAILABLE_SQLSTATE_CLASSES or sqlstate in _UNAVAILABLE_SQLSTATES
    message = str(exc.orig).lower()
    if type(exc.orig).__module__.startswith("sqlite3"):
        return any(text in message for text in _UNAVAILABLE_SQLITE_MESSAGES)
    return True  # psycopg gives no SQLSTATE when it could not connect at all


def _first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()[:300]
    return ""
