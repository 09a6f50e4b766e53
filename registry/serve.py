"""``deltareg serve``: the registry server.

The embedded default keeps SQLite and a blob folder in one data directory and migrates at start. With
DELTAREG_DATABASE_URL / DELTAREG_STORAGE_URL pointing at PostgreSQL and S3 it serves those instead, and
refuses to start (one line naming the command to run) until the schema is current.

Also runnable as ``python -m deltareg.registry.serve --host H --port P --data-dir DIR``.
"""

from __future__ import annotations

import argparse
import logging.config
import os
import socket
import sys
from pathlib import Path

import uvicorn

from deltareg.client.config import store_token
from deltareg.client.errors import DeltaregError
from deltareg.registry.auth.service import create_first_admin_token
from deltareg.registry.config import Settings
from deltareg.registry.db import Database, safe_url
from deltareg.registry.main import create_app
from deltareg.registry.migrate import upgrade
from deltareg.registry.observability.logs import logging_config

ADMIN_TOKEN_FILE = "admin-token"


def run(host: str, port: int, data_dir: str | None) -> None:
    """Migrate the database (when auto_migrate is on), print where the registry listens, serve until
    interrupted.

    ``data_dir`` overrides DELTAREG_DATA_DIR; explicit DELTAREG_DATABASE_URL / DELTAREG_STORAGE_URL
    still win. Port 0 picks a free port, and the printed line shows the real one. Raises SchemaNotReady
    (a DeltaregError) when the schema of a shared database is not current.
    """
    settings = Settings(data_dir=Path(data_dir)) if data_dir is not None else Settings()
    # DELTAREG_LOG_FORMAT, for the registry's and uvicorn's loggers alike (to stderr; the lines printed
    # below go to stdout, as before).
    logging.config.dictConfig(logging_config(settings.log_format))
    if settings.auto_migrate:
        upgrade(settings.database_url)
    app = create_app(settings.model_copy(update={"auto_migrate": False}))
    sock = _listen(host, port)
    shown_host = f"[{host}]" if ":" in host else host
    bound = sock.getsockname()[1]
    if settings.is_embedded:
        _hand_admin_token_to_local_cli(
            settings, [f"http://{shown_host}:{bound}", *_loopback_urls(host, bound)]
        )
    print(f"deltareg registry listening on http://{shown_host}:{bound} ({_where(settings)})", flush=True)
    # log_config=None: keep the logging configured above. No uvicorn access log: the app logs its own
    # access line (route template and request id, never a query string).
    config = uvicorn.Config(app, workers=1, log_level="info", log_config=None, access_log=False)
    server = uvicorn.Server(config)
    server.run(sockets=[sock])


def _where(settings: Settings) -> str:
    """Where the data lives, for the startup line (never a password)."""
    if settings.is_embedded:
        return f"data in {settings.data_dir.expanduser().resolve()}"
    return f"database {safe_url(settings.database_url)}, blobs {settings.storage_url}"


def _hand_admin_token_to_local_cli(settings: Settings, urls: list[str]) -> None:
    """The embedded default is one person's registry: at first start it creates an admin token, keeps it
    in ``DATA_DIR/admin-token`` (readable by its owner only) and stores it in the CLI's credentials file
    for this server's URLs, so that ``deltareg`` on this machine uses it without being told."""
    token_file = settings.data_dir.expanduser().resolve() / ADMIN_TOKEN_FILE
    database = Database.connect(settings.database_url)
    try:
        with database.write_sessions() as session:
            secret = create_first_admin_token(session)
            session.commit()
    finally:
        database.dispose()
    created = secret is not None
    if secret is not None:
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secret + "\n")
    elif token_file.is_file():
        secret = token_file.read_text().strip()
    else:
        return  # tokens were made some other way: nothing to hand over
    stored = store_token(urls, secret)
    what = "created an admin token" if created else "the admin token"
    print(f"{what} ({token_file}), stored for the deltareg CLI on this machine in {stored}", flush=True)


def _loopback_urls(host: str, port: int) -> list[str]:
    if host in ("0.0.0.0", "::", "127.0.0.1", "localhost", "::1"):
        return [f"http://127.0.0.1:{port}", f"http://localhost:{port}"]
    return []


def _listen(host: str, port: int) -> socket.socket:
    # Bound here rather than by uvicorn so the printed address is the real one (port 0 included) and
    # clients that connect right after the line is printed wait in the backlog instead of failing.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m deltareg.registry.serve", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--data-dir", default=None, help="folder for registry.db and blobs/")
    args = parser.parse_args(argv)
    try:
        run(args.host, args.port, args.data_dir)
    except DeltaregError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
