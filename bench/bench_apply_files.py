"""File to file LoRA apply: deltareg's apply_files vs the PEFT route, wall time and peak memory.

A Llama-shaped bf16 model is built locally with random weights (``--model 1b``, the default: TinyLlama-1.1B's
shape; see bench/_models.py) and saved sharded with ``save_pretrained(max_shard_size=--shard-mb)``; a PEFT
LoRA adapter (r=16 on q,k,v,o,gate,up,down, random non-zero A and B) is saved for it. Each route then turns
the base folder + adapter folder into a merged model folder, in its own subprocess so that its peak RSS is
its own (the child reports its VmHWM; ``ru_maxrss`` from ``wait4`` would not do: Linux carries the
parent's high-water mark at fork over into the child's):

  peft                    AutoModelForCausalLM.from_pretrained(base) + PeftModel.from_pretrained(adapter)
                          + merge_and_unload() + save_pretrained(out, max_shard_size=--shard-mb)
  deltareg full, cold     apply_files(base, adapter, manifest, out, verify="full"), empty fingerprint cache
                          (the first apply to a base: every base byte is hashed)
  deltareg full, warm     the same with the base's fingerprint already cached (any later apply to it)
  deltareg touched, cold  verify="touched", empty cache (only the changed tensors are hashed)
  copy of the base        shutil.copytree(base, out): no merge, no hash, just the output's bytes written
  (floor)                 through the page cache (in-kernel copies): the least a route that writes through
                          the page cache pays. deltareg writes with O_DIRECT where it can, so on VMs that
                          hand free memory back to the host (where fresh page-cache pages dominate the
                          copy) it can beat this "floor".

A route's time is measured inside its child, from after its imports to the output written: for deltareg that
includes flushing the output to the disk (it fsyncs before the rename), for PEFT and the copy it does not
(their output may still be in the page cache). The child's whole life (interpreter start, imports) is shown
beside it. The base stays in the page cache (both routes read it warm); ``sync`` runs between runs, outside
the timings. Routes are interleaved, ``--runs`` rounds, medians. Every deltareg output of round 1 is
compared with PEFT's tensor by tensor (safetensors, bit for bit).

Every route's timed part starts ``--settle`` seconds after the last output was deleted (the child waits
after its imports). The VMs this was measured on hand freed memory back to their host within seconds, and
writing into pages handed back costs up to ten times more than into pages freed a moment ago, so a route
that started sooner after a deletion (deltareg imports faster than PEFT) would be favoured.

The memory bandwidth (a 1 GiB torch copy: bytes read + written per second) is measured in the same run;
a route's GB/s is the bytes it must move (``bytes_moved``) over its median.

    .venv/bin/python bench/bench_apply_files.py --runs 5                       # ~1.1B, 500 MB shards
    .venv/bin/python bench/bench_apply_files.py --model tiny --shard-mb 2 --runs 2   # smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from _models import (
    add_shape_arguments,
    build_base,
    build_manifest,
    memory_bandwidth,
    parameter_count,
    quiet_transformers,
    save_adapter,
    shape_from_args,
)
from _report_common import Result, add_json_out_argument, describe_machine

from deltareg.client.fingerprint import FingerprintCache, fingerprint_path
from deltareg.client.lora import targets_from_params
from deltareg.client.weights import SAFETENSORS_DTYPES

PEFT = "peft"
FULL_COLD = "deltareg full, cold cache"
FULL_WARM = "deltareg full, warm cache"
TOUCHED_COLD = "deltareg touched, cold cache"
FLOOR = "copy of the base (floor)"
DELTAREG_ROUTES = [FULL_COLD, FULL_WARM, TOUCHED_COLD]
ROUTES = [PEFT, *DELTAREG_ROUTES, FLOOR]


@dataclass(frozen=True)
class Run:
    seconds: float  # the route itself, measured in the child after its imports
    process_seconds: float  # the child's whole life but its wait for --settle, measured by the parent
    peak_rss: int  # bytes, the child's VmHWM at its end
    rss_after_imports: int  # bytes, the child's VmRSS before the route started


@dataclass(frozen=True)
class Workload:
    base: Path
    adapter: Path
    manifest: Path
    warm_cache: Path
    largest_shard: int
    base_bytes: int
    delta_bytes: int
    touched_bytes: int


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command")
    child = sub.add_parser("child", help="(internal) run one route and print its timing as JSON")
    child.add_argument("route", choices=ROUTES)
    for name in ("base", "adapter", "manifest", "out", "cache"):
        child.add_argument(f"--{name}", type=Path, required=True)
    child.add_argument("--save-shard-mb", type=int, required=True)
    child.add_argument("--start-at", type=float, default=0.0, help="time.time() at which to start timing")
    add_shape_arguments(parser)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--settle", type=float, default=8.0, help="seconds from the last deletion to each route's start"
    )
    parser.add_argument("--shard-mb", type=int, default=500, help="max shard size of the saved base")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder in /tmp")
    add_json_out_argument(parser)
    return parser.parse_args()


# --------------------------------------------------------------------------------------------------
# The child: one route, timed from after its imports


def _status_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS: now; VmHWM: the peak so far)."""
    status = Path("/proc/self/status").read_text()
    match = re.search(rf"{field}:\s+(\d+) kB", status)
    return int(match.group(1)) * 1024 if match else 0


