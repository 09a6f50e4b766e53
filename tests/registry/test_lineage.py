"""The lineage API: ancestors, descendants, aliases and training metadata across repos; bounds;
bad parents."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import event, text

from deltareg.client.manifest import Manifest
from deltareg.registry.db import make_engine

pytestmark = pytest.mark.backends("fs")

OTHER_BASE = "tmv1:" + "cd" * 32


def lineage(registry: Any, ref: str, **params: Any) -> dict[str, Any]:
    response = registry.client.get("/api/v1/lineage", params={"ref": ref, **params})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def promote(registry: Any, repo: str, alias: str, version: int) -> None:
    body = {"version": version, "expected": None}
    response = registry.client.put(f"/api/v1/repos/{repo}/aliases/{alias}", json=body)
    assert response.status_code == 200, response.text


def refs(graph: dict[str, Any], digests: list[str]) -> list[str]:
    """``repo:number`` of the first node of each digest (the ancestor or descendant the graph shows)."""
    first: dict[str, str] = {}
    for node in graph["nodes"]:
        first.setdefault(node["digest"], f"{node['repo']}:{node['number']}")
    return [first[d] for d in digests]


def sql(registry: Any, statement: str, **params: Any) -> None:
    """Change rows behind the API's back (what no client can do): to plant states the API must survive."""
    engine = make_engine(registry.settings.database_url)
    try:
        with engine.begin() as connection:
            connection.execute(text(statement), params)
    finally:
        engine.dispose()


@pytest.fixture
def family(registry: Any) -> dict[str, dict[str, Any]]:
    """acme/base:1 <- acme/base:2 <- acme/child:1 <- acme/child:2, and other/fork:1 <- acme/base:1.

    Each pushed with a different adapter; acme/child:1 records training metadata; aliases on base:1,
    child:1 (two) and fork:1.
    """
    push = registry.push
    versions: dict[str, dict[str, Any]] = {}
    versions["base:1"] = push("acme/base", registry.lora_files(1))
    versions["base:2"] = push("acme/base", registry.lora_files(2), parent=versions["base:1"]["digest"])
    versions["fork:1"] = push("other/fork", registry.lora_files(3), parent=versions["base:1"]["digest"])
    metadata = {
        "datasets": [{"name": "tickets", "revision": "v3"}, {"name": "faq", "revision": None}],
        "code_commit": "0123abcd",
        "hyperparameters": {"lr": 0.0001, "epochs": 3, "scheduler": "cosine"},
        "note": "free-form",
    }
    versions["child:1"] = push(
        "acme/child", registry.lora_files(4), parent=versions["base:2"]["digest"], metadata=metadata
    )
    versions["child:2"] = push("acme/child", registry.lora_files(5), parent=versions["child:1"]["digest"])
    promote(registry, "acme/base", "production", 1)
    promote(registry, "acme/child", "staging", 1)
    promote(registry, "acme/child", "canary", 1)
    promote(registry, "other/fork", "production", 1)
    return versions


# ---- the graph


def test_lineage_of_a_middle_version_has_its_ancestors_descendants_and_aliases(registry, family):
    graph = lineage(registry, "acme/child:1")

    assert graph["root"] == family["child:1"]["digest"]
    assert refs(graph, graph["ancestors"]) == ["acme/base:2", "acme/base:1"]  # nearest first
    assert refs(graph, graph["descendants"]) == ["acme/child:2"]
    assert graph["truncated"] is False
    # The fork hangs off base:1, which is an ancestor, not in the root's subtree.
    assert "other/fork" not in {node["repo"] for node in graph["nodes"]}
    digest = {name: v["digest"] for name, v in family.items()}
    assert {(e["parent"], e["child"]) for e in graph["edges"]} == {
        (digest["base:1"], digest["base:2"]),
        (digest["base:2"], digest["child:1"]),
        (digest["child:1"], digest["child:2"]),
    }
    nodes = {f"{n['repo']}:{n['number']}": n for n in graph["nodes"]}
    assert nodes["acme/base:1"]["aliases"] == ["acme/base@production"]
    assert nodes["acme/child:1"]["aliases"] == ["acme/child@canary", "acme/child@staging"]
    assert nodes["acme/child:2"]["aliases"] == []
    root = nodes["acme/child:1"]
    assert root["datasets"] == [{"name": "tickets", "revision": "v3"}, {"name": "faq", "revision": None}]
    assert root["code_commit"] == "0123abcd"
    assert root["hyperparameters"] == {"lr": 0.0001, "epochs": 3, "scheduler": "cosine"}
    assert root["parent"] == digest["base:2"]
    assert root["pushed_by"] == "bootstrap"
    assert root["yanked"] is None
    assert root["base_fingerprint"] == registry.manifest_for(registry.lora_files(4))["base"]["fingerprint"]
    assert root["manifest"] is None  # only on request
    assert nodes["acme/base:1"]["datasets"] == [] and nodes["acme/base:1"]["code_commit"] is None


