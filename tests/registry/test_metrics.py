"""GET /metrics: what each counter counts (only what committed), the latency histogram's labels (route
templates, never raw paths), the GC counters of the periodic task, and one registry of metrics per app."""

from __future__ import annotations

import time
from typing import Any

import pytest
from _support.auth import TEST_TOKEN
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import event

REPO = "acme/bot"
GUARD_SECONDS = 60  # only stops a hung test; nothing is asserted about speed
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(client: Any) -> Samples:
    """Every sample of ``GET /metrics``, parsed by prometheus_client's own parser."""
    response = client.get("/metrics", headers={"Authorization": ""})  # public: no token needed
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def counters(client: Any) -> dict[str, float]:
    samples = scrape(client)
    names = ("deltareg_pushes_total", "deltareg_pulls_total", "deltareg_policy_refusals_total")
    found = {name: value(samples, name) for name in names}
    for direction in ("upload", "download"):
        found[direction] = value(samples, "deltareg_blob_bytes_total", direction=direction)
    return found


def test_a_push_counts_one_push_and_the_bytes_uploaded(registry):
    files = registry.lora_files()
    registry.push(REPO, files)
    assert counters(registry.client) == {
        "deltareg_pushes_total": 1,
        "deltareg_pulls_total": 0,
        "deltareg_policy_refusals_total": 0,
        "upload": sum(len(data) for data in files.values()),
        "download": 0,
    }
    # The same manifest again is the same version, and present blobs are not uploaded again.
    registry.push(REPO, files)
    assert registry.put_blob(files["adapter_config.json"]).status_code == 200
    assert counters(registry.client)["deltareg_pushes_total"] == 1
    assert counters(registry.client)["upload"] == sum(len(data) for data in files.values())


def test_a_refused_push_is_not_counted(registry):
    files = registry.lora_files()
    # The blobs were never uploaded: the push is refused (and its refusal audited, in a commit of its own).
    response = registry.create_version(REPO, registry.manifest_for(files))
    assert response.status_code == 400, response.text
    assert counters(registry.client)["deltareg_pushes_total"] == 0


@pytest.mark.backends("postgres-fs")
def test_a_push_whose_commit_fails_is_not_counted(registry, postgres_server):
    files = registry.lora_files()
    registry.upload_all(files)
    engine = registry.client.app.state.database.engine

    def kill_before_commit(conn: Any) -> None:
        pid = conn.connection.dbapi_connection.info.backend_pid
        with postgres_server._admin() as other:
            other.execute("SELECT pg_terminate_backend(%s)", (pid,))

    event.listen(engine, "commit", kill_before_commit)
    try:
        response = registry.create_version(REPO, registry.manifest_for(files))
    finally:
        event.remove(engine, "commit", kill_before_commit)
    assert response.status_code == 503, response.text
    assert counters(registry.client)["deltareg_pushes_total"] == 0
    registry.push(REPO, files)
    assert counters(registry.client)["deltareg_pushes_total"] == 1


def test_a_pull_counts_the_blobs_planned_and_their_bytes(registry):
    files = registry.lora_files()
    registry.push(REPO, files)
    data = files["adapter_model.safetensors"]
    assert registry.download(registry.digest_of(data)).content == data
    found = counters(registry.client)
    assert (found["deltareg_pulls_total"], found["download"]) == (1, len(data))
    # An unknown blob is a 404, not a pull.
    unknown = registry.client.post("/api/v1/blobs/downloads", json={"digests": ["sha256:" + "0" * 64]})
    assert unknown.status_code == 404
    assert counters(registry.client)["deltareg_pulls_total"] == 1


def test_a_policy_refusal_is_counted(registry):
    registry.push(REPO, registry.lora_files(0))
    registry.push(REPO, registry.lora_files(1))
    alias = f"/api/v1/repos/{REPO}/aliases/production"
    assert registry.client.put(alias, json={"version": 1, "expected": None}).status_code == 200
    policy = registry.client.put(alias + "/policy", json={"approvals": 1})
    assert policy.status_code == 200, policy.text
    assert counters(registry.client)["deltareg_policy_refusals_total"] == 0

    refused = registry.client.put(alias, json={"version": 2, "expected": 1})
    assert (refused.status_code, refused.json()["error"]) == (403, "policy_violation")
    assert counters(registry.client)["deltareg_policy_refusals_total"] == 1
    # Other refusals (here a version that does not exist) are not policy refusals.
    assert registry.client.put(alias, json={"version": 9, "expected": 1}).status_code == 404
    assert counters(registry.client)["deltareg_policy_refusals_total"] == 1


def test_the_periodic_gc_is_counted(make_registry, monkeypatch):
    garbage = b"a blob that no version references"
    with make_registry() as registry:
        registry.upload(garbage)
    # Another app on the same database and store, collecting on its own every 50 ms with no grace.
    monkeypatch.setenv("DELTAREG_GC_INTERVAL_SECONDS", "0.05")
    monkeypatch.setenv("DELTAREG_GC_GRACE_SECONDS", "0")
    with make_registry() as collecting:
        deadline = time.monotonic() + GUARD_SECONDS
        while value(scrape(collecting.client), "deltareg_gc_blobs_removed_total") < 1:
            assert time.monotonic() < deadline, "the periodic gc removed nothing"
            time.sleep(0.05)
        samples = scrape(collecting.client)
    assert value(samples, "deltareg_gc_runs_total") >= 1
    assert value(samples, "deltareg_gc_blobs_removed_total") == 1
    assert value(samples, "deltareg_gc_bytes_removed_total") == len(garbage)
    assert registry.digest_of(garbage) not in collecting.published()


def test_the_latency_histogram_names_route_templates_never_raw_paths(registry):
    registry.push(REPO, registry.lora_files())
    assert registry.client.get(f"/api/v1/repos/{REPO}").status_code == 200
    assert registry.client.get("/api/v1/repos/acme/nothing-here").status_code == 404
    assert registry.client.get("/no/such/acme/path").status_code == 404
    response = registry.client.get("/metrics")
    samples = scrape(registry.client)

    name = "deltareg_http_request_duration_seconds_count"
    repo_route = "/api/v1/repos/{namespace}/{name}"
    assert value(samples, name, method="GET", route=repo_route, status="200") == 1
    assert value(samples, name, method="GET", route=repo_route, status="404") == 1
    assert value(samples, name, method="GET", route="<unmatched>", status="404") == 1
    assert value(samples, name, method="POST", route=repo_route + "/versions", status="201") == 1
    # No repo name, path or token anywhere in the exposition.
    assert "acme" not in response.text and "nothing-here" not in response.text
    assert TEST_TOKEN not in response.text and "Bearer" not in response.text


def test_metrics_parse_and_describe_the_build(client):
    samples = scrape(client)
    (build,) = [labels for (name, labels) in samples if name == "deltareg_build_info"]
    assert {"version", "python"} <= dict(build).keys()
    for counter in ("pushes", "pulls", "policy_refusals", "gc_runs", "gc_blobs_removed", "gc_bytes_removed"):
        assert (f"deltareg_{counter}_total", frozenset()) in samples


def test_each_app_has_its_own_metrics(registry, make_registry):
    registry.push(REPO, registry.lora_files())
    with make_registry() as other:
        assert counters(other.client)["deltareg_pushes_total"] == 0
    assert counters(registry.client)["deltareg_pushes_total"] == 1
