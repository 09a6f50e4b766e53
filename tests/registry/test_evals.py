"""Scores pushed with a version: recorded with a new version only, finite values only."""

from __future__ import annotations

import pytest

REPO = "acme/scored"


def _push_with(registry, evals, seed=0):
    files = registry.lora_files(seed)
    registry.upload_all(files)
    return _create(registry, registry.manifest_for(files), evals)


def _create(registry, manifest, evals):
    return registry.client.post(f"/api/v1/repos/{REPO}/versions", json={"manifest": manifest, "evals": evals})


def test_evals_pushed_with_a_version_are_shown_with_it(registry):
    response = _push_with(registry, [{"name": "accuracy", "value": 0.91, "dataset": "tickets-v3"}])
    assert response.status_code == 201, response.text
    shown = registry.client.get(f"/api/v1/resolve?ref={REPO}:1").json()
    assert [(e["name"], e["value"], e["dataset"]) for e in shown["evals"]] == [
        ("accuracy", 0.91, "tickets-v3")
    ]
    assert shown["evals"][0]["created_at"]


def test_an_identical_repush_records_no_second_score(registry):
    assert _push_with(registry, [{"name": "accuracy", "value": 0.91}]).status_code == 201
    again = _push_with(registry, [{"name": "accuracy", "value": 0.5}])
    assert again.status_code == 200
    assert [e["value"] for e in again.json()["evals"]] == [0.91]
    assert registry.count_rows()["evals"] == 1


@pytest.mark.parametrize(
    "bad",
    [
        {"name": "accuracy", "value": "NaN"},
        {"name": "accuracy", "value": "Infinity"},
        {"name": "../x", "value": 1.0},
        {"name": "accuracy", "value": 1.0, "extra": 1},
    ],
)
def test_bad_scores_are_refused_and_nothing_is_recorded(registry, bad):
    files = registry.lora_files(0)
    registry.upload_all(files)
    before = registry.count_rows()
    response = _create(registry, registry.manifest_for(files), [bad])
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_input"
    assert registry.count_rows() == before
