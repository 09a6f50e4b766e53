"""Real registry server processes for end-to-end tests: started on a free loopback port, logged to a file."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from _support.auth import token_in_database

FIVE_XX = re.compile(r'" 5\d\d ')  # uvicorn access log: "POST /path HTTP/1.1" 500 Internal Server Error


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60.0) -> None:
    """Wait for /healthz; fail with the server's log if it exits or does not come up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"registry exited with {proc.returncode}:\n{log.read_text(errors='replace')}"
            )
        try:
            if httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"registry at {url} did not come up:\n{log.read_text(errors='replace')}")


@dataclass
class Backend:
    """Where servers keep their state: DELTAREG_* variables for every server process (and `deltareg gc`)."""

    name: str
    env: dict[str, str]
    data_dir: Path


@dataclass
class ServerProcess:
    """``python -m deltareg.registry.serve`` on a free loopback port, with its log in a file."""

    backend: Backend
    log_path: Path
    url: str = ""
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    tokens: dict[str, str] = field(default_factory=dict, repr=False)

    def token_for(self, name: str) -> str:
        """An admin token named ``name`` in this server's database (made once): acting as ``name``."""
        if name not in self.tokens:
            url = self.backend.env.get("DELTAREG_DATABASE_URL")
            url = url or f"sqlite:///{self.backend.data_dir.resolve() / 'registry.db'}"
            self.tokens[name] = token_in_database(url, name)
        return self.tokens[name]

    def start(self) -> None:
        port = free_port()
        env = {**os.environ, **self.backend.env}
        env.pop("DELTAREG_DEBUG", None)
        command = [sys.executable, "-m", "deltareg.registry.serve", "--host", "127.0.0.1"]
        command += ["--port", str(port), "--data-dir", str(self.backend.data_dir)]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{port}"
        wait_healthy(self.url, self.proc, self.log_path)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no cleanup, whatever was in flight stays where it was."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def server_errors(self) -> list[str]:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return [line for line in lines if FIVE_XX.search(line)]
