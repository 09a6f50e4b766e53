"""Shared fixtures: tiny models and adapters built locally (no downloads), and test isolation.

Fixtures (all builders are session-scoped and cache their results, so each distinct model or adapter is
built once per test process; everything they return is on disk, never a shared in-memory object, so a
test can freely modify what it loads):

``tiny_llama(*, dtype="float32", seed=0, sharded=False, tie_word_embeddings=False) -> Path``
    A random-init ``LlamaForCausalLM`` (hidden 64, 2 layers, 4 heads, 2 KV heads, intermediate 128,
    vocab 256) saved with ``save_pretrained``. ``sharded=True`` saves it in at least 3 shards with a
    ``model.safetensors.index.json``. A different ``seed`` gives a "different base": same names, shapes
    and dtypes, other values. Load it with ``AutoModelForCausalLM.from_pretrained(path)`` (the dtype is
    taken from the files).

``tiny_gpt2(*, seed=0) -> Path``
    A random-init ``GPT2LMHeadModel`` (n_embd 64, 2 layers): Conv1D layers store W as (in, out), so LoRA
    needs ``fan_in_fan_out=True``; its lm_head is tied to the input embeddings.

``lora_adapter(base, *, r=8, alpha=16, target_modules=("q_proj", "v_proj"), use_rslora=False,
rank_pattern=None, alpha_pattern=None, fan_in_fan_out=False, seed=1) -> Path``
    A PEFT LoRA adapter for the model saved at ``base``, made with ``get_peft_model`` and saved with
    ``PeftModel.save_pretrained`` (default adapter name). LoRA B is zero at init, which would make every
    apply a no-op, so A and B are both filled with seeded random values large enough to change bf16
    weights.

``lora_manifest(adapter, base, *, with_tensors=True) -> Manifest``
    The manifest ``push`` would make for that adapter on that base: files with sha256 digests, the base
    fingerprint and (unless ``with_tensors=False``) the digests of the tensors it touches. The adapter
    folder doubles as the version folder.

``copy_folder(src) -> Path``
    A fresh copy of a folder in the test's tmp_path (for tests that edit an adapter or a model).

Every test also gets its own ``DELTAREG_CACHE_DIR`` (autouse), so nothing reads or writes ~/.cache.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

# Quiet and offline before transformers is ever imported (it is imported lazily, only by tests that use
# models, so that the registry tests do not pay for it).
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

LLAMA_DIMS: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 256,
    "max_position_embeddings": 128,
}
# Values of the random LoRA factors: with alpha/r = 2 the delta is about as large as the weights
# (initializer_range 0.02), so it changes most bf16 elements.
LORA_FACTOR_STD = 0.05


def pytest_configure(config: pytest.Config) -> None:
    # PEFT calls a transformers method that transformers 5 deprecates; not ours to fix, only noise.
    config.addinivalue_line(
        "filterwarnings", "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"
    )


@pytest.fixture(autouse=True)
def _isolated_cache_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DELTAREG_CACHE_DIR", str(tmp_path_factory.mktemp("deltareg-cache")))


def _quiet_transformers() -> None:
    import transformers

    logging: Any = transformers.logging  # untyped module functions
    logging.set_verbosity_error()
    logging.disable_progress_bar()


def _save_model(model: Any, folder: Path, sharded: bool) -> None:
    if sharded:
        total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        model.save_pretrained(folder, max_shard_size=total // 4)  # >= 3 shards, whatever the dtype
    else:
        model.save_pretrained(folder)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Builder of tiny random Llama models on disk; see the module docstring."""
    built: dict[tuple[Any, ...], Path] = {}

    def build(
        *, dtype: str = "float32", seed: int = 0, sharded: bool = False, tie_word_embeddings: bool = False
    ) -> Path:
        key = (dtype, seed, sharded, tie_word_embeddings)
        if key not in built:
            import torch
            from transformers import LlamaConfig, LlamaForCausalLM

            _quiet_transformers()
            config = LlamaConfig(**LLAMA_DIMS, tie_word_embeddings=tie_word_embeddings)
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config).to(getattr(torch, dtype))
            folder = tmp_path_factory.mktemp(f"llama-{dtype}-s{seed}{'-sharded' if sharded else ''}")
            _save_model(model, folder, sharded)
            built[key] = folder
        return built[key]

    return build


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Builder of tiny random GPT-2 models (Conv1D, fan_in_fan_out) on disk."""
    built: dict[int, Path] = {}

    def build(*, seed: int = 0) -> Path:
        if seed not in built:
            import torch
            from transformers import GPT2Config, GPT2LMHeadModel

            _quiet_transformers()
            config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=128)
            torch.manual_seed(seed)
            model = GPT2LMHeadModel(config)
            folder = tmp_path_factory.mktemp(f"gpt2-s{seed}")
            model.save_pretrained(folder)
            built[seed] = folder
        return built[seed]

    return build


@pytest.fixture(scope="session")
def lora_adapter(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Builder of PEFT LoRA adapters with random non-zero A and B; see the module docstring."""
    built: dict[tuple[Any, ...], Path] = {}

    def build(
        base: Path,
        *,
        r: int = 8,
        alpha: int = 16,
        target_modules: Sequence[str] = ("q_proj", "v_proj"),
        use_rslora: bool = False,
        rank_pattern: dict[str, int] | None = None,
        alpha_pattern: dict[str, float] | None = None,
        fan_in_fan_out: bool = False,
        seed: int = 1,
    ) -> Path:
        key = (
            str(base),
            r,
            alpha,
            tuple(target_modules),
            use_rslora,
            tuple((rank_pattern or {}).items()),
            tuple((alpha_pattern or {}).items()),
            fan_in_fan_out,
            seed,
        )
        if key not in built:
            import torch
            from peft import LoraConfig, get_peft_model
            from transformers import AutoModelForCausalLM

            _quiet_transformers()
            model = AutoModelForCausalLM.from_pretrained(base)
            config = LoraConfig(
                r=r,
                lora_alpha=alpha,
                target_modules=list(target_modules),
                use_rslora=use_rslora,
                rank_pattern=dict(rank_pattern or {}),
                alpha_pattern=dict(alpha_pattern or {}),
                fan_in_fan_out=fan_in_fan_out,
            )
            peft_model = get_peft_model(model, config)
            generator = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for name, parameter in peft_model.named_parameters():
                    if ".lora_A." in name or ".lora_B." in name:
                        noise = torch.randn(parameter.shape, generator=generator) * LORA_FACTOR_STD
                        parameter.copy_(noise)
            folder = tmp_path_factory.mktemp("adapter")
            peft_model.save_pretrained(str(folder))
            built[key] = folder
        return built[key]

    return build


