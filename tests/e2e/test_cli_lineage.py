"""Lineage through the real CLI against a real registry process, on SQLite and on PostgreSQL (+ S3):
push a parent and a child with training metadata, `deltareg lineage`, and `deltareg apply` of the child
(the whole chain) equal to PEFT merging the parent, then the child."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _support.servers import Backend, ServerProcess

pytestmark = pytest.mark.slow

OTHER_BASE = "tmv1:" + "cd" * 32


@pytest.fixture
def server(backend: Backend, tmp_path: Path) -> Iterator[ServerProcess]:
    """A registry process on this test's backend (the conftest `cli` fixture points at it)."""
    process = ServerProcess(backend, tmp_path / "server.log")
    process.start()
    try:
        yield process
    finally:
        process.stop()
    assert process.server_errors() == []


def ok(result: Any) -> Any:
    assert result.returncode == 0, result.stderr
    return result


def as_json(result: Any) -> Any:
    return json.loads(ok(result).stdout)


def peft_chain(base: Path, *adapters: Path) -> dict[str, Any]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(base)
    for adapter in adapters:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return dict(model.state_dict())


def test_push_with_training_metadata_lineage_and_chain_apply(cli, tiny_llama, lora_adapter, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    base = tiny_llama(dtype="bfloat16")
    parent_adapter = lora_adapter(base, seed=41)
    child_adapter = lora_adapter(base, target_modules=("q_proj", "k_proj"), r=4, alpha=8, seed=42)

    parent = as_json(cli("push", parent_adapter, "acme/lineage-base", "--base", base, "--json"))
    child = as_json(
        cli(
            "push",
            child_adapter,
            "acme/lineage-child",
            "--base",
            base,
            "--parent",
            "acme/lineage-base:1",
            "--dataset",
            "tickets@v3",
            "--dataset",
            "faq",
            "--code-commit",
            "0123abcd",
            "--hparam",
            "lr=1e-4",
            "--hparam",
            "epochs=3",
            "--hparam",
            "scheduler=cosine",
            "--meta",
            "owner=support-team",
            "--json",
        )
    )
    assert child["parent"] == parent["digest"]
    shown = as_json(cli("show", "acme/lineage-child:1", "--json"))
    assert shown["manifest"]["metadata"] == {
        "datasets": [{"name": "tickets", "revision": "v3"}, {"name": "faq", "revision": None}],
        "code_commit": "0123abcd",
        "hyperparameters": {"lr": 0.0001, "epochs": 3, "scheduler": "cosine"},
        "owner": "support-team",
    }
    human = ok(cli("show", "acme/lineage-child:1")).stdout
    for line in ("dataset:  tickets@v3", "dataset:  faq", "code:     0123abcd", "hparam:   epochs=3"):
        assert line in human
    assert "meta:     owner=support-team" in human

    # A grandchild on another branch, aliases in both repos.
    as_json(cli("push", lora_adapter(base, seed=43), "acme/lineage-child", "--base", base, "--parent",
                "acme/lineage-child:1", "--json"))  # fmt: skip
    ok(cli("promote", "acme/lineage-base:1", "--alias", "production"))
    ok(cli("promote", "acme/lineage-child:2", "--alias", "staging"))

    graph = as_json(cli("lineage", "acme/lineage-child:1", "--json"))
    assert graph["root"] == child["digest"]
    assert graph["ancestors"] == [parent["digest"]]
    assert len(graph["descendants"]) == 1
    nodes = {f"{n['repo']}:{n['number']}": n for n in graph["nodes"]}
    assert nodes["acme/lineage-base:1"]["aliases"] == ["acme/lineage-base@production"]
    assert nodes["acme/lineage-child:2"]["aliases"] == ["acme/lineage-child@staging"]
    assert nodes["acme/lineage-child:1"]["hyperparameters"] == {
        "lr": 0.0001,
        "epochs": 3,
        "scheduler": "cosine",
    }

    lines = ok(cli("lineage", "acme/lineage-child:1")).stdout.splitlines()
    assert (
        lines[0].startswith("acme/lineage-base:1  sha256:") and "[acme/lineage-base@production]" in lines[0]
    )
    assert lines[1].startswith("└── acme/lineage-child:1  ") and lines[1].endswith("<- acme/lineage-child:1")
    assert "datasets: tickets@v3, faq" in lines[1]
    assert (
        lines[2].startswith("    └── acme/lineage-child:2  ") and "[acme/lineage-child@staging]" in lines[2]
    )
    assert len(lines) == 3
    from_top = ok(cli("lineage", "acme/lineage-base@production")).stdout.splitlines()
    assert [line.split("  sha256:")[0] for line in from_top] == [
        "acme/lineage-base:1",
        "└── acme/lineage-child:1",
        "    └── acme/lineage-child:2",
    ]
    assert from_top[0].endswith("<- acme/lineage-base:1")

    # Applying the child applies the chain: bit-identical to PEFT merging the parent, then the child.
    out = tmp_path / "merged"
    ok(cli("apply", "acme/lineage-child:1", "--base", base, "-o", out))
    merged = AutoModelForCausalLM.from_pretrained(out).state_dict()
    expected = peft_chain(base, parent_adapter, child_adapter)
    assert merged.keys() == expected.keys()
    assert [name for name in expected if not torch.equal(merged[name], expected[name])] == []
    alone = peft_chain(base, child_adapter)
    q0 = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[q0], alone[q0])  # the parent's delta is in there too

    # On a wrong base: exit 3, nothing written.
    wrong = tmp_path / "wrong"
    refused = cli(
        "apply", "acme/lineage-child:1", "--base", tiny_llama(dtype="bfloat16", seed=5), "-o", wrong
    )
    assert refused.returncode == 3, refused.stderr
    assert "wrong base model" in refused.stderr
    assert not wrong.exists()


