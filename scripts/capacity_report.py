#!/usr/bin/env python3
"""Helpers and report writer for scripts/capacity.sh (Python 3.11 stdlib only).

    capacity_report.py get FILE a.b.c          print one field of a JSON file
    capacity_report.py set-chats STEP.json L   store the chat JSON list L in a step file
    capacity_report.py render DIR              write DIR/summary.md and the SVG plots

The SVG plots are written by hand (no plotting library): log-scale x axis
(connections), and a linear or log y axis.
"""

from __future__ import annotations

import html
import json
import math
import statistics
import sys
from pathlib import Path

PAGE_BYTES = 4096
# Why the default targets are what they are on the development box (shared/BOX-FACTS.md).
TARGET_WHY = {
    "poll": "Why this target: the poll backend keeps one file descriptor per connection, and "
            "RLIMIT_NOFILE is 20,000 per process here (soft and hard, not raisable without "
            "CAP_SYS_RESOURCE), so the server stops at about 19,990 connections (EMFILE). 19,000 "
            "leaves room for its own files. The box had memory and ports to spare.",
    "uring": "Why this target: io_uring direct descriptors take the server past the open-files "
             "limit, so memory and the kernel's file count bound it. Both ends live on this box: "
             "2 sockets, 2 open files and ~9.2 KB of kernel memory per connection. Past ~1.2M pairs "
             "the system-wide open files (2 per pair) pass fs.file-max (2,466,170), which only root "
             "processes may exceed, and BOX-FACTS asks runs to stay at or below ~1.2M pairs unless "
             "they raise file-max and restore it. Memory was not the limit (see MemAvailable).",
}
USERSPACE_TARGET_BYTES = 256  # issue 3: server userspace bytes per idle connection


# ---- small helpers --------------------------------------------------------------------

def dig(obj, dotted: str):
    for key in dotted.split("."):
        obj = obj[key]
    return obj


def load_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_env(path: Path) -> dict[str, list[str]]:
    env: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line:
            key, value = line.split("=", 1)
            env.setdefault(key, []).append(value)
    return env


def fmt_int(v) -> str:
    return "—" if v is None else f"{v:,.0f}"


def fmt_us(us) -> str:
    if us is None:
        return "—"
    if us >= 1_000_000:
        return f"{us / 1e6:.2f} s"
    if us >= 1000:
        return f"{us / 1000:.1f} ms"
    return f"{us:.0f} µs"


def fmt_bytes(b) -> str:
    if b is None:
        return "—"
    if abs(b) >= 1 << 30:
        return f"{b / (1 << 30):.2f} GiB"
    if abs(b) >= 1 << 20:
        return f"{b / (1 << 20):.1f} MiB"
    return f"{b:,.0f} B"


def fmt_pct(v) -> str:
    return "—" if v is None else f"{v:.1f} %"


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# ---- per-step figures -----------------------------------------------------------------

def login_figures(connect: dict | None):
    """(average logins/s over the ramp, best one-second logins/s, login p50 us, p99 us)."""
    if not connect:
        return None, None, None, None
    avg, ramp_s = None, 0.0
    for phase in connect.get("phases", []):
        if phase.get("phase") == "ramp" and phase.get("seconds", 0) > 0:
            ramp_s = phase["seconds"]
            avg = phase.get("up_at_end", 0) / ramp_s
    peak, prev_up = 0.0, 0
    for point in connect.get("timeline", []):
        up = point.get("up", 0)
        peak = max(peak, up - prev_up)
        prev_up = up
    login = connect.get("latency_us", {}).get("login", {})
    if ramp_s < 2:
        peak = 0  # a ramp shorter than two timeline seconds has no meaningful best second
    return avg, (peak or None), login.get("p50_us"), login.get("p99_us")


def read_slab(path: Path) -> dict[str, tuple[int, int]]:
    """{cache: (live objects, object bytes)} from a `slab_snap` file."""
    caches: dict[str, tuple[int, int]] = {}
    try:
        for line in path.read_text().splitlines():
            name, objs, size = line.split()
            caches[name] = (int(objs), int(size))
    except (OSError, ValueError):
        pass
    return caches


