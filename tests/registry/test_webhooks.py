"""Webhooks: registered per repo (admin), queued in the transaction of the write they announce, sent
HMAC-signed by the delivery worker of the app to a real HTTP receiver on loopback, retried with backoff,
and logged per delivery."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from _support.auth import bearer, create_token
from _support.database import sql

from deltareg.registry.db import Database
from deltareg.registry.webhooks.repository import Outcome, WebhookRepository
from deltareg.registry.webhooks.settings import WebhookSettings
from deltareg.registry.webhooks.task import DeliveryWorker

REPO = "acme/bot"
HOOKS = f"/api/v1/repos/{REPO}/webhooks"
SECRET = "a-receiver-secret-of-some-length"
MAX_ATTEMPTS = 4
WAIT_GUARD_SECONDS = 60  # only stops a hung test; nothing is asserted about durations
# Small intervals so that retries happen within the test (the worker reads DELTAREG_WEBHOOK_*).
WORKER_ENV = {
    "DELTAREG_WEBHOOK_POLL_SECONDS": "0.05",
    "DELTAREG_WEBHOOK_BACKOFF_BASE_SECONDS": "0.05",
    "DELTAREG_WEBHOOK_BACKOFF_CAP_SECONDS": "0.2",
    "DELTAREG_WEBHOOK_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
    "DELTAREG_WEBHOOK_TIMEOUT_SECONDS": "10",
    "DELTAREG_WEBHOOK_LEASE_SECONDS": "30",
}


@pytest.fixture(autouse=True)
def fast_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """Set before the app of the test starts (autouse fixtures come first), so its worker uses them."""
    for name, value in WORKER_ENV.items():
        monkeypatch.setenv(name, value)


# ---- the receiver: a real HTTP server on loopback


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.body)
        return data


@dataclass
class Receiver:
    """Records every POST; answers with ``statuses`` in turn (the last one from then on)."""

    url: str = ""
    statuses: list[int] = field(default_factory=lambda: [200])
    requests: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, received: Received) -> int:
        with self.lock:
            self.requests.append(received)
            index = min(len(self.requests), len(self.statuses)) - 1
            return self.statuses[index]

    def events(self) -> list[str]:
        with self.lock:
            return [r.headers["X-Deltareg-Event"] for r in self.requests]

    def wait_for(self, count: int) -> list[Received]:
        wait_until(lambda: len(self.requests) >= count, f"{count} requests at the receiver")
        with self.lock:
            return list(self.requests)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            status = state.answer(Received(dict(self.headers.items()), body))
            reply = b"receiver says no" if status >= 300 else b"ok"
            self.send_response(status)
            if 300 <= status < 400:
                self.send_header("Location", "http://127.0.0.1:9/elsewhere")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/deltareg"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_GUARD_SECONDS
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.02)


# ---- helpers


def add_webhook(registry: Any, url: str, repo: str = REPO, **body: Any) -> dict[str, Any]:
    response = registry.client.post(f"/api/v1/repos/{repo}/webhooks", json={"url": url, **body})
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def deliveries(registry: Any, webhook_id: int, repo: str = REPO) -> list[dict[str, Any]]:
    response = registry.client.get(f"/api/v1/repos/{repo}/webhooks/{webhook_id}/deliveries")
    assert response.status_code == 200, response.text
    return list(response.json()["deliveries"])


def settled(registry: Any, webhook_id: int, count: int) -> list[dict[str, Any]]:
    """The webhook's deliveries once ``count`` of them are no longer pending."""

    def done() -> bool:
        return sum(d["status"] != "pending" for d in deliveries(registry, webhook_id)) >= count

    wait_until(done, f"{count} settled deliveries")
    return deliveries(registry, webhook_id)


def expected_signature(secret: str, received: Received) -> str:
    message = received.headers["X-Deltareg-Timestamp"].encode() + b"." + received.body
    return "sha256=" + hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def assert_signed(received: Received, secret: str) -> None:
    assert hmac.compare_digest(received.headers["X-Deltareg-Signature"], expected_signature(secret, received))
    assert received.headers["X-Deltareg-Delivery"] == received.json["delivery"]
    assert received.headers["X-Deltareg-Event"] == received.json["event"]
    assert received.headers["Content-Type"] == "application/json"


def push(registry: Any, seed: int) -> int:
    number: int = registry.push(REPO, registry.lora_files(seed))["number"]
    return number


def record_eval(registry: Any, number: int, value: float = 0.9) -> None:
    path = f"/api/v1/repos/{REPO}/versions/{number}/evals"
    response = registry.client.post(path, json={"evals": [{"name": "accuracy", "value": value}]})
    assert response.status_code == 201, response.text


