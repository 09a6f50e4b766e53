"""Pictures drawn on the server as inline SVG: one chart per eval metric, and the lineage graph.

No JavaScript and no fonts or files to fetch: the page carries the picture. Every text that comes from a
user (metric names, repo names, aliases, base names) is escaped here, since the result is marked safe
for the templates.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from markupsafe import Markup, escape

from deltareg.registry.lineage.schemas import LineageGraph, LineageNode

# ---- charts -------------------------------------------------------------------------------------

CHART_WIDTH, CHART_HEIGHT = 420, 220
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 56, 16, 28, 40
Y_TICKS = 5
MAX_X_LABELS = 12


@dataclass(frozen=True)
class Point:
    version: int
    value: float


def metric_chart(metric: str, points: Sequence[Point]) -> Markup:
    """A line and dot chart of ``metric`` across versions (x: version number, y: its newest value)."""
    ordered = sorted(points, key=lambda p: p.version)
    if not ordered:
        return Markup("")
    low, high = _value_range([p.value for p in ordered])
    first, last = ordered[0].version, ordered[-1].version
    plot_w = CHART_WIDTH - MARGIN_LEFT - MARGIN_RIGHT
    plot_h = CHART_HEIGHT - MARGIN_TOP - MARGIN_BOTTOM

    def x_of(version: int) -> float:
        if first == last:
            return MARGIN_LEFT + plot_w / 2
        return MARGIN_LEFT + (version - first) / (last - first) * plot_w

    def y_of(value: float) -> float:
        return MARGIN_TOP + (high - value) / (high - low) * plot_h

    parts = [
        f'<svg class="chart" role="img" data-metric="{escape(metric)}" width="{CHART_WIDTH}" '
        f'height="{CHART_HEIGHT}" viewBox="0 0 {CHART_WIDTH} {CHART_HEIGHT}" '
        f'xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(metric)} across versions</title>",
        f'<text class="chart-title" x="{MARGIN_LEFT}" y="16">{escape(metric)}</text>',
        *_axes(plot_w, plot_h),
        *_y_ticks(low, high, y_of, plot_w),
        *_x_ticks([p.version for p in ordered], x_of, MARGIN_TOP + plot_h),
        f'<text class="axis-label" x="{MARGIN_LEFT + plot_w / 2:.1f}" y="{CHART_HEIGHT - 4}" '
        'text-anchor="middle">version</text>',
    ]
    coords = " ".join(f"{x_of(p.version):.1f},{y_of(p.value):.1f}" for p in ordered)
    parts.append(f'<polyline class="line" fill="none" points="{coords}"/>')
    for p in ordered:
        parts.append(
            f'<circle class="point" cx="{x_of(p.version):.1f}" cy="{y_of(p.value):.1f}" r="4">'
            f"<title>version {p.version}: {escape(metric)} = {_label(p.value)}</title></circle>"
        )
    parts.append("</svg>")
    return Markup("".join(parts))


def _value_range(values: list[float]) -> tuple[float, float]:
    """The y range: the values' range with a little room, never empty (a flat line sits mid-height)."""
    low, high = min(values), max(values)
    if math.isclose(low, high, rel_tol=1e-12, abs_tol=1e-300):
        pad = abs(low) * 0.1 or 1.0
        return low - pad, high + pad
    pad = (high - low) * 0.08
    return low - pad, high + pad


def _axes(plot_w: float, plot_h: float) -> list[str]:
    bottom = MARGIN_TOP + plot_h
    return [
        f'<line class="axis" x1="{MARGIN_LEFT}" y1="{MARGIN_TOP}" x2="{MARGIN_LEFT}" y2="{bottom}"/>',
        f'<line class="axis" x1="{MARGIN_LEFT}" y1="{bottom}" x2="{MARGIN_LEFT + plot_w}" y2="{bottom}"/>',
    ]


def _y_ticks(low: float, high: float, y_of: Callable[[float], float], plot_w: float) -> list[str]:
    parts = []
    for value, label in nice_ticks(low, high):
        y = y_of(value)
        parts.append(
            f'<line class="grid" x1="{MARGIN_LEFT}" y1="{y:.1f}" x2="{MARGIN_LEFT + plot_w}" y2="{y:.1f}"/>'
        )
        parts.append(
            f'<text class="tick y-tick" x="{MARGIN_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">'
            f"{label}</text>"
        )
    return parts