def slab_delta(a: dict, b: dict) -> dict[str, tuple[int, int]]:
    """{cache: (objects, bytes)} grown from snapshot a to snapshot b."""
    out = {}
    for name in set(a) | set(b):
        objs_a, size = a.get(name, (0, b.get(name, (0, 0))[1]))
        objs_b = b.get(name, (0, size))[0]
        if objs_b != objs_a:
            out[name] = (objs_b - objs_a, (objs_b - objs_a) * size)
    return out


def cpu_figures(cpu: dict | None) -> dict:
    """% of one core for server and load generator, % of the whole box for everything else."""
    if not cpu:
        return {}
    secs = cpu["wall_ns"] / 1e9
    total, idle = cpu["box_ticks"]
    tck = cpu["clk_tck"]
    ours = cpu["server_ticks"] + cpu["loadgen_ticks"]
    return {
        "server_cpu_pct": 100.0 * cpu["server_ticks"] / tck / secs,
        "loadgen_cpu_pct": 100.0 * cpu["loadgen_ticks"] / tck / secs,
        "others_box_pct": max(0.0, 100.0 * (total - idle - ours) / total) if total else None,
    }


def chat_figures(chat: dict | None, cpu: dict | None = None) -> dict | None:
    if not chat:
        return None
    lat = chat.get("latency_us", {})
    msgs = chat.get("messages") or {}
    row = {
        "exit": chat.get("exit_status"),
        "up": chat.get("connections", {}).get("up_max"),
        "failed": chat.get("connections", {}).get("failed"),
        "sent": msgs.get("sent"),
        "lost": msgs.get("lost"),
        # ACKed, not delivered within the drain window, not lost (late or unverified).
        "not_in_window": msgs.get("not_delivered_within_drain"),
        "duplicates": msgs.get("duplicates"),
        "out_of_order": msgs.get("out_of_order"),
        "late": chat.get("counters", {}).get("msgs_late"),
        **cpu_figures(cpu),
    }
    for kind in ("deliver", "ack", "receipt"):
        h = lat.get(kind, {})
        for p in ("p50", "p99", "p999"):
            row[f"{kind}_{p}"] = h.get(f"{p}_us")
    return row


