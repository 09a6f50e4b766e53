"""Blob transfers over real HTTP on loopback.

Three kinds of server: a real registry process (filesystem store); moto's S3 server with presigned URLs
made here with boto3 (so these tests do not depend on the registry's S3 support); and ``FakeStore``, a
small http.server that stands in for an object store when a test needs a fault on cue (a connection cut
after some bytes, a corrupted byte, a part PUT answered 500).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from _support.auth import TEST_TOKEN
from rich.console import Console
from safetensors.numpy import save_file

from deltareg.client._http import make_client, request_json
from deltareg.client.api import Registry
from deltareg.client.cache import VersionCache, VersionRecord, verify_folder
from deltareg.client.errors import (
    ConnectionFailed,
    DeltaregError,
    DigestMismatch,
    PermissionDenied,
    ServiceUnavailable,
)
from deltareg.client.manifest import BaseModelRef, FileEntry, Manifest
from deltareg.client.progress import RichProgress, SilentProgress, resolve_progress
from deltareg.client.transfer import (
    MAX_PARTS,
    BlobDownload,
    Transfers,
    TransferSettings,
    UploadPlan,
    describe_blob,
    file_digest,
    part_checksums,
    part_size_for,
)

KIB, MIB = 1 << 10, 1 << 20
BASE_FINGERPRINT = "tmv1:" + "ab" * 32
TOKEN = TEST_TOKEN  # the registry accepts it (tests/_support/auth.py); the store must never see it
# Small sizes so that a 1 MiB blob takes the parallel path in 16 ranges, and failures retry at once.
FAST = TransferSettings(
    upload_workers=3,
    download_workers=4,
    parallel_download_bytes=256 * KIB,
    range_bytes=64 * KIB,
    attempts=2,
    backoff_seconds=0.01,
)
SEQUENTIAL = TransferSettings(parallel_download_bytes=1 << 40, attempts=2, backoff_seconds=0.01)


def random_bytes(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- FakeStore: an object store with faults on cue ---------------------------------------------


@dataclass
class FakeStore:
    """Serves ``blob`` at any path (with Range support) and accepts part PUTs at ``/part/<n>``."""

    url: str = ""
    blob: bytes = b""
    cut_at: int | None = None  # drop the connection when the body reaches this offset of the blob...
    cuts_left: int | None = None  # ...this many times (None: every time)
    corrupt_offset: int | None = None  # serve this byte flipped
    ignore_range: bool = False
    put_statuses: dict[int, list[int]] = field(default_factory=dict)  # part -> answers before a 200
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    parts: dict[int, bytes] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ranges_asked(self) -> list[str]:
        return [headers.get("range", "") for method, _, headers in self.requests if method == "GET"]

    def served(self) -> bytes:
        if self.corrupt_offset is None:
            return self.blob
        data = bytearray(self.blob)
        data[self.corrupt_offset] ^= 0xFF
        return bytes(data)

    def bytes_before_cut(self, start: int, end: int) -> int | None:
        with self.lock:
            if self.cut_at is None or not start <= self.cut_at < end or self.cuts_left == 0:
                return None
            if self.cuts_left is not None:
                self.cuts_left -= 1
            return self.cut_at - start

    def put_status(self, number: int) -> int:
        with self.lock:
            pending = self.put_statuses.get(number, [])
            return pending.pop(0) if pending else 200


class _StoreHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _StoreServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _record(self) -> None:
        headers = {k.lower(): v for k, v in self.headers.items()}
        with self.server.store.lock:
            self.server.store.requests.append((self.command, self.path, headers))

    def do_GET(self) -> None:
        self._record()
        store = self.server.store
        data = store.served()
        start, end, status = 0, len(data), 200
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if match and not store.ignore_range:
            start, status = int(match[1]), 206
            end = int(match[2]) + 1 if match[2] else len(data)
        self.send_response(status)
        self.send_header("Content-Length", str(end - start))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.end_headers()
        cut = store.bytes_before_cut(start, end)
        self.wfile.write(data[start : end if cut is None else start + cut])
        if cut is not None:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True

    def do_PUT(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self._record()
        number = int(self.path.split("?")[0].rsplit("/", 1)[-1])
        status = self.server.store.put_status(number)
        self.send_response(status)
        if status == 200:
            self.server.store.parts[number] = body
            self.send_header("ETag", f'"{hashlib.md5(body).hexdigest()}"')
        self.send_header("Content-Length", "0")
        self.end_headers()


class _StoreServer(ThreadingHTTPServer):
    daemon_threads = True
    store: FakeStore

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients hang up on purpose in these tests (a failed range stops the others)


@pytest.fixture
def fake_store() -> Iterator[FakeStore]:
    server = _StoreServer(("127.0.0.1", 0), _StoreHandler)
    server.store = FakeStore(url=f"http://127.0.0.1:{server.server_address[1]}")
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server.store
    server.shutdown()
    server.server_close()


@pytest.fixture
def transfers() -> Iterator[Callable[..., Transfers]]:
    """Transfers whose registry client carries a token (and is never contacted by these tests)."""
    made: list[Transfers] = []

    def make(settings: TransferSettings = FAST, **kwargs: Any) -> Transfers:
        made.append(Transfers(make_client("http://127.0.0.1:9", TOKEN), settings=settings, **kwargs))
        return made[-1]

    yield make
    for t in made:
        t.close()
        t.registry.close()


def partial_of(partials: Path, data: bytes) -> Path:
    return partials / f"{hashlib.sha256(data).hexdigest()}.partial"


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# -- downloads: resume, parallel ranges, verification ------------------------------------------


def test_an_interrupted_download_resumes_with_a_range_in_the_same_pull(fake_store, transfers, tmp_path):
    fake_store.blob = random_bytes(MIB)
    fake_store.cut_at, fake_store.cuts_left = 300_000, 1
    blob = BlobDownload(digest_of(fake_store.blob), MIB, f"{fake_store.url}/blob")

    transfers(SEQUENTIAL).download(blob, tmp_path / "out", partials=tmp_path / "partials", label="blob")

    assert (tmp_path / "out").read_bytes() == fake_store.blob
    assert fake_store.ranges_asked() == ["", "bytes=300000-"]
    assert leftovers(tmp_path / "partials") == []


def test_a_failed_pull_keeps_its_prefix_and_a_later_pull_resumes_it(fake_store, transfers, tmp_path):
    data = fake_store.blob = random_bytes(MIB, seed=1)
    fake_store.cut_at, fake_store.cuts_left = 300_000, 2  # both tries of the first pull
    manifest = Manifest(
        kind="lora",
        files=[FileEntry(path="weights.safetensors", digest=digest_of(data), size=len(data))],
        base=BaseModelRef(fingerprint=BASE_FINGERPRINT),
    )
    record = VersionRecord(repo="acme/resume", number=1, digest=manifest.digest, manifest=manifest)
    cache, partials = VersionCache(tmp_path / "cache"), tmp_path / "cache" / "partials"
    client = transfers(SEQUENTIAL)

    def fetch(entry: FileEntry, dest: Path) -> None:
        blob = BlobDownload(entry.digest, entry.size, f"{fake_store.url}/blob")
        client.download(blob, dest, partials=partials, label=entry.path)

    with pytest.raises(ConnectionFailed):
        cache.install(record, fetch)
    assert cache.lookup(record.digest) is None
    assert leftovers(cache.root) == []  # no version folder, not even a staging one
    assert partial_of(partials, data).stat().st_size == 300_000
    assert leftovers(partials) == [partial_of(partials, data).name]

    folder = cache.install(record, fetch)

    assert fake_store.ranges_asked() == ["", "bytes=300000-", "bytes=300000-"]
    assert (folder / "weights.safetensors").read_bytes() == data
    assert verify_folder(folder) == record
    assert leftovers(partials) == []


def test_a_large_blob_downloads_in_parallel_ranges_and_verifies(fake_store, transfers, tmp_path):
    fake_store.blob = random_bytes(MIB + 123, seed=2)
    blob = BlobDownload(digest_of(fake_store.blob), len(fake_store.blob), f"{fake_store.url}/blob")

    transfers().download(blob, tmp_path / "out", partials=tmp_path / "partials", label="blob")

    assert (tmp_path / "out").read_bytes() == fake_store.blob
    starts = sorted(int(r.removeprefix("bytes=").split("-")[0]) for r in fake_store.ranges_asked())
    assert starts == list(range(0, len(fake_store.blob), 64 * KIB))  # 17 ranges of at most 64 KiB
    assert leftovers(tmp_path / "partials") == []


def test_a_failed_range_keeps_the_hashed_prefix_for_the_next_pull(fake_store, transfers, tmp_path):
    data = fake_store.blob = random_bytes(MIB, seed=3)
    fake_store.cut_at = 5 * 64 * KIB + 1000  # inside the 6th range, on every try
    blob = BlobDownload(digest_of(data), MIB, f"{fake_store.url}/blob")
    partials = tmp_path / "partials"

    with pytest.raises(ConnectionFailed):
        transfers().download(blob, tmp_path / "out", partials=partials, label="blob")
    assert not (tmp_path / "out").exists()
    # The five ranges before the failed one were hashed; the file is cut back to exactly them.
    assert partial_of(partials, data).read_bytes() == data[: 5 * 64 * KIB]
    assert leftovers(partials) == [partial_of(partials, data).name]

    fake_store.cut_at, fake_store.requests = None, []
    transfers().download(blob, tmp_path / "out", partials=partials, label="blob")

    starts = sorted(int(r.removeprefix("bytes=").split("-")[0]) for r in fake_store.ranges_asked())
    assert starts == list(range(5 * 64 * KIB, MIB, 64 * KIB))
    assert (tmp_path / "out").read_bytes() == data


def test_after_a_killed_parallel_download_only_the_recorded_prefix_is_trusted(
    fake_store, transfers, tmp_path
):
    data = fake_store.blob = random_bytes(MIB, seed=4)
    partials = tmp_path / "partials"
    partials.mkdir()
    # What SIGKILL leaves: the full-size preallocated file, bytes past the hashed prefix not all written.
    partial_of(partials, data).write_bytes(data[:200_000] + bytes(MIB - 200_000))
    partial_of(partials, data).with_suffix(".prefix").write_text("200000")

    blob = BlobDownload(digest_of(data), MIB, f"{fake_store.url}/blob")
    transfers().download(blob, tmp_path / "out", partials=partials, label="blob")

    assert (tmp_path / "out").read_bytes() == data
    assert min(int(r.removeprefix("bytes=").split("-")[0]) for r in fake_store.ranges_asked()) == 200_000
    assert leftovers(partials) == []


@pytest.mark.parametrize("settings", [FAST, SEQUENTIAL], ids=["parallel", "sequential"])
def test_a_corrupted_byte_raises_digest_mismatch_and_keeps_nothing(fake_store, transfers, tmp_path, settings):
    data = fake_store.blob = random_bytes(MIB, seed=5)
    fake_store.corrupt_offset = 700_000
    blob = BlobDownload(digest_of(data), MIB, f"{fake_store.url}/blob")

    with pytest.raises(DigestMismatch, match="nothing was kept"):
        transfers(settings).download(blob, tmp_path / "out", partials=tmp_path / "partials", label="blob")

    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path / "partials") == []


def test_a_corrupted_partial_from_an_earlier_pull_is_caught_and_deleted(fake_store, transfers, tmp_path):
    data = fake_store.blob = random_bytes(MIB, seed=6)
    partials = tmp_path / "partials"
    partials.mkdir()
    partial_of(partials, data).write_bytes(b"\0" * 1000 + data[1000:400_000])
    blob = BlobDownload(digest_of(data), MIB, f"{fake_store.url}/blob")

    with pytest.raises(DigestMismatch):
        transfers().download(blob, tmp_path / "out", partials=partials, label="blob")
    assert not (tmp_path / "out").exists() and leftovers(partials) == []

    transfers().download(blob, tmp_path / "out", partials=partials, label="blob")  # starts afresh
    assert (tmp_path / "out").read_bytes() == data


def test_a_server_that_ignores_ranges_still_gives_a_verified_file(fake_store, transfers, tmp_path):
    data = fake_store.blob = random_bytes(MIB, seed=7)
    fake_store.ignore_range = True
    blob = BlobDownload(digest_of(data), MIB, f"{fake_store.url}/blob")

    transfers().download(blob, tmp_path / "out", partials=tmp_path / "partials", label="blob")

    assert (tmp_path / "out").read_bytes() == data


def test_a_blob_of_another_size_is_a_digest_mismatch(fake_store, transfers, tmp_path):
    data = fake_store.blob = random_bytes(MIB, seed=8)
    blob = BlobDownload(digest_of(data), MIB + 1, f"{fake_store.url}/blob")

    with pytest.raises(DigestMismatch):
        transfers().download(blob, tmp_path / "out", partials=tmp_path / "partials", label="blob")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path / "partials") == []


# -- uploads: parts in parallel, retried, never with our token ---------------------------------


def multipart_plan(store: FakeStore, data: bytes, part_size: int) -> UploadPlan:
    parts = [
        {"number": n + 1, "url": f"{store.url}/part/{n + 1}?X-Amz-Signature=s", "offset": o, "size": s}
        for n, (o, s) in enumerate((o, min(part_size, len(data) - o)) for o in range(0, len(data), part_size))
    ]
    upload = {"kind": "multipart", "upload_id": "up-1", "part_size": part_size, "parts": parts}
    plan = {"digest": digest_of(data), "size": len(data), "present": False, "upload_url": None}
    return UploadPlan.from_json({**plan, "upload": upload})


def test_parts_upload_in_parallel_and_a_failed_part_is_retried(fake_store, transfers, tmp_path):
    data = random_bytes(700 * KIB, seed=9)
    (tmp_path / "blob").write_bytes(data)
    fake_store.put_statuses = {2: [500]}

    completed = transfers().send(multipart_plan(fake_store, data, 256 * KIB), tmp_path / "blob", label="b")

    assert [p.number for p in completed] == [1, 2, 3]
    assert [p.etag for p in completed] == [
        f'"{hashlib.md5(fake_store.parts[n]).hexdigest()}"' for n in (1, 2, 3)
    ]
    assert b"".join(fake_store.parts[n] for n in (1, 2, 3)) == data
    puts = [path for method, path, _ in fake_store.requests if method == "PUT"]
    assert sorted(p.split("?")[0] for p in puts) == ["/part/1", "/part/2", "/part/2", "/part/3"]
    assert all("authorization" not in headers for _, _, headers in fake_store.requests)


def test_each_part_is_sent_with_its_own_headers_and_reports_its_checksum(fake_store, transfers, tmp_path):
    # An S3 store signs each part's CRC32 into its URL: the part must carry exactly that header, or S3
    # refuses it (moto does not check, so this is where the client's side of it is tested).
    data = random_bytes(700 * KIB, seed=12)
    (tmp_path / "blob").write_bytes(data)
    plain = multipart_plan(fake_store, data, 256 * KIB)
    crcs = [f"crc-of-{part.number}" for part in plain.parts]
    parts = tuple(
        replace(part, headers={"x-amz-checksum-crc32": crc}, checksum_crc32=crc)
        for part, crc in zip(plain.parts, crcs, strict=True)
    )

    completed = transfers().send(replace(plain, parts=parts), tmp_path / "blob", label="b")

    assert [p.checksum_crc32 for p in completed] == crcs
    sent = {path.split("?")[0]: headers for method, path, headers in fake_store.requests if method == "PUT"}
    assert {path: h.get("x-amz-checksum-crc32") for path, h in sent.items()} == {
        f"/part/{n}": f"crc-of-{n}" for n in (1, 2, 3)
    }


def test_a_part_refused_with_403_is_not_retried(fake_store, transfers, tmp_path):
    data = random_bytes(300 * KIB, seed=10)
    (tmp_path / "blob").write_bytes(data)
    fake_store.put_statuses = {1: [403]}

    with pytest.raises(PermissionDenied, match="part 1 of b"):
        transfers().send(multipart_plan(fake_store, data, 300 * KIB), tmp_path / "blob", label="b")
    assert len(fake_store.requests) == 1


def test_a_part_failing_on_every_try_gives_up_with_a_clear_error(fake_store, transfers, tmp_path):
    data = random_bytes(300 * KIB, seed=11)
    (tmp_path / "blob").write_bytes(data)
    fake_store.put_statuses = {1: [503, 503, 503]}

    with pytest.raises(ServiceUnavailable, match="part 1 of b.*503"):
        transfers().send(multipart_plan(fake_store, data, 300 * KIB), tmp_path / "blob", label="b")
    assert len(fake_store.requests) == FAST.attempts


def test_error_messages_never_show_a_presigned_signature(fake_store, transfers, tmp_path):
    data = random_bytes(10 * KIB, seed=12)
    (tmp_path / "blob").write_bytes(data)
    fake_store.put_statuses = {1: [400]}

    with pytest.raises(DeltaregError) as caught:
        transfers().send(multipart_plan(fake_store, data, 10 * KIB), tmp_path / "blob", label="b")
    assert "X-Amz-Signature" not in str(caught.value) and fake_store.url in str(caught.value)


@pytest.mark.parametrize(
    "upload",
    [
        {
            "kind": "multipart",
            "upload_id": "u",
            "part_size": 5,
            "parts": [{"number": 1, "url": "http://x/1", "offset": 0, "size": 5}],
        },
        {
            "kind": "multipart",
            "upload_id": "u",
            "part_size": 10,
            "parts": [
                {"number": 1, "url": "http://x/1", "offset": 0, "size": 6},
                {"number": 2, "url": "http://x/2", "offset": 5, "size": 5},
            ],
        },
        {"kind": "teleport", "url": "http://x"},
    ],
    ids=["short", "overlapping", "unknown-kind"],
)
def test_an_upload_plan_the_client_cannot_follow_is_refused(upload):
    with pytest.raises(DeltaregError, match="cannot follow"):
        UploadPlan.from_json({"digest": "sha256:" + "a" * 64, "size": 10, "present": False, "upload": upload})


def test_a_plan_from_an_older_registry_is_one_put():
    plan = UploadPlan.from_json(
        {"digest": "sha256:" + "a" * 64, "size": 1, "present": False, "upload_url": "/u"}
    )
    assert (plan.kind, plan.url) == ("put", "/u")


# -- moto (the shared ``moto_s3`` fixture): presigned URLs made here by boto3 -------------------


def test_presigned_put_and_parallel_presigned_get_on_moto(moto_s3, transfers, tmp_path):
    s3, bucket, data = moto_s3.client(), moto_s3.make_bucket(), random_bytes(MIB + 7, seed=13)
    (tmp_path / "blob").write_bytes(data)
    checksum = base64.b64encode(hashlib.sha256(data).digest()).decode()
    url = s3.generate_presigned_url(
        "put_object", Params={"Bucket": bucket, "Key": "k", "ChecksumSHA256": checksum}, ExpiresIn=300
    )
    headers = {"x-amz-checksum-sha256": checksum, "Content-Type": "application/octet-stream"}
    plan = UploadPlan.from_json(
        {
            "digest": digest_of(data),
            "size": len(data),
            "present": False,
            "upload_url": url,
            "upload": {"kind": "put", "url": url, "headers": headers},
        }
    )

    assert transfers().send(plan, tmp_path / "blob", label="k") == []
    assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == data

    get_url = s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "k"})
    blob = BlobDownload(digest_of(data), len(data), get_url)
    transfers().download(blob, tmp_path / "out", partials=tmp_path / "partials", label="k")
    assert (tmp_path / "out").read_bytes() == data


def test_multipart_upload_through_presigned_part_urls_on_moto(moto_s3, transfers, tmp_path):
    s3, bucket, data = moto_s3.client(), moto_s3.make_bucket(), random_bytes(11 * MIB, seed=14)
    (tmp_path / "blob").write_bytes(data)
    part_size = 5 * MIB  # S3's smallest part (but the last)
    upload_id = s3.create_multipart_upload(Bucket=bucket, Key="m")["UploadId"]
    parts = [
        {
            "number": n,
            "url": s3.generate_presigned_url(
                "upload_part", Params={"Bucket": bucket, "Key": "m", "UploadId": upload_id, "PartNumber": n}
            ),
            "offset": (n - 1) * part_size,
            "size": min(part_size, len(data) - (n - 1) * part_size),
        }
        for n in (1, 2, 3)
    ]
    plan = UploadPlan.from_json(
        {
            "digest": digest_of(data),
            "size": len(data),
            "present": False,
            "upload_url": None,
            "upload": {"kind": "multipart", "upload_id": upload_id, "part_size": part_size, "parts": parts},
        }
    )

    completed = transfers().send(plan, tmp_path / "blob", label="m")
    s3.complete_multipart_upload(
        Bucket=bucket,
        Key="m",
        UploadId=upload_id,
        MultipartUpload={"Parts": [{"PartNumber": p.number, "ETag": p.etag} for p in completed]},
    )

    assert s3.get_object(Bucket=bucket, Key="m")["Body"].read() == data


# -- progress ----------------------------------------------------------------------------------


@dataclass
class Recorder:
    started: list[tuple[str, int, int]] = field(default_factory=list)
    moved: int = 0
    finished: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, label: str, total: int, *, completed: int = 0) -> int:
        self.started.append((label, total, completed))
        return len(self.started)

    def advance(self, task: int, amount: int) -> None:
        with self.lock:
            self.moved += amount

    def finish(self, task: int) -> None:
        self.finished += 1


def test_progress_counts_every_byte_once_even_across_retries(fake_store, transfers, tmp_path):
    data = random_bytes(700 * KIB, seed=15)
    (tmp_path / "blob").write_bytes(data)
    fake_store.put_statuses = {2: [500]}
    recorder = Recorder()
    transfers(progress=recorder).send(
        multipart_plan(fake_store, data, 256 * KIB), tmp_path / "blob", label="b"
    )
    assert (recorder.started, recorder.moved, recorder.finished) == ([("push b", len(data), 0)], len(data), 1)

    fake_store.blob, fake_store.cut_at, fake_store.cuts_left = data, 100_000, 1
    recorder = Recorder()
    blob = BlobDownload(digest_of(data), len(data), f"{fake_store.url}/blob")
    transfers(progress=recorder).download(blob, tmp_path / "out", partials=tmp_path / "p", label="b")
    assert (recorder.started, recorder.moved, recorder.finished) == ([("pull b", len(data), 0)], len(data), 1)


def test_rich_progress_draws_bars_for_large_files_only():
    out = io.StringIO()
    progress = RichProgress(min_bytes=MIB, console=Console(file=out, force_terminal=True, width=100))
    small = progress.start("pull small.json", 10)
    large = progress.start("pull big.safetensors", 4 * MIB)
    progress.advance(small, 10)
    progress.advance(large, 4 * MIB)
    progress.finish(small)
    progress.finish(large)
    assert "big.safetensors" in out.getvalue() and "small.json" not in out.getvalue()


class _FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_shows_by_default_only_on_a_terminal(monkeypatch):
    recorder = Recorder()
    assert resolve_progress(recorder) is recorder
    assert isinstance(resolve_progress(False), SilentProgress)
    assert isinstance(resolve_progress(True), RichProgress)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert isinstance(resolve_progress(None), SilentProgress)
    monkeypatch.setattr(sys, "stderr", _FakeTerminal())
    assert isinstance(resolve_progress(None), RichProgress)


# -- a real registry (filesystem store) --------------------------------------------------------


@contextmanager
def running_registry(data_dir: Path, env: dict[str, str] | None = None) -> Iterator[str]:
    """``python -m deltareg.registry.serve`` on a free port (SQLite in ``data_dir``), until the block ends."""
    port = free_port()
    log = (data_dir.parent / f"registry-{port}.log").open("wb")
    command = [
        sys.executable,
        "-m",
        "deltareg.registry.serve",
        "--port",
        str(port),
        "--data-dir",
        str(data_dir),
    ]
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_up(url, proc)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        log.close()


def _wait_up(url: str, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(300):
        assert proc.poll() is None, f"registry exited early with code {proc.returncode}"
        try:
            if httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError(f"registry did not come up at {url}")


@pytest.fixture(scope="module")
def registry_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A registry with its filesystem store."""
    with running_registry(tmp_path_factory.mktemp("registry")) as url:
        yield url


