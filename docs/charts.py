"""Draw the benchmark charts of docs/benchmarks.md as static SVG files (docs/img/bench-*.svg).

The figures are read from the published tables of docs/benchmarks.md, so a chart always shows
what the page's tables say. Run ``python docs/charts.py`` after ``python -m bench --write-docs``;
``--check`` exits 1 when a committed chart differs from what the tables give (the test suite
runs it).
"""

from __future__ import annotations

import argparse
import html
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

DOCS = Path(__file__).resolve().parent
PAGE = DOCS / "benchmarks.md"
OUT = DOCS / "img"

WIDTH, LABEL_W, BAR_H, GAP, TOP = 900, 450, 18, 6, 44
ZEAL, PEER = "#3f51b5", "#9e9e9e"


@dataclass(frozen=True)
class Chart:
    """One chart: the rows of one table of one section."""

    name: str
    section: str  # the ``<!-- bench:NAME -->`` section
    heading: str  # the ``###``/``##`` heading the table follows (prefix)
    column: str  # the value column
    title: str
    log: bool  # log scale for values spanning orders of magnitude


CHARTS = [
    Chart("http", "http", "## HTTP", "req/s median",
          "HTTP counter route, 2 workers, wrk: requests per second (higher is better)", log=False),
    Chart("table-get", "table", "### get (one process)", "ns/op",
          "Reading a row from Python: ns per call, log scale (lower is better)", log=True),
    Chart("table-incr", "table", "### incr (one process)", "ns/op",
          "Incrementing a shared counter: ns per call, log scale (lower is better)", log=True),
    Chart("store-get", "store", "### get", "ns/op",
          "await Store.get, every backend and its peers: ns per call, log scale (lower is better)",
          log=True),
    Chart("cache-get", "cache", "### get hit, small value", "ns/op",
          "Cache hit, small value: ns per call, log scale (lower is better)", log=True),
    Chart("pubsub", "pubsub", "### Publish → handler", "msg/s handled",
          "Publish → handler in another process: messages per second (higher is better)",
          log=False),
    Chart("metrics-inc", "metrics", "### Counter.inc()", "ns/op",
          "Counter.inc() on a cached child: ns per call, log scale (lower is better)", log=True),
    Chart("metrics-scrape", "metrics", "### Scrape of", "scrape ms",
          "Scrape of 10,000 series, 2 workers, as workers restart: ms, log scale (lower is better)",
          log=True),
    Chart("response-cache", "response_cache", "## Response cache", "req/s median",
          "Cached route hits, 2 workers, wrk: requests per second (higher is better)", log=False),
    Chart("ratelimit", "ratelimit", "## Rate limiting", "req/s median",
          "Rate-limited route, 2 workers, wrk: requests per second (higher is better)",
          log=False),
    Chart("locks-host", "locks", "### Host lock, uncontended", "ns/op",
          "Taking and giving back a host-wide lock: ns per round, log scale (lower is better)",
          log=True),
    Chart("locks-cluster", "locks", "### Cluster lock round trips", "ns/op",
          "Taking and giving back a lock on Redis: ns per round (lower is better)", log=False),
]  # fmt: skip


def parse_number(cell: str) -> float:
    """``"8.40 M"``, ``"24.9 k"``, ``"40,115"``, ``"65.8"`` -> a float."""
    m = re.fullmatch(r"([\d,.]+)\s*([kM]?)", cell.strip())
    if m is None:
        raise ValueError(f"not a figure: {cell!r}")
    scale = {"": 1.0, "k": 1e3, "M": 1e6}[m.group(2)]
    return float(m.group(1).replace(",", "")) * scale


def rows(page: str, chart: Chart) -> list[tuple[str, float]]:
    """(label, value) of each row of the chart's table."""
    begin, end = f"<!-- bench:{chart.section} -->", f"<!-- /bench:{chart.section} -->"
    section = page[page.index(begin) : page.index(end)]
    lines = section.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(chart.heading))
    tables: list[list[list[str]]] = [[]]
    for line in lines[start + 1 :]:
        if line.startswith("#"):
            break
        if line.startswith("|"):
            tables[-1].append([c.strip() for c in line.strip().strip("|").split("|")])
        elif tables[-1]:
            tables.append([])
    table = next(t for t in tables if t and chart.column in t[0])
    header, body = table[0], [r for r in table[2:] if r]
    col = header.index(chart.column)
    mode = header.index("Mode / idiom") if "Mode / idiom" in header else None
    out = []
    for r in body:
        label = r[0] if mode is None else f"{r[0]}: {r[mode]}"
        out.append((label.replace("`", ""), parse_number(r[col])))
    return out


def fmt(value: float, column: str) -> str:
    """A figure as the tables print it, with its unit."""
    if column == "ns/op":
        return f"{value:,.0f} ns" if value >= 100 else f"{value:.1f} ns"
    if value >= 1e6:
        return f"{value / 1e6:.2f} M"
    if value >= 1e4:
        return f"{value / 1e3:.1f} k"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def svg(chart: Chart, data: list[tuple[str, float]]) -> str:
    """The chart as an SVG document (no scripts, no external references)."""
    plot_w = WIDTH - LABEL_W - 90
    top = max(v for _, v in data)
    low = min(v for _, v in data)

    def length(v: float) -> float:
        if not chart.log:
            return plot_w * v / top
        floor = 10 ** math.floor(math.log10(low))
        return plot_w * (math.log10(v / floor) + 0.15) / (math.log10(top / floor) + 0.15)

    height = TOP + len(data) * (BAR_H + GAP) + 10
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="11">',
        f"<title>{html.escape(chart.title)}</title>",
        '<rect width="100%" height="100%" fill="#ffffff"/>',
        f'<text x="10" y="22" font-size="14" font-weight="bold">{html.escape(chart.title)}</text>',
    ]
    for i, (label, value) in enumerate(data):
        y = TOP + i * (BAR_H + GAP)
        color = ZEAL if label.lower().startswith("zeal") else PEER
        w = max(1.0, length(value))
        short = label if len(label) <= 64 else label[:61] + "..."
        out += [
            f'<text x="{LABEL_W - 8}" y="{y + 13}" text-anchor="end">{html.escape(short)}</text>',
            f'<rect x="{LABEL_W}" y="{y}" width="{w:.1f}" height="{BAR_H}" fill="{color}"/>',
            f'<text x="{LABEL_W + w + 6:.1f}" y="{y + 13}">{fmt(value, chart.column)}</text>',
        ]
    out.append("</svg>")
    return "\n".join(out) + "\n"


def render_all(page: str) -> dict[str, str]:
    """``{file name: SVG}`` of every chart."""
    return {f"bench-{c.name}.svg": svg(c, rows(page, c)) for c in CHARTS}


def main(argv: list[str] | None = None) -> int:
    """Write the charts, or with ``--check`` compare them with the committed files."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args(argv)
    charts = render_all(PAGE.read_text())
    stale = [n for n, text in charts.items() if not (OUT / n).is_file()
             or (OUT / n).read_text() != text]  # fmt: skip
    if args.check:
        for name in stale:
            print(f"docs/img/{name} is out of date: run python docs/charts.py", file=sys.stderr)
        return 1 if stale else 0
    OUT.mkdir(exist_ok=True)
    for name in stale:
        (OUT / name).write_text(charts[name])
        print(f"wrote docs/img/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