def step_figures(path: Path, rss0_kb: int) -> dict:
    s = load_json(path) or {}
    d = path.parent
    held = s.get("conns_held") or 0
    f = {"target": s.get("conns_target"), "held": held, "users": s.get("users_online"),
         "ramp_unfinished": s.get("ramp_unfinished", False)}
    if "rss_kb" in s:
        f["rss_bytes"] = s["rss_kb"] * 1024
        f["user_b"] = (s["rss_kb"] - rss0_kb) * 1024 / held if held else None
        f["kernel_objs_b"] = s["slab_objects_delta_bytes"] / held if held else None
        f["kernel_slab_b"] = s["slab_delta_kb"] * 1024 / held if held else None
        f["sunreclaim_b"] = s["sunreclaim_delta_kb"] * 1024 / held if held else None
        f["tcp_mem_b"] = (s["tcp_mem_pages"] - s["tcp_mem_pages_before"]) * PAGE_BYTES / held if held else None
        used = (s["mem_available_before_kb"] - s["mem_available_held_kb"]) * 1024
        f["all_in_b"] = used / held if held else None
        f["mem_available_held_b"] = s["mem_available_held_kb"] * 1024
        f["tcp_inuse_delta"] = s.get("tcp_inuse_delta")
        f["conns_after_idle"] = s.get("conns_after_idle")
        f["loadgen_rss_bytes"] = s.get("loadgen_rss_kb", 0) * 1024
        secs = s["wall_ns"] / 1e9
        f["cpu_pct"] = 100.0 * s["cpu_ticks"] / s["clk_tck"] / secs
        total, idle = s["box_ticks"]
        f["box_busy_pct"] = 100.0 * (1 - idle / total) if total else None
    connect = load_json(d / s["connect_json"]) if s.get("connect_json") else None
    f["connect"] = connect
    f["login_avg"], f["login_peak"], f["login_p50"], f["login_p99"] = login_figures(connect)
    f["connect_failures"] = (connect or {}).get("connections", {}).get("failures")
    f["chats"] = [c for c in (chat_figures(load_json(d / name), load_json(d / name.replace(".json", ".cpu.json")))
                              for name in s.get("chat_jsons", [])) if c]
    n = s.get("conns_target")
    before = read_slab(d / f"step-{n}-slab-before.txt")
    held_snap = read_slab(d / f"step-{n}-slab-held.txt")
    after = read_slab(d / f"step-{n}-slab-after.txt")
    if before and held_snap and held:
        grow = slab_delta(before, held_snap)
        f["slab_grow"] = sorted(grow.items(), key=lambda kv: -kv[1][1])
        f["kernel_objs_b"] = sum(b for _, b in grow.values()) / held
        f["tcp_objs_per_conn"] = grow.get("TCP", (0, 0))[0] / held
        if after:
            freed = slab_delta(after, held_snap)
            f["kernel_freed_b"] = sum(b for _, b in freed.values()) / held
    for key in ("deliver_p50", "deliver_p99", "deliver_p999", "ack_p50", "ack_p99", "ack_p999"):
        f[key] = median([c[key] for c in f["chats"]])
    f["lost"] = sum(c["lost"] or 0 for c in f["chats"]) if f["chats"] else None
    f["not_in_window"] = sum(c["not_in_window"] or 0 for c in f["chats"]) if f["chats"] else None
    return f


# ---- SVG ------------------------------------------------------------------------------

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]


def nice_linear_ticks(lo: float, hi: float, count: int = 6) -> list[float]:
    span = max(hi - lo, 1e-9)
    raw = span / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    ticks, t = [], first
    while t <= hi + step * 0.001 and len(ticks) < 50:
        ticks.append(round(t, 10))
        t += step
    return ticks


def log_ticks(lo: float, hi: float) -> list[float]:
    ticks = []
    for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1):
        for m in (1, 2, 5):
            v = m * 10 ** e
            if lo <= v <= hi:
                ticks.append(v)
    return ticks


def short_num(v: float) -> str:
    if v >= 1e6:
        return f"{v / 1e6:g}M"
    if v >= 1e3:
        return f"{v / 1e3:g}k"
    return f"{v:g}"