def test_bad_training_metadata_and_bad_parents_are_refused(cli, tiny_llama, lora_adapter):
    base = tiny_llama()
    adapter = lora_adapter(base, seed=44)
    parent = as_json(cli("push", lora_adapter(base, seed=45), "acme/lineage-p", "--base", base, "--json"))

    for flags, message in [
        (("--hparam", "lr=nan"), "not a finite number"),
        (("--hparam", "lr=inf"), "not a finite number"),
        (("--hparam", "novalue"), "expected KEY=VALUE"),
        (("--dataset", "@v1"), "expected NAME or NAME@REVISION"),
        (("--dataset", "x" * 300), "printable characters"),
    ]:
        result = cli("push", adapter, "acme/lineage-bad", "--base", base, *flags)
        assert result.returncode == 2, (flags, result.stderr)
        assert message in result.stderr, (flags, result.stderr)
    for flags, message in [
        (("--code-commit", "has space"), "invalid code commit"),
        (("--meta", "datasets=foo"), "reserved"),
    ]:
        result = cli("push", adapter, "acme/lineage-bad", "--base", base, *flags)
        assert result.returncode == 1, (flags, result.stderr)
        assert message in result.stderr, (flags, result.stderr)

    # A parent on another base: the registry refuses it (400), nothing is recorded.
    other = cli("push", adapter, "acme/lineage-bad", "--base", OTHER_BASE, "--parent", "acme/lineage-p:1")
    assert other.returncode == 1
    assert f"parent {parent['digest']} applies to base" in other.stderr
    missing = cli("lineage", "acme/lineage-bad")
    assert missing.returncode == 1 and "does not exist" in missing.stderr
    graph = as_json(cli("lineage", "acme/lineage-p:1", "--json"))
    assert (graph["descendants"], graph["truncated"]) == ([], False)
    unknown = cli("lineage", "acme/lineage-p:7")
    assert unknown.returncode == 1 and "names no version" in unknown.stderr


def test_a_yanked_ancestor_is_refused_unless_yanked_versions_are_allowed(
    cli, tiny_llama, lora_adapter, tmp_path
):
    base = tiny_llama()
    parent = as_json(cli("push", lora_adapter(base, seed=46), "acme/lineage-y", "--base", base, "--json"))
    ok(
        cli(
            "push",
            lora_adapter(base, seed=47),
            "acme/lineage-y",
            "--base",
            base,
            "--parent",
            "acme/lineage-y:1",
        )
    )
    ok(cli("yank", "acme/lineage-y:1", "--reason", "trained on leaked data"))

    graph = as_json(cli("lineage", "acme/lineage-y:2", "--json"))
    assert [n["yanked"] for n in graph["nodes"]] == [None, "trained on leaked data"]
    assert "YANKED: trained on leaked data" in ok(cli("lineage", "acme/lineage-y:2")).stdout

    refused = cli("apply", "acme/lineage-y:2", "--base", base, "-o", tmp_path / "refused")
    assert refused.returncode == 1, refused.stderr
    assert (
        f"acme/lineage-y:1 ({parent['digest']}), which was yanked: trained on leaked data" in refused.stderr
    )
    assert not (tmp_path / "refused").exists()
    ok(cli("apply", "acme/lineage-y:2", "--base", base, "-o", tmp_path / "allowed", "--allow-yanked"))
    assert (tmp_path / "allowed" / "model.safetensors").exists()
