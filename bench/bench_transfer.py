"""Benchmark: deltareg blob transfers vs raw boto3 against the same S3 endpoint (moto over loopback).

A moto S3 server runs in a subprocess (so it does not share this process's GIL). One random blob (default
512 MB) is written to a local file and uploaded once. Then, in each round, in alternating order:

- pull: deltareg's download of a presigned GET URL (parallel ranges, sha256 overlapped, size + digest
  verified, renamed into place) vs boto3 ``download_file`` of the same object (no verification);
- push: deltareg's upload path -- sha256 of the file, then the multipart plan's parts sent in parallel
  to presigned part URLs, each retried on failure, then the multipart completion -- vs boto3
  ``upload_file``. The plan's presigned part URLs and the completion are made here with boto3, standing
  in for the registry server (the S3 upload planning is the server's side of the protocol).

Medians over the rounds; targets of issue 3: pull <= 1.15, push <= 1.25.

    .venv/bin/python bench/bench_transfer.py --size-mb 512 --runs 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from boto3.s3.transfer import TransferConfig

from deltareg.client.transfer import (
    BlobDownload,
    Transfers,
    TransferSettings,
    UploadPlan,
    file_digest,
)

PART_SIZE = 16 << 20  # the registry's default DELTAREG_MULTIPART_PART_SIZE
BUCKET = "bench"
KEY = "blob"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def moto_server() -> Iterator[str]:
    port = free_port()
    moto = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen(
        [str(moto), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                httpx.get(url, timeout=1.0)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def s3_client(endpoint: str) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )


def write_random_file(path: Path, size: int) -> None:
    with path.open("wb") as f:
        left = size
        while left:
            n = min(left, 64 << 20)
            f.write(os.urandom(n))
            left -= n


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def ours_pull(transfers: Transfers, s3: Any, blob_digest: str, size: int, work: Path) -> None:
    url = s3.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": KEY}, ExpiresIn=900)
    dest = work / "pulled-ours"
    transfers.download(BlobDownload(blob_digest, size, url), dest, partials=work / "partials", label="bench")


def boto_pull(s3: Any, work: Path, config: Any = None) -> None:
    s3.download_file(BUCKET, KEY, str(work / "pulled-boto3"), Config=config)


def ours_push(transfers: Transfers, s3: Any, source: Path) -> None:
    digest, size = file_digest(source), source.stat().st_size
    key = f"uploads/{digest.removeprefix('sha256:')}"
    upload_id = s3.create_multipart_upload(Bucket=BUCKET, Key=key)["UploadId"]
    parts = []
    for number, offset in enumerate(range(0, size, PART_SIZE), start=1):
        params = {"Bucket": BUCKET, "Key": key, "UploadId": upload_id, "PartNumber": number}
        url = s3.generate_presigned_url("upload_part", Params=params, ExpiresIn=900)
        parts.append({"number": number, "url": url, "offset": offset, "size": min(PART_SIZE, size - offset)})
    plan = UploadPlan.from_json(
        {
            "digest": digest,
            "size": size,
            "present": False,
            "upload_url": None,
            "upload": {"kind": "multipart", "upload_id": upload_id, "part_size": PART_SIZE, "parts": parts},
        }
    )
    completed = transfers.send(plan, source, label="bench")
    s3.complete_multipart_upload(
        Bucket=BUCKET,
        Key=key,
        UploadId=upload_id,
        MultipartUpload={"Parts": [{"PartNumber": p.number, "ETag": p.etag} for p in completed]},
    )


def boto_push(s3: Any, source: Path, config: Any = None) -> None:
    s3.upload_file(str(source), BUCKET, "uploads/boto3", Config=config)


def noop() -> None:
    pass


def clear(work: Path) -> None:
    for name in ("pulled-ours", "pulled-boto3"):
        (work / name).unlink(missing_ok=True)
    shutil.rmtree(work / "partials", ignore_errors=True)


def compare(
    name: str, runs: int, contenders: Mapping[str, Callable[[], object]], reset: Callable[[], None]
) -> dict[str, list[float]]:
    """Each round runs every contender once, in an order rotated from round to round."""
    times: dict[str, list[float]] = {who: [] for who in contenders}
    names = list(contenders)
    for round_ in range(runs):
        shift = round_ % len(names)
        for who in names[shift:] + names[:shift]:
            reset()
            times[who].append(timed(contenders[who]))
        print(f"  {name} round {round_ + 1}: " + ", ".join(f"{who} {times[who][-1]:.2f} s" for who in names))
    return times


def report(name: str, size: int, times: dict[str, list[float]], target: float) -> None:
    ours = statistics.median(times["deltareg"])
    print(f"{name} ({len(times['deltareg'])} rounds, medians):")
    for who, values in times.items():
        median = statistics.median(values)
        ratios = [o / t for o, t in zip(times["deltareg"], values, strict=True)]
        print(
            f"  {who:<14} {median:6.2f} s {size / median / 1e6:6.0f} MB/s   "
            f"deltareg / this = {ours / median:.2f} (rounds {min(ratios):.2f}-{max(ratios):.2f})"
        )
    ratio = ours / statistics.median(times["boto3"])
    print(f"  target deltareg / boto3 <= {target}: {ratio:.2f} {'OK' if ratio <= target else 'MISSED'}")


def exit_cleanly_on_sigterm() -> None:
    """SIGTERM (``kill``, ``timeout``) exits through ``finally`` blocks, so the moto and registry
    processes a benchmark started are stopped too, instead of being left running."""
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(143))


def main() -> None:
    exit_cleanly_on_sigterm()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mb", type=int, default=512)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--only", choices=("pull", "push"), default=None)
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args()
    size = args.size_mb * 1_000_000

    work = args.dir or Path(tempfile.mkdtemp(prefix="bench-transfer-"))
    work.mkdir(parents=True, exist_ok=True)
    source = work / "source.bin"
    if not source.exists() or source.stat().st_size != size:
        write_random_file(source, size)
    digest = file_digest(source)
    print(f"blob: {size / 1e6:.0f} MB, {digest}; work folder {work}")

    with moto_server() as endpoint, httpx.Client() as registry:
        s3 = s3_client(endpoint)
        s3.create_bucket(Bucket=BUCKET)
        s3.upload_file(str(source), BUCKET, KEY)
        # The registry client is never contacted here: only presigned URLs are used.
        settings = TransferSettings()
        transfers = Transfers(registry, settings=settings)
        # boto3 with our range/part size and parallelism: separates the tool from its defaults.
        matched_pull = TransferConfig(
            multipart_chunksize=PART_SIZE, max_concurrency=settings.download_workers
        )
        matched_push = TransferConfig(multipart_chunksize=PART_SIZE, max_concurrency=settings.upload_workers)
        try:
            if args.only in (None, "pull"):
                contenders = {
                    "deltareg": lambda: ours_pull(transfers, s3, digest, size, work),
                    "boto3": lambda: boto_pull(s3, work),
                    "boto3-matched": lambda: boto_pull(s3, work, matched_pull),
                }
                report(
                    "pull + verify", size, compare("pull", args.runs, contenders, lambda: clear(work)), 1.15
                )
            if args.only in (None, "push"):
                contenders = {
                    "deltareg": lambda: ours_push(transfers, s3, source),
                    "boto3": lambda: boto_push(s3, source),
                    "boto3-matched": lambda: boto_push(s3, source, matched_push),
                }
                report(
                    "push (hash + parts + complete)", size, compare("push", args.runs, contenders, noop), 1.25
                )
        finally:
            transfers.close()
            clear(work)


if __name__ == "__main__":
    main()
