"""bench/report.py renders benchmark results (written by bench/_report_common.py) into BENCHMARKS.md.

No benchmark runs here: the results are made up and written through the same ``Result`` class the
benchmark scripts use, so the JSON they write and the JSON the report reads cannot drift apart.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
COMMAND = ".venv/bin/python bench/bench_fingerprint.py --runs 5 --json-out bench/results/fingerprint.json"


def load_bench_module(name: str) -> ModuleType:
    """A module of bench/ (a folder of scripts, not a package), imported from its file."""
    qualified = f"bench_scripts.{name}"
    if qualified in sys.modules:
        return sys.modules[qualified]
    spec = importlib.util.spec_from_file_location(qualified, BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[qualified] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


common = load_bench_module("_report_common")
report = load_bench_module("report")


def fingerprint_result(ratio_seconds: float) -> object:
    """A fingerprint result whose fingerprint takes ``ratio_seconds`` for every 1 s of openssl."""
    machine = {"cpus": 2, "cpu_model": "Test CPU", "ram_gib": 8.0, "python": "3.11.7", "load_before": 0.25,
               "versions": {"deltareg": "0.1.0", "openssl": "OpenSSL 3.0.19"}}  # fmt: skip
    result = common.Result(
        benchmark="fingerprint", title="Base fingerprint vs openssl", runs=5, machine=machine, command=COMMAND
    )
    result.table(
        "4 shards, 2.00 GiB, warm page cache",
        ["tool", "median s", "x openssl"],
        [["openssl dgst -sha256", 1.0, 1.0], ["fingerprint_path", ratio_seconds, ratio_seconds]],
    )
    result.target("fingerprint / openssl", ours=ratio_seconds, peer=1.0, target="<= 0.6", unit="s")
    result.target("fraction of the SHA-256 limit", ours=ratio_seconds, peer=0.4, ratio=0.81, target=None,
                  unit="s")  # fmt: skip
    result.plot("fingerprint", ["openssl", "fingerprint"], {"median s": [1.0, ratio_seconds]}, "seconds")
    result.sample("fingerprint_path wall s", [0.5, 0.51, 0.52, 0.49, 0.5])
    return result


def render(tmp_path: Path, results: list[object], notes: dict[str, str], plots: bool = False) -> str:
    results_dir, notes_dir = tmp_path / "results", tmp_path / "notes"
    notes_dir.mkdir()
    for result in results:
        result.write(results_dir / f"{result.benchmark}.json")  # type: ignore[attr-defined]
    for name, text in notes.items():
        (notes_dir / f"{name}.md").write_text(text)
    out = tmp_path / "BENCHMARKS.md"
    text: str = report.render(results_dir, notes_dir, out, tmp_path / "plots" if plots else None)
    return text


def test_a_met_target_is_rendered_with_its_table_command_and_note(tmp_path: Path) -> None:
    text = render(tmp_path, [fingerprint_result(0.51)], {"fingerprint": "The rest is page-cache reads."})

    assert "## Base fingerprint vs openssl (issue #8)" in text
    assert "**4 shards, 2.00 GiB, warm page cache**" in text
    assert "| tool | median s | x openssl |" in text
    assert "| fingerprint_path | 0.51 | 0.51 |" in text
    assert "| fingerprint / openssl | 0.51 s | 1.00 s | **0.51** | <= 0.6 | ✔ |" in text
    assert "| fraction of the SHA-256 limit | 0.51 s | 0.40 s | **0.81** | none set | — |" in text
    assert f"```bash\n{COMMAND}\n```" in text
    assert "The rest is page-cache reads." in text
    assert "2 CPUs (Test CPU), 8.0 GiB RAM" in text
    assert "| fingerprint_path wall s | 0.50 0.51 0.52 0.49 0.50 |" in text


def test_a_missed_target_is_marked_as_missed(tmp_path: Path) -> None:
    text = render(tmp_path, [fingerprint_result(0.75)], {})

    assert "| fingerprint / openssl | 0.75 s | 1.00 s | **0.75** | <= 0.6 | ✘ |" in text
    assert "✔" not in text


def test_sections_follow_the_issue_order_and_notes_without_results_say_so(tmp_path: Path) -> None:
    notes = {"intro": "Every figure is measured side by side.", "scale": "Earlier: ratio 1.11."}
    text = render(tmp_path, [fingerprint_result(0.5)], notes)

    assert text.index("Every figure is measured side by side.") < text.index("## Base fingerprint")
    assert text.index("## Base fingerprint") < text.index("## Resolve, list and search")
    assert "_No results yet: `make bench` writes bench/results/scale.json._" in text
    assert "Earlier: ratio 1.11." in text


def test_the_json_written_follows_the_shared_schema(tmp_path: Path) -> None:
    result = fingerprint_result(0.5)
    path = tmp_path / "fingerprint.json"
    result.write(path)  # type: ignore[attr-defined]

    written = json.loads(path.read_text())
    keys = {"benchmark", "title", "issue", "command", "measured_at", "machine", "runs", "tables", "targets",
            "plots", "samples"}  # fmt: skip
    assert keys <= written.keys()
    assert written["targets"][0] == {
        "name": "fingerprint / openssl", "ours": 0.5, "peer": 1.0, "ratio": 0.5, "target": "<= 0.6",
        "met": True, "unit": "s",
    }  # fmt: skip
    assert written["measured_at"].endswith("Z")


def test_a_malformed_target_is_refused() -> None:
    with pytest.raises(ValueError, match="OP NUMBER"):
        common.target_met(0.5, "at most 0.6")
    assert common.target_met(0, "== 0")
    assert not common.target_met(0.67, "> 0.67")


def test_plots_are_drawn_as_png_and_linked_relative_to_the_report(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")  # in the dev and bench extras; the report without plots needs none
    text = render(tmp_path, [fingerprint_result(0.5)], {}, plots=True)

    png = tmp_path / "plots" / "fingerprint.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![fingerprint](plots/fingerprint.png)" in text


def test_the_command_line_writes_the_file(tmp_path: Path) -> None:
    (tmp_path / "results").mkdir()
    (tmp_path / "notes").mkdir()
    fingerprint_result(0.5).write(tmp_path / "results" / "fingerprint.json")  # type: ignore[attr-defined]
    out = tmp_path / "out.md"

    args = ["--results", str(tmp_path / "results"), "--notes", str(tmp_path / "notes"), "--out", str(out)]
    assert report.main([*args, "--no-plots"]) == 0
    assert "| fingerprint / openssl |" in out.read_text()
