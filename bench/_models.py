"""Shared by the apply benchmarks: Llama-shaped bf16 models built locally, their PEFT LoRA adapter and the
manifest ``push`` would record. Nothing is downloaded; the weights are random.

Presets (``--model``): ``1b`` is TinyLlama-1.1B's shape (1.10 B parameters), ``300m`` the shape of the
first in-memory figures, ``tiny`` a few MB for smoke runs. Any shape flag overrides the preset's value.
"""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from deltareg.client.fingerprint import fingerprint_path
from deltareg.client.lora import read_peft_adapter
from deltareg.client.manifest import BaseModelRef, FileEntry, Manifest

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int


PRESETS = {
    "1b": Shape(layers=22, hidden=2048, intermediate=5632, heads=32, kv_heads=4, vocab=32000),
    "300m": Shape(layers=20, hidden=1024, intermediate=2816, heads=16, kv_heads=8, vocab=32000),
    "tiny": Shape(layers=2, hidden=256, intermediate=704, heads=8, kv_heads=4, vocab=4096),
}


def add_shape_arguments(parser: argparse.ArgumentParser, default: str = "1b") -> None:
    parser.add_argument("--model", choices=sorted(PRESETS), default=default, help="shape preset")
    for field in fields(Shape):
        flag = "--" + field.name.replace("_", "-")
        parser.add_argument(flag, type=int, default=None, help=f"override the preset's {field.name}")
    parser.add_argument("--rank", type=int, default=16)


def shape_from_args(args: argparse.Namespace) -> Shape:
    overrides = {f.name: getattr(args, f.name) for f in fields(Shape) if getattr(args, f.name) is not None}
    return replace(PRESETS[args.model], **overrides)


def quiet_transformers() -> None:
    import transformers

    logging: Any = transformers.logging  # untyped module functions
    logging.set_verbosity_error()
    logging.disable_progress_bar()


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_base(shape: Shape, seed: int = 0) -> Any:
    """A LlamaForCausalLM in bf16 with random weights: allocated without init (fast), then filled."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.initialization import no_init_weights

    config = LlamaConfig(
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        intermediate_size=shape.intermediate,
        vocab_size=shape.vocab,
        tie_word_embeddings=False,
    )
    with no_init_weights(), _default_dtype(torch.bfloat16):
        model: Any = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.fill_(1.0)
            else:
                parameter.normal_(0.0, 0.02, generator=generator)
    return model.eval()


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_adapter(model: torch.nn.Module, rank: int, folder: Path, seed: int = 1) -> None:
    """Save a PEFT LoRA adapter (r=rank on the seven linear layers, random non-zero A and B) for ``model``.

    PEFT injects its layers into ``model`` itself: pass a copy if the model must stay a plain base.
    """
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS))
    generator = torch.Generator().manual_seed(seed)
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


def memory_bandwidth(size_bytes: int = 1 << 30, runs: int = 10) -> float:
    """The machine's copy bandwidth in bytes/s, counted as bytes read + bytes written (2 x size per copy),
    best of ``runs`` copies of a ``size_bytes`` buffer with torch (all threads), pages already touched."""
    import time

    source = torch.ones(size_bytes, dtype=torch.uint8)
    target = torch.zeros(size_bytes, dtype=torch.uint8)
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        target.copy_(source)
        best = min(best, time.perf_counter() - start)
    return 2 * size_bytes / best
