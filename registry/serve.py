"""``deltareg serve``: the registry server.

The embedded default keeps SQLite and a blob folder in one data directory and migrates at start. With
DELTAREG_DATABASE_URL / DELTAREG_STORAGE_URL pointing at PostgreSQL and S3 it serves those instead, and
refuses to start (one line naming the command to run) until the schema is current.

Also runnable as ``python -m deltareg.registry.serve --host H --port P --data-dir DIR``.
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

import uvicorn

from deltareg.client.errors import DeltaregError
from deltareg.registry.config import Settings
from deltareg.registry.db import safe_url
from deltareg.registry.main import create_app
from deltareg.registry.migrate import upgrade


def run(host: str, port: int, data_dir: str | None) -> None:
    """Migrate the database (when auto_migrate is on), print where the registry listens, serve until
    interrupted.

    ``data_dir`` overrides DELTAREG_DATA_DIR; explicit DELTAREG_DATABASE_URL / DELTAREG_STORAGE_URL
    still win. Port 0 picks a free port, and the printed line shows the real one. Raises SchemaNotReady
    (a DeltaregError) when the schema of a shared database is not current.
    """
    settings = Settings(data_dir=Path(data_dir)) if data_dir is not None else Settings()
    if settings.auto_migrate:
        upgrade(settings.database_url)
    app = create_app(settings.model_copy(update={"auto_migrate": False}))
    sock = _listen(host, port)
    shown_host = f"[{host}]" if ":" in host else host
    print(
        f"deltareg registry listening on http://{shown_host}:{sock.getsockname()[1]} ({_where(settings)})",
        flush=True,
    )
    server = uvicorn.Server(uvicorn.Config(app, workers=1, log_level="info"))
    server.run(sockets=[sock])


def _where(settings: Settings) -> str:
    """Where the data lives, for the startup line (never a password)."""
    embedded = Settings(data_dir=settings.data_dir, database_url="", storage_url="")
    if (settings.database_url, settings.storage_url) == (embedded.database_url, embedded.storage_url):
        return f"data in {settings.data_dir.expanduser().resolve()}"
    return f"database {safe_url(settings.database_url)}, blobs {settings.storage_url}"


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
