"""A full fine-tune through the real CLI and a real server: diff, push (ratio shown, result recorded), show,
apply --expect, apply --record; wrong expectations exit 3 and write nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from _support.tensors import load_model
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


def ok(result: Any) -> Any:
    assert result.returncode == 0, result.stderr
    return result


def fine_tune(base: Path, out: Path) -> Path:
    model = load_model(base)
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(
                (param.float() + torch.randn(param.shape, generator=generator) * 0.002).to(param.dtype)
            )
        model.resize_token_embeddings(model.config.vocab_size + 4, mean_resizing=False)
    model.save_pretrained(out)
    return out


def test_a_full_fine_tune_through_the_cli(cli, tiny_llama, lora_adapter, tmp_path):
    base = tiny_llama(dtype="bfloat16")
    tuned = fine_tune(base, tmp_path / "tuned")
    tuned_hash = ok(cli("hash", tuned)).stdout.strip()

    diffed = json.loads(ok(cli("diff", base, tuned, "-o", tmp_path / "delta", "--json")).stdout)
    assert diffed["result_fingerprint"] == tuned_hash
    assert diffed["files"] == ["files/config.json"] and diffed["ratio"] > 1

    pushed = ok(cli("push", tmp_path / "delta", "acme/full", "--base", base))
    assert "pushed acme/full:1" in pushed.stdout
    assert "dense delta:" in pushed.stdout and f"({diffed['ratio']:.2f}x)" in pushed.stdout
    base_ref = json.loads(ok(cli("show", "acme/full:1", "--json")).stdout)["manifest"]["base"]
    assert base_ref["config"]["vocab_size"] == 256  # the base's config, recorded for apply to compare
    shown = ok(cli("show", "acme/full:1")).stdout
    assert "kind:     full" in shown
    assert f"result:   BF16 base -> {tuned_hash}" in shown  # recorded at push from the diff

    applied = ok(cli("apply", "acme/full", "--base", base, "-o", tmp_path / "merged", "--expect", "recorded"))
    assert applied.stdout.splitlines() == [str(tmp_path / "merged"), f"fingerprint: {tuned_hash}"]
    merged, expected = (
        load_file(tmp_path / "merged" / "model.safetensors"),
        load_file(tuned / "model.safetensors"),
    )
    assert merged.keys() == expected.keys()
    assert all(torch.equal(merged[k].view(torch.uint8), expected[k].view(torch.uint8)) for k in expected)
    assert load_model(tmp_path / "merged").config.vocab_size == 260

    wrong = cli(
        "apply", "acme/full", "--base", base, "-o", tmp_path / "wrong", "--expect", "tmv1:" + "0" * 64
    )
    assert wrong.returncode == 3 and "was expected" in wrong.stderr
    assert not (tmp_path / "wrong").exists()

    # A LoRA version: apply --record records what it printed; later applies can expect it.
    ok(cli("push", lora_adapter(base), "acme/lora", "--base", base))
    recorded = ok(cli("apply", "acme/lora", "--base", base, "-o", tmp_path / "lora1", "--record", "--json"))
    body = json.loads(recorded.stdout)
    assert body["recorded"]["base_dtype"] == "BF16"
    assert body["fingerprint"] == ok(cli("hash", tmp_path / "lora1")).stdout.strip()
    fast = cli(
        "apply", "acme/lora", "--base", base, "-o", tmp_path / "lora2", "--fast", "--expect", "recorded"
    )
    assert ok(fast).stdout.splitlines()[1] == f"fingerprint: {body['fingerprint']}"


def test_push_refuses_a_dense_delta_on_another_base_or_with_a_parent(cli, tiny_llama, tmp_path):
    base = tiny_llama(dtype="bfloat16")
    ok(cli("diff", base, fine_tune(base, tmp_path / "tuned"), "-o", tmp_path / "delta"))
    other = tiny_llama(dtype="bfloat16", seed=3)
    refused = cli("push", tmp_path / "delta", "acme/full-refused", "--base", other)
    assert refused.returncode == 3 and "computed from" in refused.stderr
    with_parent = cli("push", tmp_path / "delta", "acme/full-refused", "--base", base, "--parent", "acme/x:1")
    assert with_parent.returncode == 1 and "without a parent" in with_parent.stderr
    assert cli("show", "acme/full-refused").returncode == 1  # nothing was created