def test_descendants_cross_repos_breadth_first(registry, family):
    graph = lineage(registry, "acme/base:1")
    assert graph["ancestors"] == []
    # Level 1 (base:2, fork:1, oldest first), then level 2 (child:1), then level 3 (child:2).
    assert refs(graph, graph["descendants"]) == [
        "acme/base:2",
        "other/fork:1",
        "acme/child:1",
        "acme/child:2",
    ]
    fork = next(n for n in graph["nodes"] if n["repo"] == "other/fork")
    assert fork["aliases"] == ["other/fork@production"]
    assert len(graph["edges"]) == 4


def test_a_reference_by_alias_or_digest_names_the_root(registry, family):
    by_alias = lineage(registry, "acme/child@staging")
    by_digest = lineage(registry, f"acme/child@{family['child:1']['digest']}")
    newest = lineage(registry, "acme/child")
    assert by_alias["root"] == by_digest["root"] == family["child:1"]["digest"]
    assert newest["root"] == family["child:2"]["digest"]
    assert refs(newest, newest["ancestors"]) == ["acme/child:1", "acme/base:2", "acme/base:1"]


def test_manifests_are_given_for_the_root_and_its_ancestors_on_request(registry, family):
    graph = lineage(registry, "acme/child:1", manifests="true")
    nodes = {f"{n['repo']}:{n['number']}": n for n in graph["nodes"]}
    for name in ("acme/child:1", "acme/base:2", "acme/base:1"):
        assert Manifest.parse(nodes[name]["manifest"]).digest == nodes[name]["digest"]
    assert nodes["acme/child:2"]["manifest"] is None


def test_a_yanked_version_is_marked_with_its_reason(registry, family):
    sql(
        registry,
        "UPDATE versions SET yanked_at = :at, yank_reason = 'leaked eval data', yanked_by = 'alice' "
        "WHERE digest = :digest",
        at=datetime.now(UTC),
        digest=family["base:2"]["digest"],
    )
    graph = lineage(registry, "acme/child:2")
    yanked = {f"{n['repo']}:{n['number']}": n["yanked"] for n in graph["nodes"]}
    assert yanked == {
        "acme/child:2": None,
        "acme/child:1": None,
        "acme/base:2": "leaked eval data",
        "acme/base:1": None,
    }


def test_an_ancestor_in_several_repos_is_picked_in_the_childs_repo_else_the_oldest(registry):
    shared = registry.lora_files(7)
    in_x = registry.push("team/x", shared)
    in_y = registry.push("team/y", registry.lora_files(8))  # team/y:1 is something else
    in_y = registry.push("team/y", shared)  # team/y:2: the same manifest as team/x:1
    assert in_y["digest"] == in_x["digest"]
    registry.push("team/y", registry.lora_files(9), parent=in_x["digest"])
    registry.push("team/z", registry.lora_files(10), parent=in_x["digest"])

    from_y = lineage(registry, "team/y:3")
    from_z = lineage(registry, "team/z:1")
    assert refs(from_y, from_y["ancestors"]) == ["team/y:2"]  # same repo as the child
    assert refs(from_z, from_z["ancestors"]) == ["team/x:1"]  # no copy in team/z: the oldest
    # Both copies of the shared manifest have the two children as descendants.
    for ref in ("team/x:1", "team/y:2"):
        graph = lineage(registry, ref)
        assert sorted(refs(graph, graph["descendants"])) == ["team/y:3", "team/z:1"]


# ---- bounds


