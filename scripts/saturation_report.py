#!/usr/bin/env python3
"""Summary and plot of a scripts/saturation.sh run, from its raw JSON.

Usage: scripts/saturation_report.py DIR

Reads DIR/raw/<shape>-<durability>-<N>s-<io>-run<K>.json (tern-loadgen
saturate reports), writes DIR/summary.md (medians over the runs of each
point) and DIR/saturation.svg (median msgs/s against the window, one line per
point), with the standard library only.
"""

import glob
import json
import os
import re
import statistics
import sys

NAME = re.compile(r"(?P<point>.+)-run(?P<run>\d+)\.json$")


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, digits=0):
    return "n/a" if v is None else f"{v:,.{digits}f}"


def load(out):
    points = {}
    for path in sorted(glob.glob(os.path.join(out, "raw", "*.json"))):
        m = NAME.search(os.path.basename(path))
        if not m:
            continue
        with open(path) as f:
            points.setdefault(m.group("point"), []).append(json.load(f))
    return points


def best_step(report):
    ok = [s for s in report["steps"] if s["within_bound"]]
    return max(ok, key=lambda s: s["msgs_per_s"]) if ok else None


def summary(out, points):
    lines = [
        "# Saturation runs",
        "",
        "Medians over the runs of each point (`runs`) of `tern-loadgen saturate`: the",
        "highest msgs/s with all four ticks (read receipt back) whose deliver p99 stayed",
        "under the bound, and at that step the server's CPU per message, the deliver",
        "p50/p99 seen by the load generator, and the CPU of both processes (percent of",
        "one core). `lg bottleneck` counts the runs where the load generator used 90 % or",
        "more of its core at that step. Exact commands: commands.txt; raw JSON: raw/.",
        "",
        "| point | runs | msgs/s | server µs/msg | deliver p50 µs | deliver p99 µs | server CPU % | loadgen CPU % | lg bottleneck |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for point, reports in points.items():
        bests = [best_step(r) for r in reports]
        got = [b for b in bests if b]
        pick = lambda key: median([b[key] for b in got])  # noqa: E731
        lines.append(
            f"| {point} | {len(reports)} | {fmt(pick('msgs_per_s'))} "
            f"| {fmt(pick('server_cpu_us_per_msg'), 2)} | {fmt(pick('deliver_p50_us'))} "
            f"| {fmt(pick('deliver_p99_us'))} | {fmt(pick('server_cpu_percent'))} "
            f"| {fmt(pick('loadgen_cpu_percent'))} "
            f"| {sum(1 for b in got if b['loadgen_bottleneck'])} |"
        )
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
          "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


def plot(out, points):
    curves = {}
    for point, reports in points.items():
        by_window = {}
        for r in reports:
            for s in r["steps"]:
                by_window.setdefault(s["window"], []).append(s["msgs_per_s"])
        curves[point] = sorted((w, median(v)) for w, v in by_window.items())
    windows = sorted({w for c in curves.values() for w, _ in c}) or [1]
    ymax = max([y for c in curves.values() for _, y in c] + [1]) * 1.1
    W, H, L, R, T, B = 900, 520, 80, 260, 30, 50
    pw, ph = W - L - R, H - T - B
    xi = {w: i for i, w in enumerate(windows)}
    x = lambda w: L + pw * (xi[w] / max(len(windows) - 1, 1))  # noqa: E731
    y = lambda v: T + ph * (1 - v / ymax)  # noqa: E731
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
           'font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{L}" y="18" font-size="14">msgs/s with all four ticks (median) '
           'against the window per sender</text>',
           f'<line x1="{L}" y1="{T + ph}" x2="{L + pw}" y2="{T + ph}" stroke="black"/>',
           f'<line x1="{L}" y1="{T}" x2="{L}" y2="{T + ph}" stroke="black"/>']
    for w in windows:
        svg.append(f'<text x="{x(w):.1f}" y="{T + ph + 18}" text-anchor="middle">{w}</text>')
    svg.append(f'<text x="{L + pw / 2}" y="{H - 10}" text-anchor="middle">window</text>')
    for k in range(6):
        v = ymax * k / 5
        svg.append(f'<text x="{L - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v / 1000:.0f}k</text>')
        svg.append(f'<line x1="{L}" y1="{y(v):.1f}" x2="{L + pw}" y2="{y(v):.1f}" stroke="#eee"/>')
    for i, (point, curve) in enumerate(curves.items()):
        color = COLORS[i % len(COLORS)]
        pts = " ".join(f"{x(w):.1f},{y(v):.1f}" for w, v in curve if v is not None)
        svg.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="2"/>')
        ly = T + 16 * i + 10
        svg.append(f'<line x1="{L + pw + 15}" y1="{ly}" x2="{L + pw + 35}" y2="{ly}" '
                   f'stroke="{color}" stroke-width="2"/>')
        svg.append(f'<text x="{L + pw + 40}" y="{ly + 4}">{point}</text>')
    svg.append("</svg>")
    with open(os.path.join(out, "saturation.svg"), "w") as f:
        f.write("\n".join(svg) + "\n")


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out = sys.argv[1]
    points = load(out)
    if not points:
        sys.exit(f"no raw/*.json in {out}")
    summary(out, points)
    plot(out, points)


if __name__ == "__main__":
    main()
