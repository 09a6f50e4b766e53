"""Write BENCHMARKS.md from the benchmarks' results (bench/results/*.json) and notes (bench/notes/*.md).

Each results file is one benchmark's JSON (see bench/_report_common.py): tables, targets, plots, raw
samples, the machine and the command. Each note is hand-written prose about that benchmark (what is
measured and why, findings, earlier figures). A benchmark gets a section when it has either; the section
shows the tables, the targets with ✔/✘, the plots (PNG files drawn here with matplotlib, headless), the
note and the command. ``notes/intro.md`` goes first.

    .venv/bin/python bench/report.py                # what `make bench-report` runs
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
INTRO = "intro"
# The order of issue 8's rows; any other benchmark follows, by name.
ORDER = ["fingerprint", "apply", "apply_files", "registry_transfer", "cache", "scale", "metadata"]
# Section titles for benchmarks that have a note but no results yet.
TITLES = {
    "fingerprint": "Base fingerprint vs `openssl dgst -sha256`",
    "apply": "In-memory apply vs `peft` `merge_and_unload`",
    "apply_files": "File to file apply vs the peft route",
    "registry_transfer": "Transfers through the registry on S3 vs raw boto3",
    "cache": "Cache hit: `pull` of a cached version vs a fresh pull",
    "scale": "Resolve, list and search at 100k versions vs 1k on PostgreSQL",
    "metadata": "Metadata API vs MLflow model registry",
}
MET = {True: "✔", False: "✘", None: "—"}


def load_results(folder: Path) -> dict[str, dict[str, Any]]:
    """Every results file, by benchmark id (the file's stem)."""
    results = {}
    for path in sorted(folder.glob("*.json")):
        try:
            results[path.stem] = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise SystemExit(f"{path}: not valid JSON ({error})") from None
    return results


def load_notes(folder: Path) -> dict[str, str]:
    return {path.stem: path.read_text().strip() for path in sorted(folder.glob("*.md"))}


def number(value: Any) -> str:
    """A table cell: integers with separators, floats to a precision that fits their size."""
    if isinstance(value, bool) or value is None:
        return MET[value] if isinstance(value, bool) else "—"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        size = abs(value)
        if size >= 1000:
            return f"{value:,.0f}"
        if size >= 100:
            return f"{value:.1f}"
        if size >= 0.1 or size == 0:
            return f"{value:.2f}"
        return f"{value:.2g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(columns: list[str], rows: Iterable[list[Any]]) -> list[str]:
    """Text columns left-aligned, numeric ones right-aligned (judged by the first row)."""
    rows = list(rows)
    first = rows[0] if rows else []
    numeric = [i < len(first) and isinstance(first[i], int | float) for i in range(len(columns))]
    lines = ["| " + " | ".join(number(c) for c in columns) + " |"]
    lines.append("|" + "|".join("---:" if n else "---" for n in numeric) + "|")
    lines += ["| " + " | ".join(number(cell) for cell in row) + " |" for row in rows]
    return lines


def targets_table(targets: list[dict[str, Any]]) -> list[str]:
    rows = [
        [
            t["name"],
            _with_unit(t.get("ours"), t.get("unit")),
            _with_unit(t.get("peer"), t.get("unit")),
            "—" if t.get("ratio") is None else f"**{number(t['ratio'])}**",
            t.get("target") or "none set",
            MET[t.get("met")],
        ]
        for t in targets
    ]
    return markdown_table(["figure", "ours", "peer", "ratio", "target", "met"], rows)


def _with_unit(value: Any, unit: str | None) -> str:
    return "—" if value is None else f"{number(value)} {unit or ''}".strip()


def machine_line(machine: dict[str, Any]) -> str:
    versions = ", ".join(f"{name} {version}" for name, version in machine.get("versions", {}).items())
    parts = [
        f"{machine.get('cpus', '?')} CPUs ({machine.get('cpu_model', 'unknown CPU')})",
        f"{machine.get('ram_gib', '?')} GiB RAM",
        f"Linux {machine['kernel']}" if machine.get("kernel") else None,
        f"Python {machine.get('python', '?')}",
        versions or None,
    ]
    return ", ".join(p for p in parts if p)


def draw_plots(result: dict[str, Any], plots_dir: Path) -> list[Path]:
    """Grouped bar charts of the result's plot series, as PNG files; their paths."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on a benchmark machine
    import matplotlib.pyplot as plt

    plots_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for plot in result.get("plots", []):
        labels, series = plot["labels"], plot["series"]
        figure, axes = plt.subplots(figsize=(max(5.0, 1.6 * len(labels) + 2), 3.6))
        width = 0.8 / max(1, len(series))
        for index, (name, values) in enumerate(series.items()):
            positions = [i + (index - (len(series) - 1) / 2) * width for i in range(len(labels))]
            bars = axes.bar(positions, values, width, label=name)
            axes.bar_label(bars, labels=[number(float(v)) for v in values], fontsize=7)
        axes.set_xticks(range(len(labels)), [_wrapped(label) for label in labels], fontsize=7)
        axes.set_ylabel(plot.get("ylabel", ""))
        axes.set_title(result.get("title", plot["name"]).replace("`", ""), fontsize=9)
        if len(series) > 1:
            axes.legend(fontsize=7)
        figure.tight_layout()
        path = plots_dir / f"{plot['name']}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written


def _wrapped(label: str, width: int = 22) -> str:
    words, lines, line = label.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join([*lines, line])


def section(name: str, result: dict[str, Any] | None, note: str | None, plots: list[Path], out: Path) -> str:
    title = (result or {}).get("title") or TITLES.get(name, name)
    issue = (result or {}).get("issue")
    lines = [f"## {title}" + (f" (issue #{issue})" if issue else ""), ""]
    if result is None:
        lines += [f"_No results yet: `make bench` writes bench/results/{name}.json._", ""]
    else:
        machine = result.get("machine", {})
        lines += [
            f"Measured {result.get('measured_at', '?')}, medians of {result.get('runs', '?')} runs, "
            f"load average before {machine.get('load_before', '?')}; {machine_line(machine)}.",
            "",
        ]
        if result.get("targets"):
            lines += ["**Targets**", "", *targets_table(result["targets"]), ""]
        for table in result.get("tables", []):
            lines += [f"**{table['caption']}**", "", *markdown_table(table["columns"], table["rows"]), ""]
        for path in plots:
            relative = Path(os.path.relpath(path, out.parent)).as_posix()
            lines += [f"![{path.stem}]({relative})", ""]
        samples = result.get("samples", {})
        if samples:
            lines += ["<details><summary>Raw values per run</summary>", ""]
            lines += markdown_table(
                ["series", "runs"], [[k, " ".join(number(v) for v in vs)] for k, vs in samples.items()]
            )
            lines += ["", "</details>", ""]
    if note:
        lines += [note, ""]
    if result is not None:
        lines += ["```bash", result.get("command", ""), "```", ""]
    return "\n".join(lines)


def render(results_dir: Path, notes_dir: Path, out: Path, plots_dir: Path | None) -> str:
    """BENCHMARKS.md's text (and the PNG plots in ``plots_dir``, unless None)."""
    results, notes = load_results(results_dir), load_notes(notes_dir)
    names = [n for n in ORDER if n in results or n in notes]
    names += sorted((set(results) | set(notes)) - set(ORDER) - {INTRO})
    parts = ["# Benchmarks", ""]
    if INTRO in notes:
        parts += [notes[INTRO], ""]
    if results:
        newest = max(results.values(), key=lambda r: r.get("measured_at", ""))
        parts += [f"Machine of the newest results: {machine_line(newest.get('machine', {}))}.", ""]
    parts += [
        "Regenerate this file from the results with `make bench-report`; rerun every benchmark at its full "
        "size with `make bench` (on an otherwise idle machine).",
        "",
    ]
    for name in names:
        result = results.get(name)
        plots = draw_plots(result, plots_dir) if result is not None and plots_dir is not None else []
        parts.append(section(name, result, notes.get(name), plots, out))
    return "\n".join(parts).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--results", type=Path, default=HERE / "results", help="folder of <name>.json")
    parser.add_argument("--notes", type=Path, default=HERE / "notes", help="folder of <name>.md")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--plots", type=Path, default=HERE / "plots", help="folder for the PNG plots")
    parser.add_argument("--no-plots", action="store_true", help="write no PNG files (no matplotlib needed)")
    args = parser.parse_args(argv)
    text = render(args.results, args.notes, args.out, None if args.no_plots else args.plots)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