def test_depth_limits_the_descendants_and_says_so(registry):
    parent = None
    for seed in range(5):
        parent = registry.push("acme/deep", registry.lora_files(seed), parent=parent and parent["digest"])
    cut = lineage(registry, "acme/deep:1", depth=2)
    assert refs(cut, cut["descendants"]) == ["acme/deep:2", "acme/deep:3"]
    assert cut["truncated"] is True
    whole = lineage(registry, "acme/deep:1", depth=4)
    assert refs(whole, whole["descendants"]) == ["acme/deep:2", "acme/deep:3", "acme/deep:4", "acme/deep:5"]
    assert whole["truncated"] is False
    none = lineage(registry, "acme/deep:3", depth=0)
    assert (none["descendants"], none["truncated"]) == ([], True)
    assert refs(none, none["ancestors"]) == ["acme/deep:2", "acme/deep:1"]
    leaf = lineage(registry, "acme/deep:5", depth=0)
    assert leaf["truncated"] is False


def test_the_node_limit_cuts_the_descendants_and_says_so(registry, monkeypatch):
    monkeypatch.setattr("deltareg.registry.lineage.service.MAX_NODES", 2)
    root = registry.push("acme/wide", registry.lora_files(0))
    for seed in range(1, 4):
        registry.push("acme/wide", registry.lora_files(seed), parent=root["digest"])
    graph = lineage(registry, "acme/wide:1")
    assert refs(graph, graph["descendants"]) == ["acme/wide:2", "acme/wide:3"]
    assert graph["truncated"] is True
    assert len(graph["nodes"]) == 3


def test_descendants_take_one_statement_per_level_not_one_per_version(registry):
    root = registry.push("acme/tree", registry.lora_files(0))
    for seed in range(1, 4):
        child = registry.push("acme/tree", registry.lora_files(seed), parent=root["digest"])
        registry.push("acme/tree", registry.lora_files(seed + 10), parent=child["digest"])
    statements: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "parent_digest IN" in statement:
            statements.append(statement)

    engine = registry.client.app.state.database.engine
    event.listen(engine, "before_cursor_execute", record)
    try:
        graph = lineage(registry, "acme/tree:1")
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert len(graph["descendants"]) == 6
    # Level 1 (3 versions), level 2 (3 versions), level 3 (none): 3 statements, whatever the width.
    assert len(statements) == 3


def test_a_parent_cycle_planted_in_the_database_does_not_make_the_walk_loop(registry):
    first = registry.push("acme/loop", registry.lora_files(0))
    second = registry.push("acme/loop", registry.lora_files(1), parent=first["digest"])
    third = registry.push("acme/loop", registry.lora_files(2))
    # No push can make these (a digest covers its parent); only a hand-edited database can.
    sql(
        registry,
        "UPDATE versions SET parent_digest = :p WHERE digest = :d",
        p=second["digest"],
        d=first["digest"],
    )
    sql(registry, "UPDATE versions SET parent_digest = :d WHERE digest = :d", d=third["digest"])

    graph = lineage(registry, "acme/loop:2")
    assert refs(graph, graph["ancestors"]) == ["acme/loop:1"]
    assert graph["descendants"] == []  # loop:1 is already in the graph
    assert len(graph["nodes"]) == 2
    selfish = lineage(registry, "acme/loop:3")
    assert (selfish["ancestors"], selfish["descendants"], len(selfish["nodes"])) == ([], [], 1)


# ---- refusals


@pytest.mark.parametrize(
    ("ref", "status", "error"),
    [
        ("acme/nothing", 404, "repo_not_found"),
        ("acme/base:9", 404, "version_not_found"),
        ("acme/base@nope", 404, "alias_not_found"),
        ("acme/base@sha256:" + "0" * 64, 404, "version_not_found"),
        ("not a ref", 400, "invalid_name"),
        ("acme/base:0", 400, "invalid_reference"),
    ],
)
def test_an_unknown_or_malformed_reference_is_refused(registry, family, ref, status, error):
    response = registry.client.get("/api/v1/lineage", params={"ref": ref})
    assert response.status_code == status, response.text
    assert response.json()["error"] == error


def test_a_depth_out_of_range_is_refused(registry, family):
    for depth in (-1, 65):
        response = registry.client.get("/api/v1/lineage", params={"ref": "acme/base", "depth": depth})
        assert response.status_code == 400, response.text


