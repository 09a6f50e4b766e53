"""Garbage collection: what it removes, what it keeps, and a push racing it."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from datetime import timedelta
from typing import Any

import pytest
from _support.auth import TEST_TOKEN, bearer
from click.testing import CliRunner
from pydantic import SecretStr
from sqlalchemy import event, text

from deltareg.client.cli import cli
from deltareg.registry.gc.service import GarbageCollector
from deltareg.registry.models import utcnow

REPO = "acme/bot"
HOUR = timedelta(hours=1)


def collector(registry: Any, *, grace: timedelta = HOUR, later: timedelta = timedelta(0)) -> GarbageCollector:
    """A collector over the app's own database and store; ``later`` runs it as if that much time passed."""
    state = registry.client.app.state
    return GarbageCollector(state.database, state.store, grace=grace, clock=lambda: utcnow() + later)


def upload(registry: Any, data: bytes) -> str:
    """Upload one blob the way the client does (plan, transfer, complete); no version references it."""
    registry.upload(data)
    digest: str = registry.digest_of(data)
    return digest


def leave_an_upload_behind(registry: Any) -> None:
    """What a client that gave up mid-upload leaves in the store's staging area."""
    if registry.is_s3:
        data = b"sent to the store, never completed"
        (target,) = registry.plan([data])
        registry.send(target, data)
    else:
        (registry.blob_root / "tmp" / "upload-abandoned").write_bytes(b"half an upload")


def upload_leftovers(registry: Any) -> list[str]:
    staging = ("tmp/", "uploads/", "multipart:")
    return [name for name in registry.stored_names() if name.startswith(staging)]


def stored(registry: Any, digest: str) -> bool:
    state = registry.client.app.state
    return state.store.size_of(digest) is not None


def recorded(registry: Any, digest: str) -> bool:
    with registry.client.app.state.database.read_sessions() as session:
        query = text("SELECT count(*) FROM blobs WHERE digest = :digest")
        return bool(session.execute(query, {"digest": digest}).scalar_one())


def blob_digests_of(version: dict[str, Any]) -> list[str]:
    return [entry["digest"] for entry in version["manifest"]["files"]]


def test_old_unreferenced_blobs_go_and_referenced_ones_stay(registry):
    version = registry.push(REPO, registry.lora_files(0))
    orphan = upload(registry, b"an orphan blob")

    report = collector(registry, later=2 * HOUR).run()

    assert [item.name for item in report.blobs] == [orphan]
    assert report.blobs[0].size == len(b"an orphan blob")
    assert not stored(registry, orphan) and not recorded(registry, orphan)
    for digest in blob_digests_of(version):
        assert stored(registry, digest) and recorded(registry, digest)
    assert registry.download(blob_digests_of(version)[0]).status_code == 200


def test_young_unreferenced_blobs_stay(registry):
    orphan = upload(registry, b"a young orphan")
    report = collector(registry, later=HOUR / 2).run()
    assert report.blobs == [] and report.strays == []
    assert stored(registry, orphan) and recorded(registry, orphan)


def test_a_dry_run_lists_and_removes_nothing(registry):
    orphan = upload(registry, b"an orphan blob")
    before = registry.stored_blob_files()
    report = collector(registry, later=2 * HOUR).run(dry_run=True)
    assert [item.name for item in report.blobs] == [orphan]
    assert report.uploads is None
    assert registry.stored_blob_files() == before
    assert recorded(registry, orphan)


def test_an_upload_plan_marks_blobs_in_use(registry):
    data = b"reused by the next push"
    digest = upload(registry, data)
    with registry.client.app.state.database.write_sessions() as session:
        session.execute(text("UPDATE blobs SET last_used_at = :old"), {"old": utcnow() - 2 * HOUR})
        session.commit()
    plan = registry.client.post(
        "/api/v1/blobs/uploads", json={"blobs": [{"digest": digest, "size": len(data)}]}
    )
    assert plan.json()["blobs"][0]["present"] is True

    report = collector(registry).run()

    assert report.blobs == []
    assert stored(registry, digest) and recorded(registry, digest)


def test_unrecorded_store_objects_and_upload_leftovers_older_than_the_grace_go(registry):
    store = registry.client.app.state.store
    stray = registry.digest_of(b"stored but never recorded")
    store.receive(stray, [b"stored but never recorded"])
    leave_an_upload_behind(registry)
    leftovers = upload_leftovers(registry)
    assert leftovers

    young = collector(registry).run()
    assert young.strays == [] and young.uploads == 0
    assert stored(registry, stray) and upload_leftovers(registry) == leftovers

    report = collector(registry, later=2 * HOUR).run()
    assert [item.name for item in report.strays] == [stray]
    assert report.uploads == len(leftovers)
    assert not stored(registry, stray) and upload_leftovers(registry) == []


