"""Request ids: taken from a sane X-Request-ID or made up, echoed in the response, carried by every log
record of the request (JSON logs with DELTAREG_LOG_FORMAT=json), and quoted in a 500's message."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from _support.auth import TEST_TOKEN, bearer
from _support.servers import FIVE_XX, Backend, ServerProcess
from sqlalchemy import text

from deltareg.registry.db import make_engine
from deltareg.registry.observability.logs import LogFormat, RequestIdFilter, formatter

pytestmark = pytest.mark.backends("sqlite-fs")  # nothing here depends on the database or the store
GENERATED = re.compile(r"[0-9a-f]{32}")


@pytest.mark.parametrize("sent", ["abc-123", "A.b_C-9", "x" * 128, "0"])
def test_a_sane_request_id_is_echoed(client, sent):
    assert client.get("/healthz", headers={"X-Request-ID": sent}).headers["x-request-id"] == sent


def test_a_request_id_is_made_up_when_none_is_sent(client):
    first, second = (client.get("/healthz").headers["x-request-id"] for _ in range(2))
    assert GENERATED.fullmatch(first) and GENERATED.fullmatch(second) and first != second


@pytest.mark.parametrize("sent", ["", "with space", "x" * 129, 'quote"d', "semi;colon", "ünï"])
def test_a_malformed_request_id_is_replaced(client, sent):
    answered = client.get("/healthz", headers={"X-Request-ID": sent.encode()}).headers["x-request-id"]
    assert GENERATED.fullmatch(answered)


@contextmanager
def captured(log_format: LogFormat) -> Iterator[io.StringIO]:
    """What the registry logs meanwhile, through the server's formatter and request-id filter."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter(log_format))
    handler.addFilter(RequestIdFilter())
    logger = logging.getLogger("deltareg")
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    with captured("json") as stream:
        yield stream


def records(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_the_access_line_is_json_with_the_route_template_and_no_secrets(client, json_log):
    response = client.get(
        "/api/v1/repos/acme/bot", params={"secret": "s3cr3t-in-query"}, headers={"X-Request-ID": "req-1"}
    )
    assert response.status_code == 404
    (access,) = [r for r in records(json_log) if r["logger"] == "deltareg.access"]
    assert access["request_id"] == "req-1"
    assert (access["method"], access["route"], access["status"]) == (
        "GET",
        "/api/v1/repos/{namespace}/{name}",
        404,
    )
    assert isinstance(access["duration_ms"], float) and access["level"] == "INFO"
    assert {"time", "message"} <= access.keys()
    logged = json_log.getvalue()
    assert "s3cr3t-in-query" not in logged and TEST_TOKEN not in logged and "acme" not in logged


def test_a_500_quotes_its_request_id_and_its_log_lines_carry_it(client, settings, json_log):
    engine = make_engine(settings.database_url)  # a genuinely unexpected failure: the table is gone
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE repos"))  # SQLite: no dependent table stops it
    engine.dispose()
    with captured("text") as text_log:
        response = client.get("/api/v1/repos", headers={"X-Request-ID": "broken-42"})
    assert response.status_code == 500
    assert response.headers["x-request-id"] == "broken-42"
    assert "(request id broken-42)" in response.json()["detail"]
    logged = records(json_log)
    (error,) = [r for r in logged if r["level"] == "ERROR"]
    assert error["request_id"] == "broken-42" and "Traceback" in error["exc_info"]
    (access,) = [r for r in logged if r["logger"] == "deltareg.access"]
    assert (access["request_id"], access["status"]) == ("broken-42", 500)
    # The text access line still shows a 5xx the way test servers look for one (_support.servers).
    (text_access,) = [line for line in text_log.getvalue().splitlines() if " deltareg.access " in line]
    assert "[broken-42]" in text_access and FIVE_XX.search(text_access)


@pytest.mark.slow
def test_a_real_server_writes_json_lines_with_request_ids(tmp_path: Path):
    backend = Backend("sqlite-fs", {"DELTAREG_LOG_FORMAT": "json"}, tmp_path / "data")
    server = ServerProcess(backend, tmp_path / "server.log")
    server.start()
    try:
        answer = httpx.get(
            f"{server.url}/api/v1/repos", headers={**bearer(TEST_TOKEN), "X-Request-ID": "e2e-7"}
        )
        assert answer.status_code == 200 and answer.headers["x-request-id"] == "e2e-7"
        assert httpx.get(f"{server.url}/nowhere?token=hidden-value").status_code == 404
    finally:
        server.stop()
    lines = server.log_path.read_text().splitlines()
    # What `deltareg serve` prints itself (where it listens, its admin token file) is plain text on
    # stdout; every log line is JSON.
    printed = [line for line in lines if line.startswith(("deltareg registry listening", "created an admin"))]
    logged = [json.loads(line) for line in lines if line not in printed]
    assert len(printed) == 2
    access = [r for r in logged if r["logger"] == "deltareg.access"]
    (ours,) = [r for r in access if r["request_id"] == "e2e-7"]
    assert (ours["method"], ours["route"], ours["status"]) == ("GET", "/api/v1/repos", 200)
    assert any(r["route"] == "<unmatched>" and r["status"] == 404 for r in access)
    assert any(r["logger"].startswith("uvicorn") for r in logged)  # uvicorn's own lines are JSON too
    assert all({"time", "level", "logger", "message", "request_id"} <= r.keys() for r in logged)
    assert all(datetime.fromisoformat(r["time"]).utcoffset() == timedelta(0) for r in logged)
    text_log = server.log_path.read_text()
    assert "hidden-value" not in text_log and TEST_TOKEN not in text_log