def promote(registry: Any, alias: str, number: int, expected: int | None) -> Any:
    body = {"version": number, "expected": expected}
    return registry.client.put(f"/api/v1/repos/{REPO}/aliases/{alias}", json=body)


def yank(registry: Any, number: int, **body: Any) -> Any:
    path = f"/api/v1/repos/{REPO}/versions/{number}/yank"
    return registry.client.post(path, json={"reason": "bad outputs", **body})


def audit_entries(registry: Any) -> dict[int, dict[str, Any]]:
    response = registry.client.get("/api/v1/audit", params={"repo": REPO, "limit": 500})
    assert response.status_code == 200, response.text
    return {entry["id"]: entry for entry in response.json()["entries"]}


# ---- delivery


def test_push_eval_alias_move_and_yank_reach_the_receiver_signed(registry, receiver):
    hook = add_webhook(registry, receiver.url, secret=SECRET)  # before the repo exists
    assert hook["secret"] == SECRET and hook["events"] == sorted(
        ["push", "eval", "alias.promote", "alias.rollback", "yank"]
    )

    push(registry, 0)
    record_eval(registry, 1)
    assert promote(registry, "production", 1, None).status_code == 200
    push(registry, 1)
    assert yank(registry, 2).status_code == 200

    requests = receiver.wait_for(5)
    assert sorted(receiver.events()) == sorted(["push", "eval", "alias.promote", "push", "yank"])
    audit = audit_entries(registry)
    for received in requests:
        assert_signed(received, SECRET)
        payload = received.json
        entry = audit[payload["audit_entry_id"]]
        assert (payload["event"], payload["repo"], payload["target"]) == (
            entry["action"],
            REPO,
            entry["target"],
        )
        assert payload["actor"] == entry["actor"] and payload["details"] == entry["details"]
        assert payload["time"]
    by_event = {r.json["event"]: r.json for r in requests}
    assert by_event["alias.promote"]["details"]["to"] == 1
    assert by_event["yank"]["details"]["reason"] == "bad outputs"
    assert by_event["eval"]["details"]["evals"][0]["value"] == 0.9

    log = settled(registry, hook["id"], 5)
    assert [d["status"] for d in log] == ["delivered"] * 5
    assert all(d["attempts"] == 1 and d["last_status_code"] == 200 for d in log)
    assert [d["audit_entry_id"] for d in log] == sorted((d["audit_entry_id"] for d in log), reverse=True)
    assert {d["id"] for d in log} == {r.json["delivery"] for r in requests}


def test_a_failing_receiver_is_retried_with_backoff_until_it_answers(registry, receiver):
    receiver.statuses = [500, 500, 200]
    hook = add_webhook(registry, receiver.url, secret=SECRET, events=["push"])
    push(registry, 0)

    (delivery,) = settled(registry, hook["id"], 1)
    assert (delivery["status"], delivery["attempts"], delivery["last_status_code"]) == ("delivered", 3, 200)
    assert "HTTP 500" in delivery["last_error"] and "receiver says no" in delivery["last_error"]
    assert delivery["delivered_at"] and delivery["next_attempt_at"] is None
    requests = receiver.wait_for(3)
    assert len(requests) == 3  # nothing more once delivered
    assert {r.headers["X-Deltareg-Delivery"] for r in requests} == {delivery["id"]}
    for received in requests:
        assert_signed(received, SECRET)  # each attempt signed with its own timestamp


def test_a_delivery_fails_after_the_last_attempt_and_redirects_are_not_followed(registry, receiver):
    receiver.statuses = [302]
    hook = add_webhook(registry, receiver.url, events=["push"])
    push(registry, 0)

    (delivery,) = settled(registry, hook["id"], 1)
    assert (delivery["status"], delivery["attempts"], delivery["last_status_code"]) == (
        "failed",
        MAX_ATTEMPTS,
        302,
    )
    assert "redirects are not followed" in delivery["last_error"]
    assert delivery["delivered_at"] is None and delivery["next_attempt_at"] is None
    assert len(receiver.wait_for(MAX_ATTEMPTS)) == MAX_ATTEMPTS


def test_an_unreachable_receiver_is_logged(registry, receiver):
    hook = add_webhook(registry, "http://127.0.0.1:9/nothing-listens-here", events=["push"])
    push(registry, 0)
    (delivery,) = settled(registry, hook["id"], 1)
    assert (delivery["status"], delivery["attempts"], delivery["last_status_code"]) == (
        "failed",
        MAX_ATTEMPTS,
        None,
    )
    assert "Connect" in delivery["last_error"]


