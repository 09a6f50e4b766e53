"""Benchmark: the whole product path of a large delta through a real registry on S3, vs raw boto3.

bench_transfer.py measures the client's transfer code against presigned URLs alone. This one measures
what a user runs: ``Registry.push`` (hash, upload plan, parallel multipart parts to presigned URLs,
``complete`` -- where the registry reads the object back and hashes it before recording it -- and the
version commit) and ``Registry.pull`` (resolve, download URLs, parallel ranges with the hash overlapped,
verify, rename into the cache), through a real registry process (SQLite + S3 store) on a moto S3 server in
a subprocess, vs boto3 ``upload_file`` / ``download_file`` of the same file on the same endpoint.

The delta is a PEFT-format LoRA adapter whose adapter_model.safetensors is --size-mb large (random
float32 factors, regenerated for every push so that nothing is deduplicated); the base is given as a
fingerprint, so no base model is needed. Medians over --runs rounds.

    .venv/bin/python bench/bench_registry_transfer.py --size-mb 512 --runs 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
from _report_common import Result, add_json_out_argument, describe_machine
from bench_transfer import exit_cleanly_on_sigterm, free_port, moto_server, s3_client, timed
from safetensors.numpy import save_file

from deltareg.client import Registry

BUCKET = "bench-registry"
BASE = "tmv1:" + "0" * 64
RANK, WIDTH = 256, 8192  # one module's A (r, in) + B (out, r) in float32: 16 MiB

BENCH_TOKEN = "deltareg-bench-admin-token"  # the registry process it starts accepts it (bootstrap)


def write_adapter(folder: Path, size_mb: int, seed: int) -> Path:
    """A PEFT-shaped LoRA adapter on up_proj of as many layers as it takes to reach size_mb."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    per_module = 2 * RANK * WIDTH * 4
    tensors = {}
    for layer in range(max(1, size_mb * 1_000_000 // per_module)):
        prefix = f"base_model.model.model.layers.{layer}.mlp.up_proj"
        tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((RANK, WIDTH), dtype=np.float32)
        tensors[f"{prefix}.lora_B.weight"] = rng.standard_normal((WIDTH, RANK), dtype=np.float32)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": RANK,
        "lora_alpha": 2 * RANK,
        "target_modules": ["up_proj"],
        "bias": "none",
        "use_rslora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "lora_dropout": 0.0,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return folder / "adapter_model.safetensors"


@contextmanager
def registry_process(endpoint: str, work: Path) -> Iterator[str]:
    port = free_port()
    env = {
        **os.environ,
        "DELTAREG_DATABASE_URL": f"sqlite:///{work / 'registry.db'}",
        "DELTAREG_STORAGE_URL": f"s3://{BUCKET}/deltareg",
        "DELTAREG_S3_ENDPOINT_URL": endpoint,
        "DELTAREG_BOOTSTRAP_TOKEN": BENCH_TOKEN,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "deltareg.registry.serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def one_round(url: str, s3: object, work: Path, size_mb: int, round_: int) -> dict[str, float]:
    """Push a fresh adapter and pull it back, and the same bytes with boto3; seconds per step."""
    adapter = work / f"adapter-{round_}"
    weights = write_adapter(adapter, size_mb, seed=round_)
    raw_key, raw_copy, cache = f"raw/{round_}", work / f"raw-{round_}", work / f"cache-{round_}"
    try:
        with Registry(url, BENCH_TOKEN, cache_dir=cache, progress=False) as reg:
            return {
                "push": timed(lambda: reg.push(adapter, "bench/big", base=BASE)),
                "upload_file": timed(lambda: s3.upload_file(str(weights), BUCKET, raw_key)),  # type: ignore[attr-defined]
                "pull": timed(lambda: reg.pull(f"bench/big:{round_ + 1}")),
                "download_file": timed(lambda: s3.download_file(BUCKET, raw_key, str(raw_copy))),  # type: ignore[attr-defined]
            }
    finally:
        shutil.rmtree(adapter, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
        raw_copy.unlink(missing_ok=True)


def main() -> None:
    exit_cleanly_on_sigterm()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mb", type=int, default=512)
    parser.add_argument("--runs", type=int, default=5)
    add_json_out_argument(parser)
    args = parser.parse_args()
    result = Result(
        benchmark="registry_transfer",
        title="Transfers through the registry on S3 vs raw boto3",
        runs=args.runs,
        machine=describe_machine(["boto3", "moto", "httpx"]),
    )
    work = Path(tempfile.mkdtemp(prefix="bench-registry-transfer-"))
    times: dict[str, list[float]] = {"push": [], "upload_file": [], "pull": [], "download_file": []}
    try:
        with moto_server() as endpoint, registry_process(endpoint, work) as url:
            s3 = s3_client(endpoint)
            s3.create_bucket(Bucket=BUCKET)
            for round_ in range(args.runs):
                for name, seconds in one_round(url, s3, work, args.size_mb, round_).items():
                    times[name].append(seconds)
                print(
                    f"  round {round_ + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()),
                    flush=True,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    size = weights_size = args.size_mb
    medians = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"\n~{size} MB delta, medians of {args.runs} rounds (moto S3 over loopback, registry on SQLite + S3)"
    )
    for name, median in medians.items():
        print(f"  {name:<14} {median:6.2f} s  {weights_size / median:6.0f} MB/s")
    print(f"  push / upload_file   = {medians['push'] / medians['upload_file']:.2f} (target <= 1.25)")
    print(f"  pull / download_file = {medians['pull'] / medians['download_file']:.2f} (target <= 1.15)")
    record(result, times, args.size_mb)
    result.write(args.json_out)


def record(result: Result, times: dict[str, list[float]], size_mb: int) -> None:
    """The two ratios in the results JSON, with every round's seconds."""
    medians = {k: statistics.median(v) for k, v in times.items()}
    pairs = {"pull": ("pull", "download_file", "<= 1.15"), "push": ("push", "upload_file", "<= 1.25")}
    rows = []
    for label, (ours, peer, target) in pairs.items():
        ratio = medians[ours] / medians[peer]
        rows.append(
            [f"{label} (`Registry.{ours}` vs boto3 `{peer}`)", medians[ours], medians[peer], ratio, target]
        )
        result.target(
            f"{label} / boto3 {peer}", ours=medians[ours], peer=medians[peer], target=target, unit="s"
        )
    caption = f"~{size_mb} MB delta, moto S3 over loopback, registry on SQLite + S3"
    result.table(caption, ["path", "deltareg s", "boto3 s", "ratio", "target"], rows)
    result.plot(
        "registry_transfer",
        ["pull", "push"],
        {
            "deltareg": [medians["pull"], medians["push"]],
            "boto3": [medians["download_file"], medians["upload_file"]],
        },
        "seconds",
    )
    for name, values in times.items():
        result.sample(f"{name} s", values)


if __name__ == "__main__":
    main()