def nice_ticks(low: float, high: float, about: int = Y_TICKS) -> list[tuple[float, str]]:
    """About ``about`` round values in [low, high] with their labels (steps of 1, 2, 2.5 or 5 times a
    power of ten, labelled to the step's precision), so an axis reads 0.6, 0.7, 0.8 rather than 0.58,
    0.6525, 0.725."""
    rough = (high - low) / max(about - 1, 1)
    power = 10.0 ** math.floor(math.log10(rough))
    multiple = min((1, 2, 2.5, 5, 10), key=lambda m: abs(m * power - rough))
    step = multiple * power
    first = math.ceil(low / step)
    count = math.floor(high / step + 1e-9) - first + 1
    decimals = max(0, -math.floor(math.log10(step) + 1e-12)) + (1 if multiple == 2.5 else 0)
    values = [(first + i) * step for i in range(count)]
    if max(abs(low), abs(high)) >= 1e5:
        return [(value, f"{value:.3g}") for value in values]
    return [(value, f"{value:.{decimals}f}") for value in values]


def _x_ticks(versions: list[int], x_of: Callable[[int], float], bottom: float) -> list[str]:
    step = max(1, math.ceil(len(versions) / MAX_X_LABELS))
    shown = versions[::step]
    if versions[-1] not in shown:
        shown.append(versions[-1])
    parts = []
    for version in shown:
        x = x_of(version)
        parts.append(f'<line class="axis" x1="{x:.1f}" y1="{bottom}" x2="{x:.1f}" y2="{bottom + 4}"/>')
        parts.append(
            f'<text class="tick x-tick" x="{x:.1f}" y="{bottom + 16}" text-anchor="middle">{version}</text>'
        )
    return parts


def _label(value: float) -> str:
    return f"{value:.4g}"


# ---- lineage graph ------------------------------------------------------------------------------

NODE_W, NODE_H = 170, 46
GAP_X, GAP_Y = 24, 44
PAD = 16
TAG_H = 16


@dataclass(frozen=True)
class Placed:
    node: LineageNode
    layer: int  # 0: the root; negative: ancestors (above); positive: descendants (below)
    x: float = 0.0
    y: float = 0.0


def lineage_picture(graph: LineageGraph, link_of: Callable[[LineageNode], str]) -> Markup:
    """The lineage as layers: the base model on top, ancestors above the version, descendants below.

    ``link_of(node)`` gives each node's page address. Alias tags sit under their node; a yanked version is
    drawn dashed and labelled.
    """
    layers = _layers(graph)
    widest = max(len(nodes) for nodes in layers.values())
    width = max(PAD * 2 + widest * (NODE_W + GAP_X) - GAP_X, NODE_W + 2 * PAD)
    ordered = sorted(layers)
    top = PAD + NODE_H + GAP_Y  # the base model's row comes first
    placed: dict[str, Placed] = {}
    for row, layer in enumerate(ordered):
        nodes = layers[layer]
        row_w = len(nodes) * (NODE_W + GAP_X) - GAP_X
        left = (width - row_w) / 2
        for i, node in enumerate(nodes):
            x, y = left + i * (NODE_W + GAP_X), top + row * (NODE_H + GAP_Y)
            placed[node.digest] = Placed(node, layer, x, y)
    height = top + len(ordered) * (NODE_H + GAP_Y) - GAP_Y + TAG_H + PAD
    parts = [
        f'<svg class="lineage" role="img" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" xmlns="http://www.w3.org/2000/svg">',
        "<title>lineage</title>",
    ]
    parts += _base_node(graph, placed, width)
    parts += _edges(graph, placed)
    for item in placed.values():
        parts += _node(item, item.node.digest == graph.root, link_of(item.node))
    parts.append("</svg>")
    return Markup("".join(parts))


