"""`deltareg webhook add|list|remove|deliveries` through the real CLI against a real server, with one real
delivery to a receiver on loopback (the API itself, retries and every event are covered on all four
backends by tests/registry/test_webhooks.py)."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from _support.adapters import make_adapter

pytestmark = pytest.mark.slow

BASE = "tmv1:" + "ab" * 32
REPO = "hooks/bot"
SECRET = "e2e-receiver-secret-0123456789"
WAIT_GUARD_SECONDS = 60  # only stops a hung test (the server polls every 2 s by default)


class Receiver:
    """A real HTTP server on loopback answering 204 and keeping (path, headers, body) of every POST."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        received = self.requests

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                received.append((self.path, dict(self.headers.items()), body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def wait_for(self, count: int) -> list[tuple[str, dict[str, str], bytes]]:
        deadline = time.monotonic() + WAIT_GUARD_SECONDS
        while len(self.requests) < count:
            assert time.monotonic() < deadline, f"the receiver got {len(self.requests)} of {count} requests"
            time.sleep(0.05)
        return list(self.requests)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    thread = threading.Thread(target=receiver.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()


def _json(result: Any) -> Any:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _verified(secret: str, headers: dict[str, str], body: bytes) -> bool:
    message = headers["X-Deltareg-Timestamp"].encode() + b"." + body
    expected = "sha256=" + hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()
    return hmac.compare_digest(headers["X-Deltareg-Signature"], expected)


def test_webhook_commands_and_a_real_delivery(cli, tmp_path, receiver):
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    given = _json(
        cli(
            "webhook",
            "add",
            REPO,
            f"{receiver.url}/given",
            "--event",
            "push",
            "--secret-file",
            secret_file,
            "--json",
        )  # fmt: skip
    )
    assert (given["events"], given["secret"], given["created_by"]) == (["push"], SECRET, "alice")
    generated = cli("webhook", "add", REPO, f"{receiver.url}/generated", "--event", "push", "--event", "yank")
    assert generated.returncode == 0, generated.stderr
    generated_secret = generated.stdout.strip()
    assert generated_secret.startswith("whsec_") and "not shown again" in generated.stderr

    listed = _json(cli("webhook", "list", REPO, "--json"))
    assert [(h["url"], h["events"]) for h in listed] == [
        (f"{receiver.url}/given", ["push"]),
        (f"{receiver.url}/generated", ["push", "yank"]),
    ]
    human = cli("webhook", "list", REPO)
    assert human.returncode == 0 and f"{receiver.url}/given" in human.stdout
    assert SECRET not in human.stdout + json.dumps(listed) and generated_secret not in human.stdout

    pushed = cli("push", make_adapter(tmp_path / "adapter", seed=0), REPO, "--base", BASE)
    assert pushed.returncode == 0, pushed.stderr
    requests = {path: (headers, body) for path, headers, body in receiver.wait_for(2)}
    for path, secret in (("/given", SECRET), ("/generated", generated_secret)):
        headers, body = requests[path]
        assert _verified(secret, headers, body), path
        payload = json.loads(body)
        assert (payload["event"], payload["repo"], payload["actor"]) == ("push", REPO, "alice")
        assert payload["details"]["version"] == 1 and headers["X-Deltareg-Delivery"] == payload["delivery"]

    deadline = time.monotonic() + WAIT_GUARD_SECONDS
    while (log := _json(cli("webhook", "deliveries", REPO, str(given["id"]), "--json")))[0]["status"] != (
        "delivered"
    ):
        assert time.monotonic() < deadline, log
        time.sleep(0.1)
    assert (log[0]["event"], log[0]["attempts"], log[0]["last_status_code"]) == ("push", 1, 204)
    assert log[0]["id"] == json.loads(requests["/given"][1])["delivery"]
    shown = cli("webhook", "deliveries", REPO, str(given["id"]))
    assert shown.returncode == 0 and "push" in shown.stdout and "delivered" in shown.stdout

    removed = cli("webhook", "remove", REPO, str(given["id"]))
    assert removed.returncode == 0 and f"removed webhook {given['id']}" in removed.stdout
    assert [h["id"] for h in _json(cli("webhook", "list", REPO, "--json"))] != [given["id"]]
    again = cli("webhook", "remove", REPO, str(given["id"]))
    assert again.returncode == 1 and "no webhook" in again.stderr


def test_webhook_add_refuses_bad_input(cli, tmp_path):
    repo = "acme/refused-hooks"  # its own repo: the server is shared with the other tests of this module
    bad_url = cli("webhook", "add", repo, "ftp://example.com/hook")
    assert bad_url.returncode == 1 and "http:// or https://" in bad_url.stderr
    bad_event = cli("webhook", "add", repo, "https://example.com/hook", "--event", "deploy")
    assert bad_event.returncode == 2 and "deploy" in bad_event.stderr
    short = tmp_path / "short"
    short.write_text("tiny")
    too_short = cli("webhook", "add", repo, "https://example.com/hook", "--secret-file", short)
    assert too_short.returncode == 1 and "secret" in too_short.stderr
    assert _json(cli("webhook", "list", repo, "--json")) == []