@pytest.fixture(scope="module")
def s3_registry_url(tmp_path_factory: pytest.TempPathFactory, moto_s3: Any) -> Iterator[str]:
    """A registry on moto S3 that uploads blobs of 5 MiB or more in parts of 5 MiB (S3's smallest)."""
    env = {
        "DELTAREG_STORAGE_URL": f"s3://{moto_s3.make_bucket()}/registry",
        "DELTAREG_S3_ENDPOINT_URL": moto_s3.endpoint_url,
        "DELTAREG_MULTIPART_THRESHOLD": str(5 * MIB),
        "DELTAREG_MULTIPART_PART_SIZE": str(5 * MIB),
    }
    with running_registry(tmp_path_factory.mktemp("s3-registry"), env) as url:
        yield url


def write_adapter(folder: Path, seed: int, in_features: int = 3 * 2**17) -> Path:
    """A LoRA adapter folder (rank 2) whose weights file is ``8 * in_features`` bytes and change."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    tensors = {
        "base_model.model.layer.lora_A.weight": rng.standard_normal((2, in_features)).astype(np.float32),
        "base_model.model.layer.lora_B.weight": rng.standard_normal((4, 2)).astype(np.float32),
    }
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["layer"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def test_push_then_pull_in_parallel_ranges_through_a_real_registry(registry_url, tmp_path):
    adapter = write_adapter(tmp_path / "adapter", seed=1)
    with Registry(
        registry_url, TOKEN, cache_dir=tmp_path / "c1", progress=False, transfer_settings=FAST
    ) as reg:
        first = reg.push(adapter, "acme/transfers", base=BASE_FINGERPRINT)
        again = reg.push(adapter, "acme/transfers", base=BASE_FINGERPRINT, metadata={"run": 2})
    assert (first.uploaded_blobs, first.uploaded_bytes) == (
        2,
        sum(f.size for f in first.version.manifest.files),
    )
    assert (again.uploaded_blobs, again.uploaded_bytes) == (0, 0)  # the store has both: nothing is sent

    recorder = Recorder()
    with Registry(registry_url, cache_dir=tmp_path / "c2", progress=recorder, transfer_settings=FAST) as reg:
        pulled = reg.pull(f"acme/transfers:{first.version.number}")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (pulled.path / name).read_bytes() == (adapter / name).read_bytes()
    verify_folder(pulled.path)
    assert leftovers(tmp_path / "c2" / "partials") == []
    assert recorder.moved == sum(f.size for f in first.version.manifest.files)


def test_multipart_push_and_presigned_pull_through_a_registry_on_s3(s3_registry_url, tmp_path):
    adapter = write_adapter(tmp_path / "adapter", seed=2, in_features=1_400_000)  # 11.2 MB of weights
    weights = adapter / "adapter_model.safetensors"
    with Registry(
        s3_registry_url, TOKEN, cache_dir=tmp_path / "c1", progress=False, transfer_settings=FAST
    ) as reg:
        wanted = {"digest": digest_of(weights.read_bytes()), "size": weights.stat().st_size}
        answer = request_json(reg._http, "POST", "/api/v1/blobs/uploads", json={"blobs": [wanted]})
        plan = UploadPlan.from_json(answer["blobs"][0])
        assert (plan.kind, len(plan.parts)) == ("multipart", 3)
        assert all(httpx.URL(part.url).is_absolute_url for part in plan.parts)

        pushed = reg.push(adapter, "acme/on-s3", base=BASE_FINGERPRINT)
        again = reg.push(adapter, "acme/on-s3", base=BASE_FINGERPRINT, metadata={"run": 2})
    assert pushed.uploaded_blobs == 2 and again.uploaded_blobs == 0

    with Registry(s3_registry_url, cache_dir=tmp_path / "c2", progress=False, transfer_settings=FAST) as reg:
        located = reg.transfers.locate([wanted["digest"]])
        assert httpx.URL(located[wanted["digest"]].url).is_absolute_url  # presigned: S3 serves it
        pulled = reg.pull(f"acme/on-s3:{pushed.version.number}")
    assert (pulled.path / "adapter_model.safetensors").read_bytes() == weights.read_bytes()
    verify_folder(pulled.path)
    assert leftovers(tmp_path / "c2" / "partials") == []


# ---------------------------------------------------------------- part checksums


def crc32_b64(data: bytes) -> str:
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


@pytest.mark.parametrize("size", [0, 1, 3 * MIB, 3 * MIB + 1, 7 * MIB + 12345])
def test_part_checksums_are_each_parts_crc32_the_last_part_shorter(tmp_path, size):
    data = random.Random(size).randbytes(size)
    path = tmp_path / "blob"
    path.write_bytes(data)
    checksums = part_checksums(path, 3 * MIB)
    expected = [crc32_b64(data[i : i + 3 * MIB]) for i in range(0, max(size, 1), 3 * MIB)]
    assert checksums.part_size == 3 * MIB
    assert list(checksums.crc32) == expected


def test_describe_blob_gives_the_digest_and_the_part_checksums_of_the_same_bytes(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(random.Random(7).randbytes(5 * MIB + 3))
    digest, checksums = describe_blob(path, 2 * MIB)
    assert digest == file_digest(path)
    assert checksums == part_checksums(path, 2 * MIB)


def test_the_proposed_part_size_grows_so_that_no_upload_needs_more_than_10000_parts():
    assert part_size_for(10 * MIB, 16 * MIB) == 16 * MIB
    huge = MAX_PARTS * 16 * MIB + 1
    grown = part_size_for(huge, 16 * MIB)
    assert grown % MIB == 0 and grown > 16 * MIB
    assert -(-huge // grown) <= MAX_PARTS


def test_a_multipart_push_to_s3_sends_every_part_with_its_signed_crc32(s3_registry_url, moto_s3, tmp_path):
    # 11.2 MB in parts of 5 MiB: three parts, each sent with the CRC32 the client computed while hashing
    # the file (the store checks each part against it), and the object keeps S3's checksum of them.
    adapter = write_adapter(tmp_path / "adapter", seed=3, in_features=1_400_000)
    weights = adapter / "adapter_model.safetensors"
    settings = TransferSettings(upload_workers=3, part_bytes=5 * MIB, attempts=2, backoff_seconds=0.01)
    with Registry(
        s3_registry_url, TOKEN, cache_dir=tmp_path / "c", progress=False, transfer_settings=settings
    ) as reg:
        digest, checksums = describe_blob(weights, settings.part_bytes)
        wanted = {"digest": digest, "size": weights.stat().st_size, "parts": checksums.to_json_obj()}
        answer = request_json(reg._http, "POST", "/api/v1/blobs/uploads", json={"blobs": [wanted]})
        plan = UploadPlan.from_json(answer["blobs"][0])
        assert [part.checksum_crc32 for part in plan.parts] == list(checksums.crc32)
        assert len(plan.parts) == 3
        for part in plan.parts:
            assert part.headers == {"x-amz-checksum-crc32": part.checksum_crc32}
            signed = httpx.URL(part.url).params["X-Amz-SignedHeaders"].split(";")
            assert "x-amz-checksum-crc32" in signed  # S3 refuses x-amz-* headers left unsigned

        pushed = reg.push(adapter, "acme/crc32", base=BASE_FINGERPRINT)
        located = reg.transfers.locate([digest])  # a presigned URL: /<bucket>/<key of the blob>
    assert any(f.digest == digest for f in pushed.version.manifest.files)
    bucket, key = httpx.URL(located[digest].url).path.lstrip("/").split("/", 1)
    head = moto_s3.client().head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    # S3's composite checksum: the CRC32 of the parts' CRC32s, so made of exactly the ones we sent.
    composite = crc32_b64(b"".join(base64.b64decode(value) for value in checksums.crc32))
    assert head["ChecksumCRC32"].split("-")[0] == composite