def test_refused_and_rolled_back_writes_send_nothing(registry, receiver):
    hook = add_webhook(registry, receiver.url)
    push(registry, 0)
    assert promote(registry, "production", 1, None).status_code == 200
    # Refused: the yank of an alias holder (written, then rolled back), a yank of a missing version,
    # a move that does not compare-and-swap, a push of a blob never uploaded.
    assert yank(registry, 1).status_code == 409
    assert yank(registry, 7).status_code == 404
    assert promote(registry, "production", 1, 5).status_code == 409
    files = registry.lora_files(9)
    assert registry.create_version(REPO, registry.manifest_for(files)).status_code == 400
    actions = [entry["action"] for entry in audit_entries(registry).values()]
    assert {"yank.refused", "alias.promote.refused", "push.refused"} <= set(actions)
    record_eval(registry, 1)  # a marker: sent after every write above

    settled(registry, hook["id"], 3)
    # A batch is sent concurrently, so receipt order is not guaranteed (payloads carry audit_entry_id).
    assert sorted(receiver.events()) == ["alias.promote", "eval", "push"]
    queued = sql(registry.settings, "SELECT event FROM webhook_deliveries ORDER BY audit_entry_id")
    assert [event for (event,) in queued] == ["push", "alias.promote", "eval"]


def test_only_subscribed_events_of_the_webhooks_repo_are_sent(registry, receiver):
    yanks = add_webhook(registry, receiver.url, events=["yank", "yank"])
    assert yanks["events"] == ["yank"]
    other_repo = add_webhook(registry, receiver.url, repo="acme/other")
    push(registry, 0)
    record_eval(registry, 1)
    push(registry, 1)
    assert yank(registry, 1).status_code == 200

    (delivery,) = settled(registry, yanks["id"], 1)
    assert delivery["event"] == "yank"
    assert receiver.events() == ["yank"]
    assert deliveries(registry, other_repo["id"], repo="acme/other") == []


def test_a_rollback_on_yank_sends_both_moves(registry, receiver):
    hook = add_webhook(registry, receiver.url, events=["alias.rollback", "yank"])
    push(registry, 0)
    push(registry, 1)
    assert promote(registry, "production", 1, None).status_code == 200
    assert promote(registry, "production", 2, 1).status_code == 200
    assert yank(registry, 2, rollback=True).status_code == 200

    settled(registry, hook["id"], 2)
    assert sorted(receiver.events()) == ["alias.rollback", "yank"]
    rolled = next(r.json for r in receiver.requests if r.json["event"] == "alias.rollback")
    assert (rolled["details"]["from"], rolled["details"]["to"]) == (2, 1)


# ---- leases: a claim is exclusive until it runs out, and a late outcome is dropped


@pytest.mark.backends("sqlite-fs", "postgres-fs")
def test_a_claim_is_exclusive_until_its_lease_runs_out(make_registry, monkeypatch):
    monkeypatch.setenv("DELTAREG_WEBHOOK_POLL_SECONDS", "0")  # no worker in the app: the test is one
    with make_registry() as registry:
        add_webhook(registry, "http://127.0.0.1:9/unused", events=["push"])
        push(registry, 0)
        database = Database.connect(registry.settings.database_url)
        try:
            short = WebhookSettings(lease_seconds=0.5, timeout_seconds=0.1)
            dead = DeliveryWorker(database, short, http=None)  # type: ignore[arg-type]  # never sends
            (claimed,) = dead.claim()
            assert dead.claim() == []  # held: no other worker gets it
            retaken: list[Any] = []  # as if the replica died: after the lease, another worker takes it

            def retake() -> bool:
                retaken.extend(dead.claim())
                return bool(retaken)

            wait_until(retake, "the lease to run out")
            assert [c.id for c in retaken] == [claimed.id]
            with database.write_sessions() as session, session.begin():
                repository = WebhookRepository(session)
                # The first claim's outcome comes too late: it is not recorded over the second claim.
                assert not repository.record(claimed, Outcome(200, None), retry_at=None)
                assert repository.record(retaken[0], Outcome(204, None), retry_at=None)
        finally:
            database.dispose()
        (delivery,) = deliveries(registry, 1)
        assert (delivery["status"], delivery["attempts"], delivery["last_status_code"]) == (
            "delivered",
            1,
            204,
        )


@pytest.mark.backends("sqlite-fs", "postgres-fs")
def test_two_replicas_share_the_deliveries_without_sending_any_twice(registry, make_registry, receiver):
    hook = add_webhook(registry, receiver.url, secret=SECRET)
    with make_registry() as replica:  # a second app (and worker) on the same database
        for seed in range(4):
            number = push(registry if seed % 2 else replica, seed)
            record_eval(replica if seed % 2 else registry, number)
        log = settled(registry, hook["id"], 8)
    assert {d["status"] for d in log} == {"delivered"}
    sent = [r.headers["X-Deltareg-Delivery"] for r in receiver.requests]
    assert sorted(sent) == sorted(d["id"] for d in log)  # each once: claims are exclusive


# ---- registration