def _wait_until(start_at: float) -> float:
    """Sleep until ``start_at`` (a time.time()); return the seconds slept."""
    waited = max(0.0, start_at - time.time())
    time.sleep(waited)
    return waited


def run_child(args: argparse.Namespace) -> None:
    if args.route == PEFT:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        quiet_transformers()
        waited = _wait_until(args.start_at)
        rss, start = _status_bytes("VmRSS"), time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.bfloat16)
        merged = PeftModel.from_pretrained(model, args.adapter).merge_and_unload()
        merged.save_pretrained(args.out, max_shard_size=f"{args.save_shard_mb}MB")
    elif args.route == FLOOR:
        waited = _wait_until(args.start_at)
        rss, start = _status_bytes("VmRSS"), time.perf_counter()
        shutil.copytree(args.base, args.out)
    else:
        from deltareg.client.apply import apply_files
        from deltareg.client.fingerprint import FingerprintCache
        from deltareg.client.manifest import Manifest

        manifest = Manifest.parse(json.loads(args.manifest.read_text()))
        verify = "touched" if args.route == TOUCHED_COLD else "full"
        waited = _wait_until(args.start_at)
        rss, start = _status_bytes("VmRSS"), time.perf_counter()
        apply_files(
            args.base, args.adapter, manifest, args.out, verify=verify, cache=FingerprintCache(args.cache)
        )
    seconds = time.perf_counter() - start
    peak = _status_bytes("VmHWM")
    print(json.dumps({"seconds": seconds, "rss_after_imports": rss, "peak_rss": peak, "waited": waited}))


# --------------------------------------------------------------------------------------------------
# The parent


def prepare(args: argparse.Namespace, work: Path) -> Workload:
    """Save the base (sharded) and the adapter, write the manifest, prime the warm fingerprint cache."""
    quiet_transformers()
    base_dir, adapter_dir = work / "base", work / "adapter"
    model = build_base(shape_from_args(args))
    n_params = parameter_count(model)
    model.save_pretrained(base_dir, max_shard_size=f"{args.shard_mb}MB")
    save_adapter(model, args.rank, adapter_dir)  # PEFT injects into the model: it is not used again
    del model
    manifest = build_manifest(adapter_dir, base_dir)
    (work / "manifest.json").write_text(json.dumps(manifest.to_json_obj()))
    shards = sorted(base_dir.glob("*.safetensors"))
    targets = targets_from_params(manifest.params)
    infos = fingerprint_path(base_dir, cache=FingerprintCache(work / "warm-cache")).tensors
    touched = [infos[t.base_tensor] for t in targets]
    touched_bytes = sum(math.prod(info.shape) * SAFETENSORS_DTYPES[info.dtype] for info in touched)
    workload = Workload(
        base=base_dir,
        adapter=adapter_dir,
        manifest=work / "manifest.json",
        warm_cache=work / "warm-cache",
        largest_shard=max(p.stat().st_size for p in shards),
        base_bytes=sum(p.stat().st_size for p in shards),
        delta_bytes=sum(p.stat().st_size for p in adapter_dir.iterdir() if p.is_file()),
        touched_bytes=touched_bytes,
    )
    print(
        f"model: {n_params / 1e6:.1f}M params bf16, {len(shards)} shards, {workload.base_bytes / 1e9:.2f} GB "
        f"(largest {workload.largest_shard / 1e6:.0f} MB); LoRA r={args.rank} on {len(targets)} modules, "
        f"delta {workload.delta_bytes / 1e6:.1f} MB; touched weights {touched_bytes / 1e9:.2f} GB",
        flush=True,
    )
    return workload


