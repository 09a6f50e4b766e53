"""In-memory LoRA apply: deltareg's apply_to_module vs PEFT's from_pretrained + merge_and_unload.

A Llama-shaped bf16 model is built locally with random weights (``--model 1b``, the default: TinyLlama-1.1B's
shape, hidden 2048, 22 layers, GQA 32/4 heads, intermediate 5632, vocab 32000; ``--model 300m``: the first
figures' shape; ``--model tiny`` for a smoke run; any shape flag overrides the preset), and a LoRA adapter
(r=16 on q,k,v,o,gate,up,down, random non-zero A and B) is saved with PEFT. Both routes start from the base
model already in memory (a fresh deep copy per run, made outside the timed region) and end with the merged
weights in it:

  peft          PeftModel.from_pretrained(model, adapter_dir) + merge_and_unload()
  deltareg      apply_to_module(model, adapter_dir, manifest, verify="full")     whole-model fingerprint
  deltareg      apply_to_module(..., verify="touched")                           only the touched tensors

The manifest is built as ``push`` builds it (read_peft_adapter + fingerprint of the saved base). Runs are
interleaved, the table shows medians and ratios to PEFT, and every deltareg result is checked bit for bit
against PEFT's. The machine's memory bandwidth (a 1 GiB torch copy, bytes read + written per second) is
measured in the same run; a route's GB/s is the bytes it must move (see ``bytes_moved``) over its median.
``--breakdown`` times deltareg's parts separately (factor loading, hashing, merge).

    .venv/bin/python bench/bench_apply.py --runs 5 --breakdown                  # ~1.1B, the issue-5 figure
    .venv/bin/python bench/bench_apply.py --model 300m --runs 5 --breakdown     # the issue-2 figure
    .venv/bin/python bench/bench_apply.py --model tiny --runs 2                 # smoke run
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
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

from deltareg.client.apply import apply_to_module, load_factors, merge_lora_into
from deltareg.client.fingerprint import fingerprint_state_dict, tensor_digests_of_state_dict
from deltareg.client.lora import targets_from_params
from deltareg.client.manifest import Manifest

PEFT = "peft from_pretrained+merge_and_unload"
FULL = 'deltareg apply_to_module verify="full"'
TOUCHED = 'deltareg apply_to_module verify="touched"'


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_shape_arguments(parser)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--breakdown", action="store_true", help="also time deltareg's parts separately")
    add_json_out_argument(parser)
    return parser.parse_args()


def route_peft(model: torch.nn.Module, adapter_dir: Path, manifest: Manifest) -> torch.nn.Module:
    from peft import PeftModel

    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    assert isinstance(merged, torch.nn.Module)
    return merged


def route_full(model: torch.nn.Module, adapter_dir: Path, manifest: Manifest) -> torch.nn.Module:
    apply_to_module(model, adapter_dir, manifest, verify="full")
    return model


def route_touched(model: torch.nn.Module, adapter_dir: Path, manifest: Manifest) -> torch.nn.Module:
    apply_to_module(model, adapter_dir, manifest, verify="touched")
    return model


ROUTES: dict[str, Callable[[torch.nn.Module, Path, Manifest], torch.nn.Module]] = {
    PEFT: route_peft,  # first: run 1's result is the reference the others are compared with
    FULL: route_full,
    TOUCHED: route_touched,
}


def bytes_moved(base: torch.nn.Module, manifest: Manifest) -> dict[str, int]:
    """The memory traffic each deltareg route cannot avoid: every hashed byte read once, every touched
    weight read and written once (the fp32 scratch block stays in cache; the factors are a few MB and
    left out). PEFT's figure uses the same minimum (read + write the touched weights) for comparison."""
    state = base.state_dict()
    model_bytes = sum(t.numel() * t.element_size() for t in state.values())
    touched = {t.base_tensor for t in targets_from_params(manifest.params)}
    touched_bytes = sum(state[n].numel() * state[n].element_size() for n in touched)
    return {PEFT: 2 * touched_bytes, FULL: model_bytes + 2 * touched_bytes, TOUCHED: 3 * touched_bytes}


def timed_run(
    route: Callable[[torch.nn.Module, Path, Manifest], torch.nn.Module],
    base: torch.nn.Module,
    adapter_dir: Path,
    manifest: Manifest,
) -> tuple[float, torch.nn.Module]:
    model = copy.deepcopy(base)  # a fresh base, outside the timed region
    gc.collect()
    start = time.perf_counter()
    merged = route(model, adapter_dir, manifest)
    return time.perf_counter() - start, merged