def test_a_blob_removed_between_the_content_check_and_the_commit_fails_the_push_cleanly(registry):
    """GC deleting the row after the push checked it: the foreign key refuses the version (missing_blob)."""
    files = registry.lora_files(3)
    registry.upload_all(files)
    victim = registry.digest_of(files["adapter_model.safetensors"])
    engine = registry.client.app.state.database.engine

    def gc_strikes(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO VERSION_FILES"):
            placeholder = "?" if conn.dialect.paramstyle == "qmark" else "%s"
            cursor.execute(f"DELETE FROM blobs WHERE digest = {placeholder}", (victim,))

    event.listen(engine, "before_cursor_execute", gc_strikes)
    try:
        response = registry.create_version(REPO, registry.manifest_for(files))
    finally:
        event.remove(engine, "before_cursor_execute", gc_strikes)

    assert (response.status_code, response.json()["error"]) == (400, "missing_blob"), response.text
    assert registry.client.get(f"/api/v1/repos/{REPO}").status_code == 404  # nothing was recorded
    assert registry.push(REPO, files)["number"] == 1  # the retry re-uploads and commits


def test_a_push_racing_gc_never_leaves_a_version_without_its_blobs(registry):
    """GC with grace 0 against commits that reference freshly uploaded, still unreferenced blobs.

    Even rounds start both at once (GC usually wins: the push must fail cleanly and a retry succeed);
    odd rounds start GC from inside the push's transaction, once its version files are written (the
    commit must win and GC must keep the blobs).
    """
    gc = collector(registry, grace=timedelta(0))
    engine = registry.client.app.state.database.engine
    outcomes = []
    for seed in range(12):
        files = registry.lora_files(100 + seed)
        registry.upload_all(files)
        go = threading.Event()

        def start_gc_mid_commit(conn: Any, cursor: Any, statement: str, *_: Any, go: Any = go) -> None:
            if statement.lstrip().upper().startswith("INSERT INTO VERSION_FILES"):
                go.set()

        def collect(go: threading.Event = go) -> None:
            go.wait(timeout=60)
            gc.run()

        if seed % 2:
            event.listen(engine, "after_cursor_execute", start_gc_mid_commit)
        else:
            go.set()
        thread = threading.Thread(target=collect)
        thread.start()
        try:
            response = registry.create_version(REPO, registry.manifest_for(files))
        finally:
            go.set()
            thread.join()
            if seed % 2:
                event.remove(engine, "after_cursor_execute", start_gc_mid_commit)
        outcomes.append(response.status_code)
        if response.status_code != 201:
            assert response.json()["error"] == "missing_blob", response.text
            assert registry.push(REPO, files)["created"] is True  # re-upload what is missing, commit
        for digest in (registry.digest_of(data) for data in files.values()):
            assert stored(registry, digest) and recorded(registry, digest)

    collector(registry, grace=timedelta(0)).run()  # a last sweep with nothing racing it
    versions = registry.client.get(f"/api/v1/repos/{REPO}").json()["versions"]
    assert [v["number"] for v in versions] == list(range(12, 0, -1))
    for summary in versions:
        version = registry.client.get(f"/api/v1/repos/{REPO}/versions/{summary['number']}").json()
        for digest in blob_digests_of(version):
            assert stored(registry, digest) and recorded(registry, digest)
    assert set(outcomes) <= {201, 400}
    assert outcomes[1::2] == [201] * 6  # GC that starts mid-commit waits for it, then keeps the blobs


def test_the_server_collects_periodically_when_asked(tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from deltareg.registry.config import Settings
    from deltareg.registry.main import create_app

    monkeypatch.setenv("DELTAREG_GC_INTERVAL_SECONDS", "0.05")
    monkeypatch.setenv("DELTAREG_GC_GRACE_SECONDS", "0")
    data = b"collected by the server itself"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with TestClient(create_app(Settings(data_dir=tmp_path / "data")), headers=bearer(TEST_TOKEN)) as client:
        assert client.put(f"/api/v1/blobs/{digest}", content=data).status_code == 201
        store = client.app.state.store  # type: ignore[attr-defined]
        deadline = time.monotonic() + 30
        while store.size_of(digest) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert store.size_of(digest) is None


def server_env(settings: Any) -> dict[str, str]:
    """The DELTAREG_* variables that make Settings() in another process equal to ``settings``."""
    env = {}
    for key, value in settings.model_dump().items():
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if value is not None:
            env[f"DELTAREG_{key.upper()}"] = str(value)
    return env


def test_the_gc_command(registry, monkeypatch):
    version = registry.push(REPO, registry.lora_files(0))
    orphan = upload(registry, b"an orphan blob")
    runner = CliRunner()
    env = {**server_env(registry.settings), "DELTAREG_GC_GRACE_SECONDS": "3600"}

    young = runner.invoke(cli, ["gc", "--json"], env=env)
    assert young.exit_code == 0, young.output
    assert json.loads(young.output)["blobs"] == []

    dry = runner.invoke(cli, ["gc", "--grace", "0", "--dry-run", "--json"], env=env)
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.output)["blobs"] == [{"name": orphan, "size": len(b"an orphan blob")}]
    assert stored(registry, orphan)

    done = runner.invoke(cli, ["gc", "--grace", "0"], env=env)
    assert done.exit_code == 0, done.output
    assert f"removed unreferenced blob {orphan}" in done.output
    assert not stored(registry, orphan) and not recorded(registry, orphan)
    assert all(stored(registry, d) for d in blob_digests_of(version))


def test_the_gc_command_refuses_a_negative_grace(registry):
    result = CliRunner().invoke(cli, ["gc", "--grace", "-1"], env=server_env(registry.settings))
    assert result.exit_code == 2


@pytest.fixture(autouse=True)
def _no_gc_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DELTAREG_GC_GRACE_SECONDS", "DELTAREG_GC_INTERVAL_SECONDS"):
        monkeypatch.delenv(name, raising=False)
