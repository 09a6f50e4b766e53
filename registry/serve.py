"""``deltareg serve``: the embedded registry (SQLite + a blob folder in one data directory).

Also runnable as ``python -m deltareg.registry.serve --host H --port P --data-dir DIR``.
"""

from __future__ import annotations

import argparse
import socket
from pathlib import Path

import uvicorn

from deltareg.registry.config import Settings
from deltareg.registry.main import create_app
from deltareg.registry.migrate import upgrade


def run(host: str, port: int, data_dir: str | None) -> None:
    """Migrate the database, print where the registry listens, and serve until interrupted.

    ``data_dir`` overrides DELTAREG_DATA_DIR; explicit DELTAREG_DATABASE_URL / DELTAREG_STORAGE_URL
    still win. Port 0 picks a free port, and the printed line shows the real one.
    """
    settings = Settings(data_dir=Path(data_dir)) if data_dir is not None else Settings()
    upgrade(settings.database_url)
    app = create_app(settings.model_copy(update={"auto_migrate": False}))
    sock = _listen(host, port)
    shown_host = f"[{host}]" if ":" in host else host
    print(
        f"deltareg registry listening on http://{shown_host}:{sock.getsockname()[1]} "
        f"(data in {settings.data_dir.expanduser().resolve()})",
        flush=True,
    )
    server = uvicorn.Server(uvicorn.Config(app, workers=1, log_level="info"))
    server.run(sockets=[sock])


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
    run(args.host, args.port, args.data_dir)


if __name__ == "__main__":
    main()
