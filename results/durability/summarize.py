#!/usr/bin/env python3
"""Medians of the runs sweep.sh wrote: summarize.py DIR [--csv FILE]
(DIR holds MODE-RATE-RUN.json; --csv also writes one row per run)."""
import json, statistics, sys, pathlib, collections

runs = collections.defaultdict(list)
rows = []
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    mode, rate, run = f.stem.split("-")
    d = json.load(open(f))
    chat = next(p for p in d["phases"] if p["phase"] == "chat")
    m, ack = d["messages"], d["latency_us"]["ack"]
    r = {
        "mode": mode, "rate": int(rate), "run": int(run),
        "tput": m["acked"] / chat["seconds"],
        "p50": ack["p50_us"] / 1000, "p99": ack["p99_us"] / 1000,
        "lost": m["lost"], "unanswered": m["unanswered"], "refused": m["refused"],
    }
    runs[(mode, int(rate))].append(r)
    rows.append(r)
print("| mode | offered msg/s | runs | ACKed msg/s (median) | ACK p50 ms (median) "
      "| ACK p99 ms (median) | ACK p99 ms (min) | p99 of each run | lost |")
print("|---|---:|---:|---:|---:|---:|---:|---|---:|")
for (mode, rate), rs in sorted(runs.items()):
    med = lambda k: statistics.median(r[k] for r in rs)
    rs.sort(key=lambda r: r["run"])
    each = ", ".join(f"{r['p99']:.1f}" for r in rs)
    best = min(r["p99"] for r in rs)
    lost = sum(r["lost"] for r in rs)
    print(f"| {mode} | {rate} | {len(rs)} | {med('tput'):.0f} | {med('p50'):.2f} "
          f"| {med('p99'):.2f} | {best:.2f} | {each} | {lost} |")
if "--csv" in sys.argv:
    with open(sys.argv[sys.argv.index("--csv") + 1], "w") as out:
        out.write("mode,rate,run,acked_per_s,ack_p50_ms,ack_p99_ms,lost,unanswered,refused\n")
        for r in sorted(rows, key=lambda r: (r["mode"], r["rate"], r["run"])):
            out.write(f"{r['mode']},{r['rate']},{r['run']},{r['tput']:.0f},{r['p50']:.3f},"
                      f"{r['p99']:.3f},{r['lost']},{r['unanswered']},{r['refused']}\n")
