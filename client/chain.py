"""Chains of versions: a version whose delta was trained on base + parent is applied with its ancestors.

``pull_ancestors`` asks the registry for the version's lineage (with manifests), checks it against what
the version's own manifest says (each manifest hashes to its digest and names the next one as parent, up
to a version without parent), refuses a yanked ancestor unless yanked versions are allowed, then pulls
every ancestor into the cache (each file's digest verified). Applying (``apply_pulled``,
``apply_pulled_files``) merges the oldest ancestor first into the pristine base, then each descendant,
each step rounded to the base dtype like PEFT's ``merge_and_unload`` (see deltareg.client.apply); the base
is checked once against the chain's base, and every step's targets against it, before anything changes.

A yanked ancestor: the child's delta was trained on top of it, so using the child uses it too. Pulling or
applying such a version is refused with VersionYanked naming the ancestor and its reason, unless yanked
versions are allowed (``allow_yanked=True``, ``--allow-yanked``), which then covers the ancestors as well.

torch is imported only when applying.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from deltareg.client.errors import DigestMismatch, InvalidManifest, VersionYanked

if TYPE_CHECKING:
    import torch

    from deltareg.client.api import PulledDelta, Registry, VerifyMode, VersionInfo
    from deltareg.client.apply import ApplyResult, Step
    from deltareg.client.signing import PublicKey


def pull_ancestors(
    registry: Registry,
    info: VersionInfo,
    *,
    allow_yanked: bool = False,
    trusted_keys: Sequence[PublicKey] | None = None,
) -> tuple[PulledDelta, ...]:
    """The ancestors of ``info``, oldest first, each pulled and verified (none for a version without parent).

    With ``trusted_keys``, each ancestor must be signed by one of them (SignatureInvalid otherwise, raised
    before that ancestor is downloaded or taken from the cache).

    Raises:
        VersionYanked: an ancestor was yanked (and ``allow_yanked`` is off); nothing was downloaded.
        DigestMismatch: the registry's answer does not match the manifests' digests and parents.
        InvalidManifest: the chain is incomplete (an ancestor is missing, or the chain is too long).
    """
    from deltareg.client.api import VersionInfo

    if info.manifest.parent is None:
        return ()
    graph = registry.lineage(f"{info.repo}@{info.digest}", depth=0, manifests=True)
    nodes: dict[str, dict[str, Any]] = {}
    for node in graph["nodes"]:
        nodes.setdefault(node["digest"], node)
    chain: list[VersionInfo] = []
    expected: str | None = info.manifest.parent
    for digest in graph["ancestors"]:
        if expected is None:
            break
        if digest != expected or nodes.get(digest, {}).get("manifest") is None:
            raise DigestMismatch(
                f"the registry's lineage of {info.ref} names {digest} where the manifest's parent "
                f"is {expected}"
            )
        ancestor = VersionInfo.from_json(nodes[digest])  # checks the manifest against its digest
        reason = nodes[digest]["yanked"]
        if reason is not None and not allow_yanked:
            raise VersionYanked(
                f"{info.ref} stacks on {ancestor.ref} ({digest}), which was yanked: {reason}; "
                "allow yanked versions (allow_yanked=True, --allow-yanked) to use it anyway"
            )
        chain.append(ancestor)
        expected = ancestor.manifest.parent
    if expected is not None:
        raise InvalidManifest(
            f"the chain of {info.ref} is incomplete: its ancestor {expected} is not in the registry's answer "
            f"({len(chain)} ancestors found)"
        )
    return tuple(
        registry.pull_version(
            ancestor, chain=False, require_signature=trusted_keys is not None, trusted_keys=trusted_keys
        )
        for ancestor in reversed(chain)
    )


def steps_of(pulled: PulledDelta) -> list[Step]:
    """The chain to apply for a pulled version: its ancestors (oldest first), then itself."""
    from deltareg.client.apply import Step

    return [Step(p.path, p.manifest) for p in (*pulled.ancestors, pulled)]


def apply_pulled(
    pulled: PulledDelta, model: torch.nn.Module | dict[str, torch.Tensor], *, verify: VerifyMode = "full"
) -> None:
    """Apply a pulled version (and its ancestors) to a module or state dict in place."""
    import torch

    from deltareg.client.apply import apply_steps_to_module, apply_steps_to_state_dict

    if isinstance(model, torch.nn.Module):
        apply_steps_to_module(model, steps_of(pulled), verify=verify)
    else:
        apply_steps_to_state_dict(model, steps_of(pulled), verify=verify)


def apply_pulled_files(
    pulled: PulledDelta,
    base: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    verify: VerifyMode = "full",
    expect: str | None = None,
) -> ApplyResult:
    """Write base + the pulled version's chain to ``output`` (nothing is written if anything is wrong)."""
    from deltareg.client.apply import apply_steps_files

    return apply_steps_files(
        base, steps_of(pulled), output, verify=verify, cache=pulled.fingerprints, expect=expect
    )