def _refused_push(registry: Any, files: dict[str, bytes], **options: Any) -> dict[str, Any]:
    before = registry.count_rows()
    registry.upload_all(files)
    response = registry.create_version("acme/new", registry.manifest_for(files, **options))
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_manifest"
    after = registry.count_rows()
    assert {t: after[t] for t in ("repos", "versions", "version_files", "evals")} == {
        t: before[t] for t in ("repos", "versions", "version_files", "evals")
    }
    body: dict[str, Any] = response.json()
    return body


def test_a_parent_on_another_base_is_refused_and_nothing_is_recorded(registry, family):
    body = _refused_push(
        registry, registry.lora_files(20), parent=family["base:1"]["digest"], fingerprint=OTHER_BASE
    )
    assert family["base:1"]["digest"] in body["detail"] and OTHER_BASE in body["detail"]
    audit = registry.client.get("/api/v1/audit", params={"repo": "acme/new"}).json()["entries"]
    assert [entry["action"] for entry in audit] == ["push.refused"]


def test_a_self_parent_is_refused_and_nothing_is_recorded(registry, family):
    files = registry.lora_files(21)
    # The closest a manifest can come to naming itself: the digest it has without a parent. With the
    # parent set, its digest changes, so the parent names a version that does not exist.
    own = Manifest.parse(registry.manifest_for(files)).digest
    body = _refused_push(registry, files, parent=own)
    assert own in body["detail"] and "not a version" in body["detail"]


def test_a_parent_cycle_cannot_be_made_through_the_api(registry, family):
    # Re-pushing base:1's content with child:2 as parent is a new manifest (the digest covers the
    # parent), so it becomes a new version below child:2, never a cycle.
    again = registry.push("acme/base", registry.lora_files(1), parent=family["child:2"]["digest"])
    assert again["digest"] != family["base:1"]["digest"]
    graph = lineage(registry, f"acme/base:{again['number']}")
    chain = refs(graph, graph["ancestors"])
    assert chain == ["acme/child:2", "acme/child:1", "acme/base:2", "acme/base:1"]
    assert len(set(graph["ancestors"])) == len(graph["ancestors"])


def test_a_malformed_parent_digest_is_refused(registry, family):
    files = registry.lora_files(22)
    registry.upload_all(files)
    manifest = registry.manifest_for(files)
    manifest["parent"] = "sha256:not-hex"
    response = registry.create_version("acme/new", manifest)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_manifest"
    assert "parent" in response.json()["detail"]


@pytest.mark.parametrize(
    "metadata, named",
    [
        ({"datasets": "tickets"}, '"datasets" must be a list'),
        ({"datasets": [{"name": ""}]}, "invalid dataset name"),
        ({"datasets": [{"name": "t", "revision": "r", "rows": 3}]}, "only name and revision"),
        ({"code_commit": "has spaces in it"}, "invalid code commit"),
        ({"code_commit": 12}, '"code_commit" must be a string'),
        ({"hyperparameters": ["lr", 0.1]}, '"hyperparameters" must be an object'),
        ({"hyperparameters": {"lr": "x" * 1025}}, "hyperparameter lr: the value is longer"),
        ({"hyperparameters": {"steps": True, "lr": None}}, "hyperparameter lr: None is not a string"),
    ],
)
def test_malformed_training_metadata_sent_by_any_client_is_refused(registry, family, metadata, named):
    """The registry checks the well-known metadata keys itself: lineage and search read them."""
    body = _refused_push(registry, registry.lora_files(23), metadata=metadata)
    assert named in body["detail"], body


def test_a_number_without_a_canonical_form_is_an_invalid_manifest(registry, family):
    files = registry.lora_files(24)
    registry.upload_all(files)
    manifest = registry.manifest_for(files)
    manifest["metadata"] = {"steps": 2**60}  # beyond 2**53: RFC 8785 has no canonical form for it
    response = registry.create_version("acme/new", manifest)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_manifest"
    assert "canonical JSON" in response.json()["detail"]


def test_a_bare_repo_is_its_newest_version_that_is_not_yanked(registry):
    first = registry.push("acme/solo", registry.lora_files(30))
    second = registry.push("acme/solo", registry.lora_files(31))
    yanked = registry.client.post("/api/v1/repos/acme/solo/versions/2/yank", json={"reason": "bad data"})
    assert yanked.status_code == 200, yanked.text
    assert lineage(registry, "acme/solo")["root"] == first["digest"]
    assert lineage(registry, "acme/solo:2")["root"] == second["digest"]  # exact: still readable