def compare(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> str:
    """How many tensors are bit-identical to PEFT's, and where the others differ."""
    differ = [k for k in expected if not torch.equal(state[k], expected[k])]
    text = f"{len(expected) - len(differ)}/{len(expected)} tensors bit-identical to PEFT's merge"
    for name in differ:
        elements = int((state[name] != expected[name]).sum())
        largest = float((state[name].float() - expected[name].float()).abs().max())
        text += f"\n    differs: {name}, {elements} elements, largest difference {largest:.3g}"
    return text


def breakdown(base: torch.nn.Module, adapter_dir: Path, manifest: Manifest) -> dict[str, float]:
    """deltareg's parts, timed one by one on a fresh copy."""
    model = copy.deepcopy(base)
    state = {name: tensor.detach() for name, tensor in model.state_dict(keep_vars=True).items()}
    targets = targets_from_params(manifest.params)
    parts: dict[str, float] = {}

    def timed(name: str, work: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        result = work()
        parts[name] = time.perf_counter() - start
        return result

    factors = timed(
        "read params + load A/B (safe_open)", lambda: load_factors(adapter_dir, manifest, targets)
    )
    timed("fingerprint, whole model (full)", lambda: fingerprint_state_dict(state))
    timed("digests, touched tensors only", lambda: tensor_digests_of_state_dict(state, manifest.base.tensors))

    def merge_all() -> None:
        with torch.no_grad():
            for t in targets:
                a, b = factors[t.module]
                merge_lora_into(state[t.base_tensor], a, b, t.scale, fan_in_fan_out=t.fan_in_fan_out)

    timed("merge (matmul + add + round)", merge_all)
    return parts


def main() -> None:
    args = parse_args()
    shape = shape_from_args(args)
    result = Result(
        benchmark="apply",
        title="In-memory apply vs `peft` `merge_and_unload`",
        runs=args.runs,
        machine=describe_machine(["torch", "peft", "transformers"]),
    )
    quiet_transformers()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    bandwidth = memory_bandwidth()
    print(f"memory bandwidth (1 GiB torch copy, read + written): {bandwidth / 1e9:.2f} GB/s")
    base = build_base(shape)
    n_params = parameter_count(base)
    with tempfile.TemporaryDirectory(prefix="bench-apply-") as work:
        base_dir, adapter_dir = Path(work) / "base", Path(work) / "adapter"
        base.save_pretrained(base_dir)
        save_adapter(copy.deepcopy(base), args.rank, adapter_dir)
        manifest = build_manifest(adapter_dir, base_dir)
        targets = targets_from_params(manifest.params)
        touched = sum(t.shape[0] * t.shape[1] for t in targets)
        model = (
            f"{n_params / 1e6:.1f}M params bf16 ({shape}); "
            f"LoRA r={args.rank} on {len(targets)} modules ({touched / 1e6:.1f}M params touched)"
        )
        print(f"model: {model}")
        times: dict[str, list[float]] = {name: [] for name in ROUTES}
        expected: dict[str, torch.Tensor] = {}
        checks: dict[str, str] = {}
        for run in range(args.runs):
            for name, route in ROUTES.items():
                elapsed, merged = timed_run(route, base, adapter_dir, manifest)
                times[name].append(elapsed)
                load = os.getloadavg()[0]  # other work on the machine shows here
                print(f"  run {run + 1}/{args.runs} {name}: {elapsed:.3f} s (load {load:.1f})", flush=True)
                if run == 0 and name == PEFT:
                    expected = merged.state_dict()
                elif run == 0:
                    checks[name] = compare(merged.state_dict(), expected)
                del merged
        parts = breakdown(base, adapter_dir, manifest) if args.breakdown else {}
    moved = bytes_moved(base, manifest)
    report(times, checks, parts, moved, bandwidth)
    record(result, args.model, model, times, checks, parts, moved, bandwidth)
    result.write(args.json_out)


# Issue 5 asks for <= 0.4 at ~1.1B; issue 2 asked for <= 0.6 at 300M (smaller models: the 1B target).
TARGET = {"300m": "<= 0.6"}


def record(
    result: Result,
    preset: str,
    model: str,
    times: dict[str, list[float]],
    checks: dict[str, str],
    parts: dict[str, float],
    moved: dict[str, int],
    bandwidth: float,
) -> None:
    """The figures of ``report`` in the results JSON."""
    reference = statistics.median(times[PEFT])
    rows = []
    for name, values in times.items():
        median = statistics.median(values)
        rate = moved[name] / median
        rows.append(
            [name, median, min(values), median / reference, moved[name] / 1e9, rate / 1e9, rate / bandwidth]
        )
        result.sample(f"{name} s", values)
    columns = ["route", "median s", "min s", "x peft", "GB moved", "GB/s", "of bandwidth"]
    result.table(f"--model {preset}: {model}", columns, rows)
    result.table(
        f"memory bandwidth (1 GiB torch copy, read + written): {bandwidth / 1e9:.2f} GB/s; "
        "bit identity of round 1",
        ["route", "compared with peft"],
        [[name, check] for name, check in checks.items()],
    )
    if parts:
        result.table("deltareg's parts (one run)", ["part", "s"], [[k, v] for k, v in parts.items()])
    for name in (FULL, TOUCHED):
        result.target(
            f"{name} / peft (--model {preset})",
            ours=statistics.median(times[name]),
            peer=reference,
            target=TARGET.get(preset, "<= 0.4"),
            unit="s",
        )
    result.plot("apply", list(times), {"median s": [row[1] for row in rows]}, "seconds")


def report(
    times: dict[str, list[float]],
    checks: dict[str, str],
    parts: dict[str, float],
    moved: dict[str, int],
    bandwidth: float,
) -> None:
    reference = statistics.median(times[PEFT])
    print(
        f"\n{'route':<44} {'median s':>9} {'min s':>7} {'ratio':>7} {'GB moved':>9} {'GB/s':>6} {'of bw':>6}"
    )
    for name, values in times.items():
        median = statistics.median(values)
        rate = moved[name] / median
        print(
            f"{name:<44} {median:>9.3f} {min(values):>7.3f} {median / reference:>7.2f} "
            f"{moved[name] / 1e9:>9.2f} {rate / 1e9:>6.2f} {rate / bandwidth:>6.0%}"
        )
    print(f"memory bandwidth bound: {bandwidth / 1e9:.2f} GB/s (read + written)")
    for name, check in checks.items():
        print(f"{name}: {check}")
    if parts:
        print("\ndeltareg parts (one run):")
        for name, seconds in parts.items():
            print(f"  {name:<40} {seconds:.3f} s")


if __name__ == "__main__":
    main()
