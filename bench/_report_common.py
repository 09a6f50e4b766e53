"""Shared by the benchmark scripts: the machine's description and the results JSON that bench/report.py
turns into BENCHMARKS.md (schema: one object per benchmark, see ``Result``).

A script creates its ``Result`` at the start (so that ``load_before`` is the load before it ran), adds
tables, targets, plots and raw samples as it goes, and writes it when ``--json-out`` was given.
"""

from __future__ import annotations

import argparse
import json
import operator
import os
import platform
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

ISSUE = 8
REPO_ROOT = Path(__file__).resolve().parent.parent

# "<= 0.6", ">= 20", "== 0": the comparison a target's ratio must satisfy.
_TARGET = re.compile(r"^\s*(<=|>=|==|<|>)\s*(-?[0-9.]+(?:e-?[0-9]+)?)\s*$")
_COMPARE: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "==": operator.eq,
    "<": operator.lt,
    ">": operator.gt,
}


def add_json_out_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json-out",
        type=Path,
        default=None,
        metavar="PATH",
        help="also write the results as JSON for bench/report.py (e.g. bench/results/<name>.json)",
    )


def target_met(value: float, target: str) -> bool:
    """Whether ``value`` satisfies a target such as ``<= 0.6``; ValueError for a malformed target."""
    match = _TARGET.match(target)
    if match is None:
        raise ValueError(f"target {target!r} is not OP NUMBER with OP one of <=, >=, ==, <, >")
    op, number = match.groups()
    return _COMPARE[op](value, float(number))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return 0.0


def _package_versions(packages: Sequence[str]) -> dict[str, str]:
    versions = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _tool_version(command: list[str]) -> str | None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    # "OpenSSL 3.0.19 27 Jan 2026 (Library: ...)": the first line, without the parenthesised repetition
    return (done.stdout or done.stderr).strip().splitlines()[0].split(" (")[0]


def describe_machine(
    packages: Sequence[str] = (), tools: dict[str, list[str]] | None = None
) -> dict[str, Any]:
    """What the figures depend on: cores, CPU, RAM, kernel, Python, the load right now and the versions of
    the packages (and command-line tools, e.g. openssl) the benchmark compares."""
    versions = _package_versions(["deltareg", *packages])
    for name, command in (tools or {}).items():
        versions[name] = _tool_version(command) or "not found"
    return {
        "cpus": os.cpu_count() or 1,
        "cpu_model": _cpu_model(),
        "ram_gib": _ram_gib(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_before": round(os.getloadavg()[0], 2),
        "versions": versions,
    }


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that reproduces this run, as typed from the repository root."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0]).resolve()
    try:
        shown_script = str(script.relative_to(REPO_ROOT))
    except ValueError:
        shown_script = str(script)
    python = Path(os.path.abspath(sys.executable))  # normalized, not resolved: the venv's link counts
    try:
        shown_python = str(python.relative_to(REPO_ROOT))
    except ValueError:
        shown_python = ".venv/bin/python" if python.parent.parent.name == ".venv" else "python"
    return shlex.join([shown_python, shown_script, *argv[1:]])


def _rounded(value: Any) -> Any:
    """Floats to 4 significant digits (more is noise here) in nested lists and dicts."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, list | tuple):
        return [_rounded(v) for v in value]
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


@dataclass
class Result:
    """One benchmark's results: ``benchmark`` is its short id, the stem of bench/results/<id>.json."""

    benchmark: str
    title: str
    runs: int
    machine: dict[str, Any]
    command: str = field(default_factory=command_line)
    issue: int = ISSUE
    measured_at: str = field(
        default_factory=lambda: datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    )
    tables: list[dict[str, Any]] = field(default_factory=list)
    targets: list[dict[str, Any]] = field(default_factory=list)
    plots: list[dict[str, Any]] = field(default_factory=list)
    samples: dict[str, list[float]] = field(default_factory=dict)

    def table(self, caption: str, columns: list[str], rows: list[list[Any]]) -> None:
        self.tables.append({"caption": caption, "columns": columns, "rows": rows})

    def target(
        self,
        name: str,
        *,
        ours: float,
        peer: float | None,
        target: str | None,
        unit: str,
        ratio: float | None = None,
    ) -> None:
        """A figure and its target. ``ratio`` defaults to ours / peer; the target (``<= 0.6``) is checked
        against the ratio when there is one, else against ``ours``. No target: reported, not judged."""
        if ratio is None and peer:
            ratio = ours / peer
        judged = ratio if ratio is not None else ours
        met = None if target is None else target_met(judged, target)
        self.targets.append(
            {
                "name": name,
                "ours": ours,
                "peer": peer,
                "ratio": ratio,
                "target": target,
                "met": met,
                "unit": unit,
            }
        )

    def plot(self, name: str, labels: list[str], series: dict[str, list[float]], ylabel: str) -> None:
        """A grouped bar chart: one group per label, one bar per series."""
        self.plots.append({"name": name, "kind": "bar", "ylabel": ylabel, "labels": labels, "series": series})

    def sample(self, name: str, values: Sequence[float]) -> None:
        self.samples[name] = list(values)

    def write(self, path: Path | None) -> None:
        """Write the JSON to ``path`` (nothing when None: --json-out was not given)."""
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_rounded(asdict(self)), indent=2, ensure_ascii=False) + "\n")
        print(f"results written to {path}")