def svg_chart(title: str, x_label: str, y_label: str, series: list[dict], *, y_log: bool,
              y_fmt=short_num, hlines: list[tuple[float, str]] = (), note: str = "") -> str:
    """series: [{"name", "points": [(x, y)], "dash": bool}]; x is always log scale."""
    W, H = 760, 460
    left, right, top, bottom = 80, 200, 50, 60
    pw, ph = W - left - right, H - top - bottom
    xs = [x for s in series for x, _ in s["points"]]
    ys = [y for s in series for _, y in s["points"]] + [v for v, _ in hlines]
    if not xs:
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="120">'
                f'<text x="20" y="60" font-family="sans-serif">{html.escape(title)}: no data</text></svg>\n')
    x_lo, x_hi = min(xs), max(xs)
    if x_lo == x_hi:
        x_lo, x_hi = x_lo / 2, x_hi * 2
    x_lo, x_hi = 10 ** math.floor(math.log10(x_lo)), 10 ** math.ceil(math.log10(x_hi))
    if y_log:
        pos = [y for y in ys if y > 0] or [1]
        y_lo, y_hi = 10 ** math.floor(math.log10(min(pos))), 10 ** math.ceil(math.log10(max(pos)))
        y_ticks = log_ticks(y_lo, y_hi)
    else:
        y_lo, y_hi = 0.0, max(ys) * 1.1 if max(ys) > 0 else 1.0
        y_ticks = nice_linear_ticks(y_lo, y_hi)
        y_hi = max(y_hi, y_ticks[-1])

    def px(x):
        return left + pw * (math.log10(x) - math.log10(x_lo)) / (math.log10(x_hi) - math.log10(x_lo))

    def py(y):
        if y_log:
            y = max(y, y_lo)
            frac = (math.log10(y) - math.log10(y_lo)) / (math.log10(y_hi) - math.log10(y_lo))
        else:
            frac = (y - y_lo) / (y_hi - y_lo)
        return top + ph * (1 - frac)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
           f'viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{left}" y="28" font-size="16" font-weight="bold">{html.escape(title)}</text>']
    for t in y_ticks:
        y = py(t)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{html.escape(y_fmt(t))}</text>')
    for t in log_ticks(x_lo, x_hi):
        x = px(t)
        out.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + ph}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{x:.1f}" y="{top + ph + 16}" text-anchor="middle">{short_num(t)}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>')
    out.append(f'<text x="{left + pw / 2}" y="{H - 18}" text-anchor="middle">{html.escape(x_label)}</text>')
    out.append(f'<text transform="translate(18 {top + ph / 2}) rotate(-90)" text-anchor="middle">'
               f'{html.escape(y_label)}</text>')
    for value, label in hlines:
        y = py(value)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="#888" '
                   f'stroke-dasharray="6 4"/>')
        out.append(f'<text x="{left + pw - 4}" y="{y - 4:.1f}" text-anchor="end" fill="#666">'
                   f'{html.escape(label)}</text>')
    for i, s in enumerate(series):
        color = COLORS[i % len(COLORS)]
        pts = sorted(s["points"])
        dash = ' stroke-dasharray="4 3"' if s.get("dash") else ""
        if len(pts) > 1:
            path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
            out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"{dash}/>')
        for x, y in pts:
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3.5" fill="{color}">'
                       f'<title>{html.escape(s["name"])}: {short_num(x)} conns, {html.escape(y_fmt(y))}</title>'
                       f'</circle>')
        ly = top + 14 + 20 * i
        out.append(f'<line x1="{left + pw + 12}" y1="{ly}" x2="{left + pw + 36}" y2="{ly}" stroke="{color}" '
                   f'stroke-width="2"{dash}/>')
        out.append(f'<text x="{left + pw + 42}" y="{ly + 4}">{html.escape(s["name"])}</text>')
    if note:
        out.append(f'<text x="{left}" y="{top - 8}" fill="#555">{html.escape(note)}</text>')
    out.append("</svg>\n")
    return "\n".join(out)


# ---- render ---------------------------------------------------------------------------