def _layers(graph: LineageGraph) -> dict[int, list[LineageNode]]:
    """Each node's layer: ancestors by distance upward, descendants by breadth-first depth."""
    by_digest = {node.digest: node for node in graph.nodes}
    layer = {graph.root: 0}
    for distance, digest in enumerate(graph.ancestors, start=1):
        layer[digest] = -distance
    children: dict[str, list[str]] = {}
    for edge in graph.edges:
        children.setdefault(edge.parent, []).append(edge.child)
    frontier = [graph.root]
    while frontier:
        following = []
        for parent in frontier:
            for child in children.get(parent, []):
                if child not in layer and child in by_digest:
                    layer[child] = layer[parent] + 1
                    following.append(child)
        frontier = following
    layers: dict[int, list[LineageNode]] = {}
    for node in graph.nodes:
        if node.digest in layer:
            layers.setdefault(layer[node.digest], []).append(node)
    return layers


def _base_node(graph: LineageGraph, placed: dict[str, Placed], width: float) -> list[str]:
    """The base model every delta of the chain applies to, above the oldest ancestor."""
    oldest = graph.ancestors[-1] if graph.ancestors else graph.root
    node = placed[oldest].node
    label = node.base_name or "base model"
    if node.base_revision:
        label += f" @ {node.base_revision}"
    x, y = (width - NODE_W) / 2, PAD
    target = placed[oldest]
    return [
        f'<g class="base-node"><rect x="{x:.1f}" y="{y}" width="{NODE_W}" height="{NODE_H}" rx="18"/>',
        f'<text x="{x + NODE_W / 2:.1f}" y="{y + 19}" text-anchor="middle">{escape(_cut(label, 24))}</text>',
        f'<text class="small" x="{x + NODE_W / 2:.1f}" y="{y + 35}" text-anchor="middle">'
        f"{escape(_cut(node.base_fingerprint, 24))}</text>",
        f"<title>{escape(label)} {escape(node.base_fingerprint)}</title></g>",
        _edge_line(x + NODE_W / 2, y + NODE_H, target.x + NODE_W / 2, target.y, "base-edge"),
    ]


def _edges(graph: LineageGraph, placed: dict[str, Placed]) -> list[str]:
    lines = []
    for edge in graph.edges:
        parent, child = placed.get(edge.parent), placed.get(edge.child)
        if parent is None or child is None:
            continue
        lines.append(
            _edge_line(parent.x + NODE_W / 2, parent.y + NODE_H, child.x + NODE_W / 2, child.y, "edge")
        )
    return lines


def _edge_line(x1: float, y1: float, x2: float, y2: float, kind: str) -> str:
    return f'<line class="{kind}" x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}"/>'


def _node(item: Placed, is_root: bool, link: str) -> list[str]:
    node = item.node
    kinds = ["node"] + (["root"] if is_root else []) + (["yanked"] if node.yanked else [])
    role = "ancestor" if item.layer < 0 else "descendant" if item.layer > 0 else "version"
    title = f"{node.repo}:{node.number}"
    second = f"{node.kind} · {role}" + (" · yanked" if node.yanked else "")
    x, y = item.x, item.y
    parts = [
        f'<a href="{escape(link)}"><g class="{" ".join(kinds)}" data-role="{role}" '
        f'data-ref="{escape(title)}">',
        f'<rect x="{x:.1f}" y="{y:.1f}" width="{NODE_W}" height="{NODE_H}" rx="6"/>',
        f'<text x="{x + NODE_W / 2:.1f}" y="{y + 19:.1f}" text-anchor="middle">'
        f"{escape(_cut(title, 24))}</text>",
        f'<text class="small" x="{x + NODE_W / 2:.1f}" y="{y + 35:.1f}" text-anchor="middle">'
        f"{escape(second)}</text>",
        f"<title>{escape(title)} {escape(node.digest)}"
        + (f" (yanked: {escape(node.yanked)})" if node.yanked else "")
        + "</title></g></a>",
    ]
    parts += _alias_tags(node.aliases, x, y + NODE_H + 3)
    return parts


def _alias_tags(aliases: Iterable[str], x: float, y: float) -> list[str]:
    parts = []
    left = x
    for full in aliases:
        name = full.rsplit("@", 1)[-1]
        width = 12 + 6 * len(_cut(name, 16))
        parts.append(
            f'<g class="alias-tag" data-alias="{escape(full)}"><rect x="{left:.1f}" y="{y:.1f}" '
            f'width="{width}" height="{TAG_H - 2}" rx="7"/><text x="{left + 5:.1f}" y="{y + 11:.1f}">'
            f"{escape(_cut(name, 16))}</text><title>{escape(full)}</title></g>"
        )
        left += width + 4
    return parts


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