@pytest.fixture(scope="session")
def lora_manifest() -> Callable[..., Any]:
    """Builder of the manifest ``push`` would make for an adapter on a base (see the module docstring)."""

    def build(adapter: Path, base: Path, *, with_tensors: bool = True) -> Any:
        from deltareg.client.fingerprint import fingerprint_path
        from deltareg.client.lora import read_peft_adapter
        from deltareg.client.manifest import BaseModelRef, FileEntry, Manifest

        read = read_peft_adapter(adapter)
        fingerprint = fingerprint_path(base, use_cache=False)
        touched = {t.base_tensor: fingerprint.tensors[t.base_tensor].digest for t in read.targets}
        files = [
            FileEntry(path=rel, digest=_file_digest(path), size=path.stat().st_size)
            for rel, path in ((rel, read.folder / rel) for rel in read.files)
        ]
        return Manifest(
            kind="lora",
            files=files,
            base=BaseModelRef(fingerprint=fingerprint.value, tensors=touched if with_tensors else {}),
            params=read.params(),
        )

    return build


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


@pytest.fixture
def copy_folder(tmp_path: Path) -> Callable[[Path], Path]:
    """Copy a folder into this test's tmp_path, to edit it without touching the cached original."""
    count = 0

    def copy(src: Path) -> Path:
        nonlocal count
        count += 1
        destination = tmp_path / f"copy{count}-{src.name}"
        shutil.copytree(src, destination)
        return destination

    return copy
