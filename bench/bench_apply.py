"""In-memory LoRA apply: deltareg's apply_to_module vs PEFT's from_pretrained + merge_and_unload.

A Llama-shaped bf16 model (default ~300M parameters: hidden 1024, 20 layers, GQA 16/8 heads, intermediate
2816, vocab 32000) is built locally with random init, and a LoRA adapter (default r=16 on q,k,v,o,gate,up,
down, with random non-zero A and B) is saved with PEFT. Both routes start from the base model already in
memory (a fresh deep copy per run, made outside the timed region) and end with the merged weights in it:

  peft          PeftModel.from_pretrained(model, adapter_dir) + merge_and_unload()
  deltareg      apply_to_module(model, adapter_dir, manifest, verify="full")     whole-model fingerprint
  deltareg      apply_to_module(..., verify="touched")                           only the touched tensors

The manifest is built as ``push`` builds it (read_peft_adapter + fingerprint of the saved base). Runs are
interleaved, the table shows medians and ratios to PEFT, and the results are checked bit for bit against
PEFT's. ``--breakdown`` times route B's parts separately (factor loading, hashing, merge).

    .venv/bin/python bench/bench_apply.py --runs 3
    .venv/bin/python bench/bench_apply.py --layers 2 --hidden 256 --intermediate 704 --vocab 4096 --runs 2
"""

from __future__ import annotations

import argparse
import copy
import gc
import hashlib
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from deltareg.client.apply import apply_to_module, load_factors, merge_lora_into
from deltareg.client.fingerprint import fingerprint_path, fingerprint_state_dict, tensor_digests_of_state_dict
from deltareg.client.lora import read_peft_adapter, targets_from_params
from deltareg.client.manifest import BaseModelRef, FileEntry, Manifest

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--breakdown", action="store_true", help="also time route B's parts separately")
    return parser.parse_args()


def build_base(args: argparse.Namespace) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        intermediate_size=args.intermediate,
        vocab_size=args.vocab,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model: Any = LlamaForCausalLM(config)
    return model.to(torch.bfloat16).eval()


def save_adapter(base: torch.nn.Module, rank: int, folder: Path) -> None:
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS)
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    peft_model.save_pretrained(str(folder))


def build_manifest(adapter_dir: Path, base_dir: Path) -> Manifest:
    """What push records: files with digests, the base fingerprint and the touched tensors' digests."""
    adapter = read_peft_adapter(adapter_dir)
    fingerprint = fingerprint_path(base_dir, use_cache=False)
    files = [
        FileEntry(
            path=rel,
            digest="sha256:" + hashlib.sha256((adapter_dir / rel).read_bytes()).hexdigest(),
            size=(adapter_dir / rel).stat().st_size,
        )
        for rel in adapter.files
    ]
    touched = {t.base_tensor: fingerprint.tensors[t.base_tensor].digest for t in adapter.targets}
    base = BaseModelRef(fingerprint=fingerprint.value, tensors=touched)
    return Manifest(kind="lora", files=files, base=base, params=adapter.params())


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
    "peft from_pretrained+merge_and_unload": route_peft,
    'deltareg apply_to_module verify="full"': route_full,
    'deltareg apply_to_module verify="touched"': route_touched,
}


def timed_run(
    route: Callable[[torch.nn.Module, Path, Manifest], torch.nn.Module],
    base: torch.nn.Module,
    adapter_dir: Path,
    manifest: Manifest,
) -> tuple[float, dict[str, torch.Tensor]]:
    model = copy.deepcopy(base)  # a fresh base, outside the timed region
    gc.collect()
    start = time.perf_counter()
    merged = route(model, adapter_dir, manifest)
    elapsed = time.perf_counter() - start
    return elapsed, merged.state_dict()


def breakdown(base: torch.nn.Module, adapter_dir: Path, manifest: Manifest) -> dict[str, float]:
    """Route B's parts, timed one by one on a fresh copy."""
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
    import transformers

    logging: Any = transformers.logging  # untyped module functions
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    base = build_base(args)
    n_params = sum(p.numel() for p in base.parameters())
    with tempfile.TemporaryDirectory(prefix="bench-apply-") as work:
        base_dir, adapter_dir = Path(work) / "base", Path(work) / "adapter"
        base.save_pretrained(base_dir)
        save_adapter(base, args.rank, adapter_dir)
        manifest = build_manifest(adapter_dir, base_dir)
        targets = targets_from_params(manifest.params)
        touched = sum(t.shape[0] * t.shape[1] for t in targets)
        print(
            f"model: {n_params / 1e6:.1f}M params bf16 ({args.layers} layers, hidden {args.hidden}); "
            f"LoRA r={args.rank} on {len(targets)} modules ({touched / 1e6:.1f}M params touched)"
        )
        times: dict[str, list[float]] = {name: [] for name in ROUTES}
        results: dict[str, dict[str, torch.Tensor]] = {}
        for run in range(args.runs):
            for name, route in ROUTES.items():
                elapsed, state = timed_run(route, base, adapter_dir, manifest)
                times[name].append(elapsed)
                if run == 0:
                    results[name] = state
                print(f"  run {run + 1}/{args.runs} {name}: {elapsed:.3f} s", flush=True)
        parts = breakdown(base, adapter_dir, manifest) if args.breakdown else {}
    report(times, results, parts)


def report(
    times: dict[str, list[float]], results: dict[str, dict[str, torch.Tensor]], parts: dict[str, float]
) -> None:
    reference_name = next(iter(times))
    reference = statistics.median(times[reference_name])
    print(f"\n{'route':<44} {'median s':>9} {'min s':>7} {'ratio':>7}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<44} {median:>9.3f} {min(values):>7.3f} {median / reference:>7.2f}")
    expected = results[reference_name]
    for name, state in results.items():
        if name == reference_name:
            continue
        identical = sum(torch.equal(state[k], expected[k]) for k in expected)
        print(f"{name}: {identical}/{len(expected)} tensors bit-identical to PEFT's merge")
    if parts:
        print("\nroute B parts (one run):")
        for name, seconds in parts.items():
            print(f"  {name:<40} {seconds:.3f} s")


if __name__ == "__main__":
    main()