def test_the_secret_is_shown_once_and_never_audited(registry, receiver):
    url = receiver.url + "?token=receiver-credential"
    generated = add_webhook(registry, url)
    assert generated["secret"].startswith("whsec_") and len(generated["secret"]) > 32
    given = add_webhook(registry, receiver.url, secret=SECRET, events=["eval"])

    listed = registry.client.get(HOOKS)
    assert listed.status_code == 200
    assert [(h["id"], h["url"], h["events"]) for h in listed.json()["webhooks"]] == [
        (generated["id"], url, generated["events"]),
        (given["id"], receiver.url, ["eval"]),
    ]
    assert "secret" not in listed.text and SECRET not in listed.text
    assert generated["secret"] not in listed.text

    removed = registry.client.delete(f"{HOOKS}/{given['id']}")
    assert removed.status_code == 200 and removed.json()["active"] is False
    assert [h["id"] for h in registry.client.get(HOOKS).json()["webhooks"]] == [generated["id"]]
    assert registry.client.delete(f"{HOOKS}/{given['id']}").status_code == 404

    entries = sorted(
        (e for e in audit_entries(registry).values() if e["action"].startswith("webhook.")),
        key=lambda e: e["id"],
    )
    assert [e["action"] for e in entries] == [
        "webhook.create",
        "webhook.create",
        "webhook.delete",
        "webhook.delete.refused",
    ]
    text = json.dumps(entries)
    assert SECRET not in text and generated["secret"] not in text and "receiver-credential" not in text
    assert entries[0]["details"]["origin"] == receiver.url.split("/hooks")[0]


def test_a_deleted_webhook_sends_nothing_more(registry, receiver):
    hook = add_webhook(registry, receiver.url, events=["push"])
    assert registry.client.delete(f"{HOOKS}/{hook['id']}").status_code == 200
    push(registry, 0)
    keeper = add_webhook(registry, receiver.url, events=["eval"])
    record_eval(registry, 1)
    settled(registry, keeper["id"], 1)
    assert receiver.events() == ["eval"]
    assert deliveries(registry, hook["id"]) == []  # its (empty) log is still readable


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"url": "ftp://example.com/hook"}, "http:// or https://"),
        ({"url": "example.com/hook"}, "http:// or https://"),
        ({"url": "http:///no-host"}, "no host"),
        ({"url": "http://example.com:99999/"}, "not a valid URL"),
        ({"url": "http://example.com/a b"}, "without spaces"),
        ({"url": "https://example.com/" + "x" * 2100}, "url"),
        ({"url": "https://example.com/", "events": ["deploy"]}, "unknown event 'deploy'"),
        ({"url": "https://example.com/", "events": []}, "events"),
        ({"url": "https://example.com/", "secret": "short"}, "secret"),
        ({"url": "https://example.com/", "secret": " padded secret value "}, "printable"),
        ({"url": "https://example.com/", "color": "red"}, "color"),
        ({}, "url"),
    ],
)
@pytest.mark.backends("sqlite-fs")
def test_bad_registrations_are_refused_and_create_nothing(registry, body, says):
    response = registry.client.post(HOOKS, json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_input" and says in response.json()["detail"]
    assert registry.client.get(HOOKS).json()["webhooks"] == []


@pytest.mark.backends("sqlite-fs", "postgres-fs")
def test_unknown_webhooks_and_repos_are_404_or_400(registry, receiver):
    hook = add_webhook(registry, receiver.url)
    assert registry.client.delete(f"{HOOKS}/999").status_code == 404
    assert registry.client.get(f"{HOOKS}/999/deliveries").status_code == 404
    other = registry.client.get(f"/api/v1/repos/acme/other/webhooks/{hook['id']}/deliveries")
    assert other.status_code == 404  # a webhook id of another repo
    assert registry.client.delete(f"{HOOKS}/{2**31}").status_code == 400
    bad = registry.client.post("/api/v1/repos/Acme/bot/webhooks", json={"url": receiver.url})
    assert bad.status_code == 400 and bad.json()["error"] == "invalid_name"


@pytest.mark.backends("sqlite-fs", "postgres-fs")
def test_webhooks_need_an_admin_token_on_the_namespace(registry, receiver):
    writer = bearer(create_token(registry.client, "writer", ["write", "promote"]))
    elsewhere = bearer(create_token(registry.client, "elsewhere", ["admin"], ["other"]))
    for headers in (writer, elsewhere):
        assert registry.client.post(HOOKS, json={"url": receiver.url}, headers=headers).status_code == 403
        assert registry.client.get(HOOKS, headers=headers).status_code == 403
    assert registry.client.post(
        HOOKS, json={"url": receiver.url}, headers={"Authorization": ""}
    ).status_code in (
        401,
        403,
    )
    assert registry.client.get(HOOKS).json()["webhooks"] == []
