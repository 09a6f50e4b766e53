"""Minimal PEFT LoRA adapter folders built without torch or peft (numpy + safetensors)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file


def make_adapter(folder: Path, seed: int) -> Path:
    """A minimal PEFT LoRA adapter folder (one target module), different bytes for every seed."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    tensors = {
        "base_model.model.layer.lora_A.weight": rng.standard_normal((2, 16)).astype(np.float32),
        "base_model.model.layer.lora_B.weight": rng.standard_normal((16, 2)).astype(np.float32),
    }
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["layer"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder
