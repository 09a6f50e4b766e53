"""Applying a chain of versions (a child trained on base + parent): equal to PEFT merging them one by one,
every step checked before anything changes, yanked ancestors refused unless allowed."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import torch
from _support.auth import TEST_TOKEN, bearer

from deltareg.client.api import PulledDelta, Registry
from deltareg.client.apply import Step, apply_steps_files, apply_steps_to_state_dict
from deltareg.client.cache import VersionRecord
from deltareg.client.errors import BaseMismatch, InvalidInput, InvalidManifest, VersionYanked
from deltareg.client.manifest import Manifest

pytestmark = pytest.mark.slow

# The child touches q_proj like its parent (so two merges land on the same tensors) and k_proj alone.
PARENT = {"target_modules": ("q_proj", "v_proj"), "seed": 31}
CHILD = {"target_modules": ("q_proj", "k_proj"), "r": 4, "alpha": 8, "seed": 32}


def load(folder: Path) -> Any:
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(folder)
    model.eval()
    return model


def peft_chain(base: Path, *adapters: Path) -> dict[str, torch.Tensor]:
    """The reference: PEFT merges the first adapter into the base, loads the next onto the merged model,
    merges again, and so on."""
    from peft import PeftModel

    model = load(base)
    for adapter in adapters:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def with_parent(manifest: Manifest, parent: Manifest) -> Manifest:
    return Manifest.parse({**manifest.to_json_obj(), "parent": parent.digest})


def assert_identical(actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    differ = [name for name in expected if not torch.equal(actual[name].detach(), expected[name])]
    assert differ == [], f"not bit-identical to PEFT: {differ[:5]}"


def snapshot(model: Any) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


@pytest.fixture
def chain(
    tiny_llama: Callable[..., Path], lora_adapter: Callable[..., Path], lora_manifest: Callable[..., Manifest]
) -> Callable[[str], tuple[Path, list[Path], list[Step]]]:
    """dtype -> (base, [parent adapter, child adapter], the steps to apply)."""

    def build(dtype: str) -> tuple[Path, list[Path], list[Step]]:
        base = tiny_llama(dtype=dtype)
        parent, child = lora_adapter(base, **PARENT), lora_adapter(base, **CHILD)
        parent_manifest = lora_manifest(parent, base)
        child_manifest = with_parent(lora_manifest(child, base), parent_manifest)
        return base, [parent, child], [Step(parent, parent_manifest), Step(child, child_manifest)]

    return build


# ---- equality with PEFT


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("verify", ["full", "touched"])
def test_a_chain_applied_in_memory_is_bit_identical_to_peft_merging_one_by_one(chain, dtype, verify):
    base, adapters, steps = chain(dtype)
    expected = peft_chain(base, *adapters)
    model = load(base)
    before = snapshot(model)

    apply_steps_to_state_dict(model.state_dict(keep_vars=True), steps, verify=verify)

    assert_identical(model.state_dict(), expected)
    changed = {name for name, t in model.state_dict().items() if not torch.equal(t, before[name])}
    touched = set(steps[0].manifest.base.tensors) | set(steps[1].manifest.base.tensors)
    assert changed == touched
    # The child alone on the base is something else: the chain did apply both.
    assert not torch.equal(model.state_dict()[Q0], peft_chain(base, adapters[1])[Q0])


Q0 = "model.layers.0.self_attn.q_proj.weight"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_chain_applied_file_to_file_is_bit_identical_to_peft(chain, dtype, tmp_path):
    base, adapters, steps = chain(dtype)
    result = apply_steps_files(base, steps, tmp_path / "merged")
    merged = load(result.output)
    assert next(merged.parameters()).dtype == getattr(torch, dtype)
    assert_identical(merged.state_dict(), peft_chain(base, *adapters))
    assert result.tensors_changed == len(
        set(steps[0].manifest.base.tensors) | set(steps[1].manifest.base.tensors)
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no temporary folder left


def test_pulled_delta_applies_its_ancestors_first(chain, tmp_path):
    base, adapters, steps = chain("bfloat16")

    def pulled(step: Step, number: int, ancestors: tuple[PulledDelta, ...] = ()) -> PulledDelta:
        record = VersionRecord(
            repo="acme/x", number=number, digest=step.manifest.digest, manifest=step.manifest
        )
        return PulledDelta(path=step.path, version=record, ancestors=ancestors)

    child = pulled(steps[1], 2, (pulled(steps[0], 1),))
    model = load(base)
    child.apply(model)
    expected = peft_chain(base, *adapters)
    assert_identical(model.state_dict(), expected)
    out = child.apply_files(base, tmp_path / "out").output
    assert_identical(load(out).state_dict(), expected)

    # Without its ancestors, a version with a parent is not applied alone (on the base it was not
    # trained on): refused, nothing changed.
    orphan = pulled(steps[1], 2)
    fresh = load(base)
    before = snapshot(fresh)
    with pytest.raises(InvalidManifest, match="stacks on parent"):
        orphan.apply(fresh)
    assert_identical(fresh.state_dict(), before)


# ---- refusals: nothing modified, nothing written


@pytest.mark.parametrize("verify", ["full", "touched"])
def test_a_wrong_base_is_refused_with_the_model_untouched_and_no_output(chain, tiny_llama, tmp_path, verify):
    _, _, steps = chain("float32")
    other = tiny_llama(dtype="float32", seed=5)
    model = load(other)
    before = snapshot(model)
    with pytest.raises(BaseMismatch, match="wrong base model"):
        apply_steps_to_state_dict(model.state_dict(keep_vars=True), steps, verify=verify)
    assert_identical(model.state_dict(), before)
    with pytest.raises(BaseMismatch):
        apply_steps_files(other, steps, tmp_path / "out", verify=verify)
    assert list(tmp_path.iterdir()) == []


def test_a_step_that_does_not_fit_the_base_is_refused_before_any_step_is_applied(
    chain, tiny_gpt2, lora_adapter, lora_manifest, tmp_path
):
    base, _, steps = chain("float32")
    # A GPT-2 adapter claiming this base and this parent: its targets do not exist in the Llama.
    gpt2 = tiny_gpt2()
    stray = lora_adapter(gpt2, target_modules=("c_attn",), fan_in_fan_out=True)
    forged = Manifest.parse(
        {
            **lora_manifest(stray, gpt2, with_tensors=False).to_json_obj(),
            "base": {"fingerprint": steps[0].manifest.base.fingerprint},
            "parent": steps[0].manifest.digest,
        }
    )
    bad = [steps[0], Step(stray, forged)]
    model = load(base)
    before = snapshot(model)
    with pytest.raises(BaseMismatch, match="c_attn"):
        apply_steps_to_state_dict(model.state_dict(keep_vars=True), bad)
    assert_identical(model.state_dict(), before)  # not even the valid first step was applied
    with pytest.raises(BaseMismatch):
        apply_steps_files(base, bad, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_steps_that_do_not_form_a_chain_on_one_base_are_refused(chain, tmp_path):
    base, _, (parent, child) = chain("float32")
    other_base = Manifest.parse(
        {**child.manifest.to_json_obj(), "base": {"fingerprint": "tmv1:" + "cd" * 32}}
    )
    cases = [
        ([child, parent], InvalidManifest, "stacks on parent"),
        ([parent, Step(parent.path, parent.manifest)], InvalidManifest, "not a chain"),
        ([parent, Step(child.path, other_base)], InvalidManifest, "chain starts on base"),
        ([], InvalidInput, "nothing to apply"),
    ]
    model = load(base)
    before = snapshot(model)
    for steps, error, message in cases:
        with pytest.raises(error, match=message):
            apply_steps_to_state_dict(model.state_dict(keep_vars=True), steps)
        with pytest.raises(error, match=message):
            apply_steps_files(base, steps, tmp_path / "out")
    assert_identical(model.state_dict(), before)
    assert list(tmp_path.iterdir()) == []


# ---- through a registry: ancestors pulled and verified, yanked ancestors refused unless allowed


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    """The client library against a real registry app (SQLite + blob folder) in this process."""
    from fastapi.testclient import TestClient

    from deltareg.registry.config import Settings
    from deltareg.registry.main import create_app

    settings = Settings(data_dir=tmp_path / "registry")
    with TestClient(create_app(settings), headers=bearer(TEST_TOKEN)) as http:
        client = Registry("http://testserver", http=http, cache_dir=tmp_path / "cache", progress=False)
        client.settings = settings  # type: ignore[attr-defined]
        yield client


def test_pull_fetches_the_ancestors_and_refuses_a_yanked_one_unless_allowed(registry, chain):
    from sqlalchemy import text

    from deltareg.registry.db import make_engine

    base, adapters, _ = chain("float32")
    parent = registry.push(adapters[0], "acme/parent", base=base).version
    child = registry.push(
        adapters[1],
        "acme/child",
        base=base,
        parent="acme/parent:1",
        datasets=[("tickets", "v3")],
        code_commit="0123abcd",
        hyperparameters={"lr": 1e-4, "epochs": 2},
    ).version
    assert child.parent == parent.digest
    assert child.manifest.metadata == {
        "datasets": [{"name": "tickets", "revision": "v3"}],
        "code_commit": "0123abcd",
        "hyperparameters": {"lr": 1e-4, "epochs": 2},
    }

    pulled = registry.pull("acme/child")
    assert [a.version.digest for a in pulled.ancestors] == [parent.digest]
    model = load(base)
    pulled.apply(model)
    assert_identical(model.state_dict(), peft_chain(base, *adapters))

    engine = make_engine(registry.settings.database_url)  # type: ignore[attr-defined]
    with engine.begin() as connection:
        connection.execute(
            text(
                "UPDATE versions SET yanked_at = :at, yank_reason = 'trained on leaked data' "
                "WHERE digest = :d"
            ),
            {"at": datetime.now(UTC), "d": parent.digest},
        )
    engine.dispose()
    with pytest.raises(VersionYanked, match=r"acme/parent:1 .*trained on leaked data"):
        registry.pull("acme/child")
    allowed = registry.pull_version(registry.resolve("acme/child"), allow_yanked=True)
    assert [a.version.digest for a in allowed.ancestors] == [parent.digest]
