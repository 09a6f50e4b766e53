"""Comparing tensors the way the apply tests state their results: in ulps of the base dtype."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch


def ulp_distance(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """Per element, how many representable values of the dtype lie between ``actual`` and ``expected``."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    int_dtype, magnitude = {torch.float32: (torch.int32, 0x7FFFFFFF), torch.bfloat16: (torch.int16, 0x7FFF)}[
        actual.dtype
    ]

    def ordered(t: torch.Tensor) -> torch.Tensor:
        bits = t.contiguous().view(int_dtype).long()
        return torch.where(bits < 0, -(bits & magnitude), bits)

    return (ordered(actual) - ordered(expected)).abs()


def max_ulp(actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> int:
    """The largest ulp distance over two state dicts with the same names."""
    assert actual.keys() == expected.keys()
    return max(int(ulp_distance(actual[n].detach(), t.detach()).max()) for n, t in expected.items())


def load_model(folder: Path) -> Any:
    """A transformers causal LM from a local folder, in eval mode."""
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(folder)
    model.eval()
    return model