def run_route(route: str, workload: Workload, out: Path, cache: Path, shard_mb: int, start_at: float) -> Run:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "child",
        route,
        f"--base={workload.base}",
        f"--adapter={workload.adapter}",
        f"--manifest={workload.manifest}",
        f"--out={out}",
        f"--cache={cache}",
        f"--save-shard-mb={shard_mb}",
        f"--start-at={start_at}",
    ]
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    output = child.stdout.read()
    child.wait()
    if child.returncode != 0:
        raise SystemExit(f"{route} failed with exit code {child.returncode}")
    result = json.loads(output.strip().splitlines()[-1])
    process_seconds = time.perf_counter() - start - result["waited"]  # the child's life, not its wait
    return Run(result["seconds"], process_seconds, result["peak_rss"], result["rss_after_imports"])


def tensors_of(folder: Path) -> dict[str, Path]:
    from safetensors import safe_open

    names: dict[str, Path] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as handle:
            names.update(dict.fromkeys(handle.keys(), path))
    return names


def compare_outputs(reference: Path, other: Path) -> str:
    """Tensor by tensor, bit for bit (dtype, shape and bytes), whatever the sharding of either side."""
    import torch
    from safetensors import safe_open

    expected, actual = tensors_of(reference), tensors_of(other)
    if expected.keys() != actual.keys():
        return f"different tensor names: {sorted(expected.keys() ^ actual.keys())[:5]}"
    differ = []
    for name in expected:
        with safe_open(expected[name], framework="pt") as a, safe_open(actual[name], framework="pt") as b:
            x, y = a.get_tensor(name), b.get_tensor(name)
            if not (x.dtype == y.dtype and torch.equal(x, y)):
                differ.append(f"{name} ({int((x != y).sum())} elements)")
    text = f"{len(expected) - len(differ)}/{len(expected)} tensors bit-identical to PEFT's output"
    return text + "".join(f"\n    differs: {d}" for d in differ)


def bytes_moved(workload: Workload) -> dict[str, int]:
    """What each route must at least move through memory: every weight byte read once and written once
    into the output (page cache); every hashed byte read once: the base (full, cold), the touched base
    tensors (touched), and with verify="full" the changed tensors as written (the result's fingerprint).
    The factors are left out (a few MB). PEFT's minimum is the copy alone."""
    copy = 2 * workload.base_bytes
    result_hash = workload.touched_bytes
    return {
        PEFT: copy,
        FULL_COLD: workload.base_bytes + result_hash + copy,
        FULL_WARM: result_hash + copy,
        TOUCHED_COLD: workload.touched_bytes + copy,
        FLOOR: copy,
    }


def main() -> None:
    args = parse_args()
    if args.command == "child":
        run_child(args)
        return
    result = Result(
        benchmark="apply_files",
        title="File to file apply vs the peft route",
        runs=args.runs,
        machine=describe_machine(["torch", "peft", "transformers", "safetensors"]),
    )
    bandwidth = memory_bandwidth()
    print(f"memory bandwidth (1 GiB torch copy, read + written): {bandwidth / 1e9:.2f} GB/s", flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench-apply-files-", dir=args.workdir))
    try:
        workload = prepare(args, work)
        runs: dict[str, list[Run]] = {route: [] for route in ROUTES}
        checks: dict[str, str] = {}
        for number in range(1, args.runs + 1):
            for route in ROUTES:
                out = work / f"out-{ROUTES.index(route)}"
                cache = (
                    workload.warm_cache if route == FULL_WARM else work / f"cold-cache-{ROUTES.index(route)}"
                )
                os.sync()
                run = run_route(route, workload, out, cache, args.shard_mb, time.time() + args.settle)
                runs[route].append(run)
                print(
                    f"  run {number}/{args.runs} {route}: {run.seconds:.2f} s "
                    f"(process {run.process_seconds:.2f} s), peak RSS {run.peak_rss / 1e6:.0f} MB "
                    f"(load {os.getloadavg()[0]:.1f})",
                    flush=True,
                )
                if route != PEFT:
                    if number == 1 and route in DELTAREG_ROUTES:
                        checks[route] = compare_outputs(work / "out-0", out)
                    shutil.rmtree(out)
                if route != FULL_WARM:
                    shutil.rmtree(cache, ignore_errors=True)
            shutil.rmtree(work / "out-0")
        report(runs, checks, workload, bandwidth)
        record(result, args, runs, checks, workload, bandwidth)
        result.write(args.json_out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def record(
    result: Result,
    args: argparse.Namespace,
    runs: dict[str, list[Run]],
    checks: dict[str, str],
    workload: Workload,
    bandwidth: float,
) -> None:
    """The figures of ``report`` in the results JSON: wall ratio <= 0.25 and peak RSS <= 1.3 x (largest
    shard + delta) for every deltareg route (issue 5)."""
    moved = bytes_moved(workload)
    reference = statistics.median(r.seconds for r in runs[PEFT])
    rss_basis = workload.largest_shard + workload.delta_bytes
    rows = []
    for route, values in runs.items():
        median = statistics.median(r.seconds for r in values)
        rows.append(
            [
                route,
                median,
                median / reference,
                statistics.median(r.process_seconds for r in values),
                statistics.median(r.peak_rss for r in values) / 1e6,
                statistics.median(r.rss_after_imports for r in values) / 1e6,
                moved[route] / median / 1e9,
            ]
        )
        result.sample(f"{route} s", [r.seconds for r in values])
        result.sample(f"{route} peak RSS MB", [r.peak_rss / 1e6 for r in values])
    caption = (
        f"--model {args.model}, {workload.base_bytes / 1e9:.2f} GB in {args.shard_mb} MB shards "
        f"(largest {workload.largest_shard / 1e6:.0f} MB), delta {workload.delta_bytes / 1e6:.1f} MB; "
        f"memory bandwidth {bandwidth / 1e9:.2f} GB/s"
    )
    columns = ["route", "median s", "x peft", "process s", "peak RSS MB", "RSS after imports MB", "GB/s"]
    result.table(caption, columns, rows)
    result.table(
        "bit identity of round 1", ["route", "compared with peft"], [[k, v] for k, v in checks.items()]
    )
    for route in DELTAREG_ROUTES:
        median = statistics.median(r.seconds for r in runs[route])
        result.target(f"{route}: wall / peft", ours=median, peer=reference, target="<= 0.25", unit="s")
        peak = statistics.median(r.peak_rss for r in runs[route])
        result.target(
            f"{route}: peak RSS / (largest shard + delta)",
            ours=peak / 1e6,
            peer=rss_basis / 1e6,
            target="<= 1.3",
            unit="MB",
        )
    result.plot("apply_files-seconds", list(runs), {"median s": [row[1] for row in rows]}, "seconds")
    result.plot("apply_files-rss", list(runs), {"peak RSS MB": [row[4] for row in rows]}, "MB")


def report(runs: dict[str, list[Run]], checks: dict[str, str], workload: Workload, bandwidth: float) -> None:
    moved = bytes_moved(workload)
    reference = statistics.median(r.seconds for r in runs[PEFT])
    bound = 1.3 * (workload.largest_shard + workload.delta_bytes)
    print(
        f"\n{'route':<30} {'median s':>9} {'× peft':>7} {'process s':>10} {'peak RSS MB':>12} "
        f"{'after imports':>14} {'GB/s':>6} {'of bw':>6}"
    )
    for route, values in runs.items():
        median = statistics.median(r.seconds for r in values)
        rate = moved[route] / median
        print(
            f"{route:<30} {median:>9.2f} {median / reference:>7.2f} "
            f"{statistics.median(r.process_seconds for r in values):>10.2f} "
            f"{statistics.median(r.peak_rss for r in values) / 1e6:>12.0f} "
            f"{statistics.median(r.rss_after_imports for r in values) / 1e6:>14.0f} "
            f"{rate / 1e9:>6.2f} {rate / bandwidth:>6.0%}"
        )
    print(
        f"RSS bound 1.3 × (largest shard {workload.largest_shard / 1e6:.0f} MB + delta "
        f"{workload.delta_bytes / 1e6:.1f} MB) = {bound / 1e6:.0f} MB; "
        f"memory bandwidth {bandwidth / 1e9:.2f} GB/s (read + written)"
    )
    for route in [*DELTAREG_ROUTES, FLOOR]:
        ratios = [r.seconds / p.seconds for r, p in zip(runs[route], runs[PEFT], strict=True)]
        check = f"; {checks[route]}" if route in checks else ""
        print(f"{route}: per-round ratios {', '.join(f'{x:.2f}' for x in ratios)}{check}")


if __name__ == "__main__":
    main()