def render(d: Path) -> None:
    env = read_env(d / "run.env")
    one = {k: v[-1] for k, v in env.items()}
    s0 = load_json(d / "step-0.json") or {}
    rss0_kb = s0.get("rss_kb", 0)
    idle0 = None
    if s0:
        idle0 = 100.0 * s0["cpu_ticks"] / s0["clk_tck"] / (s0["wall_ns"] / 1e9)
    step_files = sorted(d.glob("step-*.json"),
                        key=lambda p: int(p.stem.split("-")[1]) if p.stem.split("-")[1].isdigit() else -1)
    steps = [step_figures(p, rss0_kb) for p in step_files
             if p.stem.count("-") == 1 and p.stem.split("-")[1].isdigit() and p.stem != "step-0"]
    steps.sort(key=lambda f: f["target"] or 0)
    measured = [f for f in steps if "rss_bytes" in f and f["held"]]
    backend = one.get("backend", one.get("io", "?"))

    # -- plots
    mem_series = [
        {"name": "server userspace (RSS)", "points": [(f["held"], f["user_b"]) for f in measured]},
        {"name": "kernel, live slab objects", "points": [(f["held"], f["kernel_objs_b"]) for f in measured]},
        {"name": "kernel, Slab (meminfo)", "points": [(f["held"], f["kernel_slab_b"]) for f in measured],
         "dash": True},
        {"name": "MemAvailable drop", "points": [(f["held"], f["all_in_b"]) for f in measured], "dash": True},
    ]
    for s in mem_series:
        s["points"] = [(x, y) for x, y in s["points"] if y is not None and y > 0]
    (d / "bytes_per_conn.svg").write_text(svg_chart(
        f"Bytes per idle logged-in connection ({backend})", "connections held (log scale)",
        "bytes per connection", mem_series, y_log=True, y_fmt=lambda v: fmt_bytes(v).replace(",", ""),
        hlines=[(USERSPACE_TARGET_BYTES, "target 256 B (userspace)")],
        note="kernel and MemAvailable figures include both ends (server and load generator on one box)"))
    chatted = [f for f in steps if f["chats"]]
    lat_series = []
    for key, name, dash in (("deliver_p50", "deliver p50", False), ("deliver_p99", "deliver p99", False),
                            ("deliver_p999", "deliver p99.9", False), ("ack_p99", "ack p99", True)):
        pts = [(f["held"], f[key]) for f in chatted if f[key]]
        lat_series.append({"name": name, "points": pts, "dash": dash})
    (d / "latency.svg").write_text(svg_chart(
        f"Chat latency at {one.get('msg_rate', '?')} with all connections held ({backend})",
        "connections held (log scale)", "latency", lat_series, y_log=True, y_fmt=fmt_us,
        note=f"median of {one.get('chat_runs', '?')} runs per step; send -> DELIVER (end to end), "
             "from the intended send time"))

    # -- summary.md
    best = max(measured, key=lambda f: f["users"] or 0) if measured else None
    largest_chat = chatted[-1] if chatted else None
    L = []
    L.append(f"# Capacity run: {one.get('date_utc', '?')}, {one.get('host', '?')}, backend `{backend}`, clients over {'WebSocket' if one.get('transport') == 'ws' else 'TCP'}\n")
    L.append("Made by `scripts/capacity.sh`; raw load-generator JSON of every run and the "
             "`step-N.json` measurements are in this directory.\n")
    L.append("## Headline\n")
    if best:
        L.append(f"- Largest number of logged-in idle connections held: **{fmt_int(best['users'])}** "
                 f"(server `Users_online`; step {fmt_int(best['target'])}).")
        L.append(f"- Server userspace per idle connection: **{best['user_b']:,.0f} B** "
                 f"(RSS {fmt_bytes(best['rss_bytes'])} with {fmt_int(best['held'])} held, "
                 f"{fmt_bytes(rss0_kb * 1024)} with none; target ≤ {USERSPACE_TARGET_BYTES} B).")
        L.append(f"- Kernel per connection, both ends on this box: **{best['kernel_objs_b']:,.0f} B** in live "
                 f"slab objects (Slab in /proc/meminfo: {best['kernel_slab_b']:,.0f} B), so about "
                 f"**{best['kernel_objs_b'] / 2:,.0f} B** for the server's end; TCP buffer memory "
                 f"(sockstat `mem`): {best['tcp_mem_b']:,.0f} B. Noise check: the `TCP` slab cache grew by "
                 f"{best.get('tcp_objs_per_conn', 0):.2f} sockets per connection (2.00 = only ours).")
        L.append(f"- Server CPU while holding them idle: **{best['cpu_pct']:.2f} % of one core** "
                 f"(over {one.get('idle_secs', '?')} s, no client traffic; {idle0:.2f} % with no connection).")
        if best["login_avg"]:
            L.append(f"- Login rate (connect + LOGIN_OK, load generator at `--rate {one.get('ramp_rate')}`): "
                     f"**{best['login_avg']:,.0f}/s** on average over the ramp to {fmt_int(best['held'])}"
                     + (f", best second {fmt_int(best['login_peak'])}/s." if best["login_peak"] else ".")
                     + f" Login latency p50 {fmt_us(best['login_p50'])}, p99 {fmt_us(best['login_p99'])}.")
    if largest_chat:
        f = largest_chat
        L.append(f"- Chat at {one.get('msg_rate')} between random pairs with {fmt_int(f['held'])} held "
                 f"(median of {len(f['chats'])} runs): send→DELIVER p50 **{fmt_us(f['deliver_p50'])}**, "
                 f"p99 **{fmt_us(f['deliver_p99'])}**, p99.9 **{fmt_us(f['deliver_p999'])}**; "
                 f"send→ACK p99 {fmt_us(f['ack_p99'])}; messages lost: {f['lost']}; "
                 f"not delivered within the drain window (not lost): {f['not_in_window']}.")
    L.append("")
    L.append("## Why the run stopped where it did\n")
    L.append(f"{one.get('stop_reason', 'unknown (the run did not finish)')}\n")
    if one.get("stop_reason", "").startswith("target"):
        L.append(TARGET_WHY.get(one.get("io", ""), "") + "\n")
    L.append("## Box and settings\n")
    L.append(f"- Kernel {one.get('kernel')}, {one.get('cpus')} cores, MemTotal "
             f"{fmt_bytes(int(one.get('mem_total_kb', 0)) * 1024)}, RLIMIT_NOFILE {one.get('nofile')}; "
             f"server and load generator on the same box, over loopback"
             f"{' in a network namespace of the run' if one.get('netns') == '1' else ''}.")
    L.append(f"- MemAvailable {fmt_bytes(int(one.get('mem_available_start_kb', 0)) * 1024)} at the start, "
             f"{fmt_bytes(int(one.get('mem_available_end_kb', 0)) * 1024) if one.get('mem_available_end_kb') else '?'} "
             f"at the end; load average at the start {one.get('loadavg_start')}.")
    holds = [(f["mem_available_held_b"], f["held"]) for f in measured if f.get("mem_available_held_b")]
    if holds:
        low, at = min(holds)
        L.append(f"- Lowest MemAvailable sampled while holding: {fmt_bytes(low)} (with {fmt_int(at)} held).")
    others = env.get("other_process", [])
    L.append("- Other processes over 256 MiB RSS at the start: " + (", ".join(others) if others else "none") + ".")
    L.append(f"- Server: `--io {one.get('io')}` (reports `{backend}`), shards {one.get('shards')} "
             f"(0 = one per core), `--durability {one.get('durability')}`, `--conns-max {one.get('conns_max')}`, "
             f"`--accept-rate-per-s-max 0`, `--idle-timeout-ms 900000` (the idle hold sends no PINGs). "
             f"Binary sha256 {one.get('tern_sha256')}…, load generator {one.get('loadgen_sha256')}….")
    L.append(f"- Ladder: {one.get('steps')} (target {one.get('target')}); chat {one.get('chat_runs')} runs "
             f"x {one.get('chat_secs')} s at {one.get('msg_rate')}, 32-byte bodies; run took "
             f"{one.get('duration_s', '?')} s.")
    L.append("")
    L.append("## Commands\n")
    L.append("```sh")
    L.append(one.get("invocation", "scripts/capacity.sh"))
    L.append("```\n")
    L.append("What it ran (binaries copied to a temp dir; `$TMP` paths, the per-run token secret in "
             "`TERN_TOKEN_SECRET`):\n")
    L.append("```sh")
    cmds = (d / "commands.txt").read_text().splitlines() if (d / "commands.txt").exists() else []
    L.extend(cmds)
    L.append("```\n")
    L.append("## Per step: idle hold\n")
    L.append("| connections | held (users) | server RSS | userspace B/conn | kernel B/conn pair: "
             "slab objects (freed at close) / Slab | TCP socks per conn | TCP mem B/conn | all-in B/conn "
             "(MemAvailable) | server idle CPU (% of a core) | box busy | login rate avg / best s "
             "| login p50 / p99 | load-gen RSS |")
    L.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    if idle0 is not None:
        L.append(f"| 0 | 0 | {fmt_bytes(rss0_kb * 1024)} | — | — | — | — | — | {idle0:.2f} % | — | — | — | — |")
    for f in steps:
        if "rss_bytes" not in f:
            L.append(f"| {fmt_int(f['target'])} | {fmt_int(f['held'])} (ramp unfinished) | — | — | — | — | — | — "
                     f"| — | — | {fmt_int(f['login_avg'])} | — | — |")
            continue
        freed = f.get("kernel_freed_b")
        L.append(
            f"| {fmt_int(f['target'])} | {fmt_int(f['held'])} ({fmt_int(f['users'])}) | {fmt_bytes(f['rss_bytes'])} "
            f"| {f['user_b']:,.0f} | {f['kernel_objs_b']:,.0f} ({fmt_int(freed)}) / {f['kernel_slab_b']:,.0f} "
            f"| {f.get('tcp_objs_per_conn', 0):.2f} | {f['tcp_mem_b']:,.0f} | {f['all_in_b']:,.0f} "
            f"| {f['cpu_pct']:.2f} % | {f['box_busy_pct']:.1f} % "
            f"| {fmt_int(f['login_avg'])} / {fmt_int(f['login_peak'])} "
            f"| {fmt_us(f['login_p50'])} / {fmt_us(f['login_p99'])} | {fmt_bytes(f['loadgen_rss_bytes'])} |")
    L.append("")
    L.append("*TCP socks per conn* is the growth of the `TCP` slab cache per held connection: 2.00 means "
             "both ends and nothing else; far from 2 means other sockets on the box came or went during "
             "the step and the kernel figures of that step are noisy.")
    if measured and measured[-1].get("slab_grow"):
        f = measured[-1]
        L.append("")
        L.append(f"Kernel memory per connection pair at {fmt_int(f['held'])}, by slab cache (growth from "
                 "before the ramp to the hold):\n")
        L.append("| cache | objects per conn | bytes per conn |")
        L.append("|---|---:|---:|")
        for name, (objs, b) in f["slab_grow"][:12]:
            L.append(f"| {name} | {objs / f['held']:.2f} | {b / f['held']:,.0f} |")
        rest = sum(b for _, (_, b) in f["slab_grow"][12:])
        L.append(f"| (all other caches) | | {rest / f['held']:,.0f} |")
        L.append(f"| **total** | | **{f['kernel_objs_b']:,.0f}** |")
    failed_steps = [f for f in steps if f["connect_failures"]]
    if failed_steps:
        L.append("")
        for f in failed_steps:
            L.append(f"- Step {fmt_int(f['target'])}: connection failures by reason "
                     f"`{json.dumps(f['connect_failures'])}`.")
    L.append("")
    L.append(f"## Per step: chat at {one.get('msg_rate')} with all connections held\n")
    L.append("Median over the runs; each run ramps its own N connections and sends between random "
             "pairs of them. Latency from each message's intended send time (no coordinated omission).\n")
    L.append("| connections | runs | deliver p50 | deliver p99 | deliver p99.9 | ack p50 | ack p99 | ack p99.9 "
             "| sent (per run) | lost | not in window | dup | out of order | server CPU | others' CPU (max) |")
    L.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for f in chatted:
        c = f["chats"]
        L.append(f"| {fmt_int(f['held'])} | {len(c)} | {fmt_us(f['deliver_p50'])} | {fmt_us(f['deliver_p99'])} "
                 f"| {fmt_us(f['deliver_p999'])} | {fmt_us(f['ack_p50'])} | {fmt_us(f['ack_p99'])} "
                 f"| {fmt_us(f['ack_p999'])} | {fmt_int(median([x['sent'] for x in c]))} "
                 f"| {sum(x['lost'] or 0 for x in c)} | {sum(x['not_in_window'] or 0 for x in c)} "
                 f"| {sum(x['duplicates'] or 0 for x in c)} "
                 f"| {sum(x['out_of_order'] or 0 for x in c)} "
                 f"| {fmt_pct(median([x.get('server_cpu_pct') for x in c]))} "
                 f"| {fmt_pct(max((x['others_box_pct'] for x in c if x.get('others_box_pct') is not None), default=None))} |")
    L.append("")
    L.append("Every run (deliver p50 / p99 / p99.9):\n")
    for f in chatted:
        parts = []
        for x in f["chats"]:
            text = f"{fmt_us(x['deliver_p50'])} / {fmt_us(x['deliver_p99'])} / {fmt_us(x['deliver_p999'])}"
            if x.get("others_box_pct") is not None:
                text += f" (others {x['others_box_pct']:.0f} %)"
            if x["exit"] != 0:
                text += f" (exit {x['exit']})"
            parts.append(text)
        runs = "; ".join(parts)
        L.append(f"- {fmt_int(f['held'])}: {runs}")
    L.append("")
    L.append("## Plots\n")
    L.append("![bytes per connection](bytes_per_conn.svg)\n")
    L.append("![latency percentiles vs load](latency.svg)\n")
    L.append("## How each figure is measured\n")
    L.append("- *held*: the server's `Conns` (`tern stats show info`) 3 s after the load generator "
             "reports its ramp done; *users* its `Users_online` (logged in).")
    L.append("- At small N the per-connection figures are dominated by fixed costs and by noise "
             "from the rest of the box; read the largest steps.")
    L.append("- *server RSS*: VmRSS of the server process (/proc/PID/status), the larger of the samples "
             "before and after the idle window. *userspace B/conn* = (RSS − RSS with 0 connections) / held.")
    L.append("- *kernel B/conn pair*: growth of the bytes in live slab objects over all caches "
             "(/proc/slabinfo active_objs × objsize) and of `Slab` in /proc/meminfo, from just before "
             "the step's ramp to the hold, divided by held. Both ends of every connection live on this "
             "box, so this is per *pair*; the server's end is about half. Other processes on the box "
             "add noise to these system-wide counters (small at large N).")
    L.append("- *TCP mem*: growth of /proc/net/sockstat `TCP: mem` (pages of socket buffers) per "
             "connection: idle sockets hold no buffers.")
    L.append("- *all-in*: MemAvailable drop per connection: server, load generator and kernel together.")
    L.append("- *server idle CPU*: utime+stime of the server (/proc/PID/stat) over the idle window, "
             "as % of one core; no PINGs are sent during it (`--ping-every 0`, server idle timeout "
             "raised to 15 min). *box busy*: all cores, everything on the box, from /proc/stat.")
    L.append("- *lost*: ACKed and never delivered although the recipient logged in again and drained its "
             "queue to empty (the load generator's final drain). *not in window*: ACKed and not delivered "
             "within the load generator's drain window, not lost (delivered late in the final drain, or "
             "unverified); a rerun with a longer `--drain` shows them delivered.")
    L.append("- *server CPU* during a chat run: the server's utime+stime over the whole load-generator "
             "run (ramp, chat, drain, close) as % of one core. *others' CPU*: busy time of the whole box "
             "minus server and load generator, as % of all cores: work of other people on the box that "
             "competes with the run, plus kernel threads and softirq time not charged to any process "
             "(loopback packet processing, RCU freeing of closed sockets: partly the run's own). The script waits (bounded) for the box to be quiet before each "
             "idle window and chat run.")
    L.append("- *login rate*: the load generator's ramp phase (`up_at_end / seconds`) and the best "
             "one-second increase of connections up in its timeline, with `--rate "
             f"{one.get('ramp_rate')}` (0 = as fast as it goes).")
    (d / "summary.md").write_text("\n".join(L) + "\n")


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "get":
        try:
            value = dig(json.loads(Path(argv[1]).read_text()), argv[2])
        except (OSError, ValueError, KeyError, TypeError):
            return 1
        print(value if isinstance(value, str) else json.dumps(value))
        return 0
    if len(argv) == 3 and argv[0] == "set-chats":
        path = Path(argv[1])
        step = json.loads(path.read_text())
        step["chat_jsons"] = json.loads(argv[2])
        path.write_text(json.dumps(step, indent=1) + "\n")
        return 0
    if len(argv) == 2 and argv[0] == "render":
        render(Path(argv[1]))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
