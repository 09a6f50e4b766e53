"""Manifests: values JSON cannot hold are refused, not turned into something else."""

from __future__ import annotations

import math

import pytest

from deltareg.client.errors import InvalidManifest
from deltareg.client.manifest import Manifest

BASE = {
    "kind": "lora",
    "files": [{"path": "adapter_config.json", "digest": "sha256:" + "0" * 64, "size": 1}],
    "base": {"fingerprint": "tmv1:" + "0" * 64},
}


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("field", ["params", "metadata"])
def test_non_finite_numbers_are_refused_where_they_are(bad, field):
    with pytest.raises(InvalidManifest, match=rf"{field}\.scores\.1 is not a finite number"):
        Manifest.parse({**BASE, field: {"scores": [0.5, bad]}})


def test_finite_numbers_keep_their_digest():
    manifest = Manifest.parse({**BASE, "metadata": {"scores": [0.5, 1e300, -2]}})
    assert Manifest.parse(manifest.to_json_obj()).digest == manifest.digest
