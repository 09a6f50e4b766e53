"""Dependencies that fail: a 503 naming the problem (never a 500, never a secret), nothing half-written,
and recovery without a restart once the dependency is back."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest
from moto.server import ThreadedMotoServer
from sqlalchemy import event, make_url

from deltareg.client.errors import ServiceUnavailable
from deltareg.registry.config import Settings
from deltareg.registry.main import create_app

REPO = "acme/bot"
NOTHING = {"repos": 0, "versions": 0, "version_files": 0, "blobs": 0, "evals": 0}
GUARD_SECONDS = 60  # only stops a hung test; nothing is asserted about speed


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def assert_unavailable(response: Any, *fragments: str) -> None:
    assert response.status_code == 503, response.text
    body = response.json()
    assert body["error"] == "service_unavailable"
    for fragment in fragments:
        assert fragment in body["detail"], body["detail"]


def push_attempt(registry: Any, files: dict[str, bytes]) -> list[Any]:
    """Every request of a push (plan, API upload, version), answers in order."""
    wanted = [{"digest": registry.digest_of(d), "size": len(d)} for d in files.values()]
    answers = [registry.client.post("/api/v1/blobs/uploads", json={"blobs": wanted})]
    answers += [registry.put_blob(data) for data in files.values()]
    answers.append(registry.create_version(REPO, registry.manifest_for(files)))
    return answers


# ---- object store


@pytest.mark.backends("s3")
def test_a_missing_bucket_is_503_and_the_registry_recovers_once_it_exists(make_registry, moto_s3):
    bucket = f"later-{os.urandom(6).hex()}"
    with make_registry(storage_url=f"s3://{bucket}/registry") as registry:
        files = registry.lora_files()
        for answer in push_attempt(registry, files):
            assert_unavailable(answer, f"object store unavailable: bucket '{bucket}' does not exist")
        assert_unavailable(registry.client.get("/readyz"), "does not exist")
        assert registry.count_rows() == NOTHING

        moto_s3.client().create_bucket(Bucket=bucket)
        assert registry.push(REPO, files)["number"] == 1
        assert registry.client.get("/readyz").json() == {"status": "ready"}


@pytest.fixture
def closed_port_endpoint() -> Iterator[tuple[str, int]]:
    """An endpoint where nothing listens yet; the test may start a moto server there."""
    port = free_port()
    yield f"http://127.0.0.1:{port}", port


@pytest.mark.backends("s3")
def test_an_unreachable_store_is_503_and_the_registry_recovers_when_it_starts(
    make_registry, closed_port_endpoint
):
    endpoint, port = closed_port_endpoint
    overrides = {
        "s3_endpoint_url": endpoint,
        "s3_max_attempts": 1,
        "storage_url": "s3://started-late/registry",
    }
    with make_registry(**overrides) as registry:
        files = registry.lora_files()
        for answer in push_attempt(registry, files):
            assert_unavailable(answer, f"object store unreachable at {endpoint}")
        assert registry.count_rows() == NOTHING

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        try:
            httpx.put(f"{endpoint}/started-late")  # create the bucket
            assert registry.push(REPO, files)["number"] == 1
            assert registry.client.get(
                f"/api/v1/blobs/{registry.digest_of(files['adapter_config.json'])}"
            ).content
        finally:
            server.stop()


@pytest.fixture(scope="module")
def moto_with_auth() -> Iterator[str]:
    """A moto server (its own process) that checks credentials: it knows no access key at all."""
    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + GUARD_SECONDS
        while True:
            assert process.poll() is None, "moto server exited"
            try:
                httpx.get(f"{endpoint}/moto-api/", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "moto server did not start"
                time.sleep(0.05)
        yield endpoint
    finally:
        process.terminate()
        process.wait(timeout=GUARD_SECONDS)


@pytest.mark.backends("s3")
def test_wrong_credentials_are_503_and_the_secret_never_shows(make_registry, moto_with_auth, monkeypatch):
    secret = "s3cr3t-" + os.urandom(8).hex()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    with make_registry(s3_endpoint_url=moto_with_auth, storage_url="s3://any-bucket/registry") as registry:
        for answer in push_attempt(registry, registry.lora_files()):
            # Also where S3 answers a bare 403 (a HEAD request): the server asks again to name the cause.
            assert_unavailable(answer, "object store refused the credentials (InvalidAccessKeyId)")
            assert secret not in answer.text and "AKIAWRONG" not in answer.text
        assert registry.count_rows() == NOTHING


# ---- database


def admin(postgres_server: Any) -> Any:
    return postgres_server._admin()


def with_password(url: str, password: str) -> str:
    # The test server trusts local connections, so any password works: it only has to stay secret.
    return make_url(url).set(password=password).render_as_string(hide_password=False)


@pytest.mark.backends("postgres")
def test_a_database_that_goes_away_is_503_and_the_registry_recovers_when_it_is_back(
    make_registry, postgres_server, settings
):
    url = with_password(settings.database_url, "hunter2-secret")
    name = make_url(url).database
    with make_registry(database_url=url) as registry:
        files = registry.lora_files()
        registry.push(REPO, files)
        ref = {"ref": f"{REPO}:1"}
        for _ in range(2):  # the second one is answered from memory (registry/versions/fast_path.py)
            assert registry.client.get("/api/v1/resolve", params=ref).status_code == 200
        postgres_server.drop_database(url)  # terminates the app's pooled connections too

        answers = [
            registry.client.get("/api/v1/repos"),
            registry.create_version(REPO, registry.manifest_for(files)),
            registry.client.get("/readyz"),
            registry.client.get("/api/v1/resolve", params=ref),  # the fast path leaves it to the route
        ]
        for answer in answers:
            assert_unavailable(
                answer, "database unavailable", f'database "{name}" does not exist', "@127.0.0.1"
            )
            assert "hunter2-secret" not in answer.text

        postgres_server.create_database(migrated=True, name=name)
        assert registry.client.get("/api/v1/repos").json() == {"repos": []}
        assert registry.push(REPO, files)["number"] == 1


@pytest.mark.backends("postgres")
def test_terminated_connections_are_replaced_without_an_error(registry, postgres_server):
    registry.push(REPO, registry.lora_files(0))
    name = make_url(registry.settings.database_url).database
    with admin(postgres_server) as connection:
        killed = connection.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = %s", (name,)
        ).fetchone()[0]
    assert killed >= 1  # the app's idle pooled connection
    assert registry.client.get(f"/api/v1/repos/{REPO}").status_code == 200
    assert registry.push(REPO, registry.lora_files(1))["number"] == 2


@pytest.mark.backends("postgres")
def test_a_resolve_on_a_terminated_connection_is_retried_on_a_fresh_one(registry, postgres_server):
    # GET /resolve reads through Database.single_read: its pool pings nothing on checkout, so the dead
    # connection fails on use and the read is repeated once on a new connection.
    registry.push(REPO, registry.lora_files(0))
    ref = {"ref": f"{REPO}:1"}
    assert registry.client.get("/api/v1/resolve", params=ref).status_code == 200
    single_reads = registry.client.app.state.database.single_reads
    assert single_reads.pool.checkedin() >= 1  # the connection that answered is pooled again
    name = make_url(registry.settings.database_url).database
    with admin(postgres_server) as connection:
        connection.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
        )
    response = registry.client.get("/api/v1/resolve", params=ref)
    assert (response.status_code, response.json()["number"]) == (200, 1), response.text


@pytest.mark.backends("postgres")
def test_a_connection_killed_mid_push_is_503_writes_nothing_and_the_next_push_works(
    registry, postgres_server
):
    files = registry.lora_files()
    registry.upload_all(files)
    engine = registry.client.app.state.database.engine
    name = make_url(registry.settings.database_url).database

    def kill_own_backend(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO VERSION_FILES"):
            pid = cursor.connection.info.backend_pid
            with admin(postgres_server) as other:
                other.execute("SELECT pg_terminate_backend(%s)", (pid,))

    event.listen(engine, "before_cursor_execute", kill_own_backend)
    try:
        response = registry.create_version(REPO, registry.manifest_for(files))
    finally:
        event.remove(engine, "before_cursor_execute", kill_own_backend)

    assert_unavailable(response, "database unavailable", name)
    counts = registry.count_rows()
    assert (counts["repos"], counts["versions"], counts["version_files"]) == (0, 0, 0)
    assert registry.push(REPO, files)["number"] == 1


@pytest.mark.backends("postgres")
def test_a_lock_timeout_is_a_retryable_503_not_a_500(registry):
    # Another transaction holds the repo row and ours gives up waiting (an operator's lock_timeout).
    registry.push(REPO, registry.lora_files(0))
    files = registry.lora_files(1)
    registry.upload_all(files)
    engine = registry.client.app.state.database.engine

    def short_lock_timeout(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if "FOR UPDATE" in statement.upper():
            cursor.execute("SET LOCAL lock_timeout = '50ms'")

    holder = psycopg.connect(
        make_url(registry.settings.database_url).set(drivername="postgresql").render_as_string()
    )
    try:
        holder.execute("SELECT * FROM repos FOR UPDATE")  # an open transaction holding the row
        event.listen(engine, "before_cursor_execute", short_lock_timeout)
        try:
            response = registry.create_version(REPO, registry.manifest_for(files))
        finally:
            event.remove(engine, "before_cursor_execute", short_lock_timeout)
    finally:
        holder.rollback()
        holder.close()
    assert_unavailable(response, "database unavailable", "lock timeout")
    assert registry.count_rows()["versions"] == 1
    assert registry.push(REPO, files)["number"] == 2  # the failed attempt used up no number


def test_a_database_that_is_down_at_startup_stops_the_server_with_one_line(tmp_path):
    port = free_port()
    url = f"postgresql+psycopg://postgres:pw-secret@127.0.0.1:{port}/registry"
    with pytest.raises(ServiceUnavailable) as raised:
        create_app(Settings(data_dir=tmp_path, database_url=url))
    message = str(raised.value)
    assert message.startswith("database unavailable: ")
    assert "Connection refused" in message and f"127.0.0.1:{port}" in message
    assert "pw-secret" not in message


@pytest.mark.backends("postgres-fs")
def test_a_connection_lost_at_commit_is_503_and_nothing_is_written(registry, postgres_server):
    files = registry.lora_files()
    registry.upload_all(files)
    engine = registry.client.app.state.database.engine

    def kill_before_commit(conn: Any) -> None:
        pid = conn.connection.dbapi_connection.info.backend_pid
        with admin(postgres_server) as other:
            other.execute("SELECT pg_terminate_backend(%s)", (pid,))

    event.listen(engine, "commit", kill_before_commit)
    try:
        response = registry.create_version(REPO, registry.manifest_for(files))
    finally:
        event.remove(engine, "commit", kill_before_commit)

    assert_unavailable(response, "database unavailable")
    assert registry.count_rows()["versions"] == 0
    assert registry.push(REPO, files)["number"] == 1
