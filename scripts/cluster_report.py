#!/usr/bin/env python3
"""Summary of scripts/cluster-bench.sh: reads OUT/raw/ and prints Markdown.

Usage: cluster_report.py OUT LEASE_S PARTITIONS [NATS_SERVERS]
Medians over the runs; the raw files stay beside it.
"""

import glob
import json
import os
import re
import statistics
import sys


def load(path):
    with open(path) as f:
        return json.load(f)


def latency_row(path, name):
    """(count, p50_us, p99_us) of one `show latency` row, or None."""
    try:
        with open(path) as f:
            for line in f:
                cells = line.split()
                if cells and cells[0] == name:
                    return int(cells[1]), cells[3], cells[5]
    except OSError:
        pass
    return None


def setup_name(setup):
    """`standalone_fsync` -> `standalone, fsync`; `cluster_p64` -> `2 nodes, 64 partitions`."""
    if setup.startswith("standalone_"):
        return "standalone, durability " + setup.split("_", 1)[1]
    return "2 nodes, " + setup.split("_p", 1)[1] + " partitions"


def cpu_seconds(path):
    """{label: seconds} from a raw/NAME.cpu file."""
    got = {}
    try:
        with open(path) as f:
            for line in f:
                label, secs = line.split()
                got[label] = float(secs)
    except OSError:
        pass
    return got


def chat(out, nats):
    keys = {}
    for path in sorted(glob.glob(os.path.join(out, "raw", "chat-*-run*.json"))):
        m = re.match(r"chat-(\w+)-(\d+)-run(\d+)\.json", os.path.basename(path))
        if m:
            keys.setdefault((int(m.group(2)), m.group(1)), []).append(path)
    if not keys:
        return
    med = statistics.median
    print(f"## Chat shape: standalone against two nodes on {nats}\n")
    print("| offered msgs/s | setup | runs | acked msgs/s | ACK p50 / p99 ms | deliver p50 / p99 ms "
          "| lost | failed conns | redirects | node publish p50 / p99 ms (a; b) | CPU s during the run |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    def order(kv):
        rate, setup = kv[0]
        if setup.startswith("standalone"):
            return (rate, 0, 0, setup)
        return (rate, 1, -int(setup.split("_p", 1)[1]), setup)

    for (rate, setup), paths in sorted(keys.items(), key=order):
        rates, ack50, ack99, del50, del99, lost, failed, redirects = [], [], [], [], [], [], [], []
        cpu = {}
        for p in paths:
            r = load(p)
            chat_phase = next(ph for ph in r["phases"] if ph["phase"] == "chat")
            rates.append(r["messages"]["acked"] / chat_phase["seconds"])
            ack50.append(r["latency_us"]["ack"]["p50_us"] / 1000)
            ack99.append(r["latency_us"]["ack"]["p99_us"] / 1000)
            del50.append(r["latency_us"]["deliver"]["p50_us"] / 1000)
            del99.append(r["latency_us"]["deliver"]["p99_us"] / 1000)
            lost.append(r["messages"]["lost"])
            failed.append(r["connections"]["failed"])
            redirects.append(r["counters"].get("redirects", 0))  # 0 from a loadgen before REDIRECTs
            for label, secs in cpu_seconds(p.replace(".json", ".cpu")).items():
                cpu.setdefault(label, []).append(secs)
        publish = "-"
        if setup.startswith("cluster"):
            cells = []
            for node in ("a", "b"):
                p50s, p99s = [], []
                for p in paths:
                    row = latency_row(p.replace(".json", f".{node}.latency.txt"), "cluster_publish")
                    if row and row[0] > 0:
                        p50s.append(int(row[1]) / 1000)
                        p99s.append(int(row[2]) / 1000 if row[2] != "+Inf" else float("inf"))
                if p50s:
                    cells.append(f"{med(p50s):.3g} / {med(p99s):.3g}")
            publish = "; ".join(cells) or "-"
        cpu_cell = ", ".join(f"{label} {med(v):.1f}" for label, v in cpu.items()) or "-"
        print(f"| {rate} | {setup_name(setup)} | {len(paths)} | {med(rates):.0f} "
              f"| {med(ack50):.2f} / {med(ack99):.2f} | {med(del50):.2f} / {med(del99):.2f} "
              f"| {max(lost)} | {max(failed)} | {med(redirects):.0f} | {publish} | {cpu_cell} |")
    print("\nClient-side latencies (tern-loadgen, from each message's intended send time); "
          "medians of the runs; `lost` and `failed conns` are the worst run. "
          "Node publish: `show latency` row `cluster_publish` (bucket upper bounds, powers of two "
          "of a microsecond). CPU: user + system seconds of each process over the whole "
          "load-generator run (ramp, chat, drain, close).\n")
    idle = []
    for (rate, setup), paths in sorted(keys.items(), key=order):
        for p in paths:
            cpu = cpu_seconds(p.replace(".json", ".idle10s.cpu"))
            left = stream_state(p.replace(".json", ".jsz.json"))
            if cpu or left:
                idle.append((os.path.basename(p)[:-5], cpu, left))
    if idle:
        print("| cluster run | CPU s over 10 s idle before it (no clients) | "
              "message stream records left after it (all TERN streams) |")
        print("|---|---|---|")
        for name, cpu, left in idle:
            cpu_cell = ", ".join(f"{label} {v:.2f}" for label, v in cpu.items()) or "-"
            left_cell = "-" if left is None else str(left["messages"])
            print(f"| {name} | {cpu_cell} | {left_cell} |")
        print("\nRecords left: messages not DELIVERED and receipts not consumed yet when the "
              "load generator ended (work-queue retention deletes a record once acked).\n")


def takeover(out, lease_s):
    secs = []
    for path in sorted(glob.glob(os.path.join(out, "raw", "takeover-run*.seconds"))):
        with open(path) as f:
            secs.append(float(f.read()))
    if not secs:
        return
    print("## Takeover: kill -9 of a node until its users are served again\n")
    print(f"Lease {lease_s} s. Runs: {', '.join(f'{s:.2f} s' for s in secs)}; "
          f"**median {statistics.median(secs):.2f} s**.\n")


def stream_state(path):
    """Messages and bytes of the message streams (`TERN`, the single stream
    of the old layout, or `TERN_<g>`) summed, in a /jsz answer, or None."""
    try:
        jsz = load(path)
    except (OSError, ValueError):
        return None
    total = None
    for account in jsz.get("account_details", []):
        for stream in account.get("stream_detail", []):
            name = stream.get("name", "")
            if name == "TERN" or name.startswith("TERN_"):
                total = total or {"messages": 0, "bytes": 0}
                total["messages"] += stream["state"]["messages"]
                total["bytes"] += stream["state"]["bytes"]
    return total


def storage(out):
    rows = []
    for path in glob.glob(os.path.join(out, "raw", "storage-*.jsz.json")):
        body = int(re.match(r"storage-(\d+)\.jsz\.json", os.path.basename(path)).group(1))
        state = stream_state(path)
        if state is None:
            continue
        with open(path.replace(".jsz.json", ".du_bytes")) as f:
            du = int(f.read())
        rows.append((body, state["messages"], state["bytes"], du))
    if not rows:
        return
    print("## JetStream storage per waiting message\n")
    print("| body bytes | messages waiting | stream bytes | stream bytes / message | "
          "stream directory on disk | disk bytes / message |")
    print("|---|---|---|---|---|---|")
    for body, msgs, nbytes, du in sorted(rows):
        per = nbytes / msgs if msgs else 0
        per_disk = du / msgs if msgs else 0
        print(f"| {body} | {msgs} | {nbytes} | {per:.1f} | {du} | {per_disk:.1f} |")
    print("\nStream bytes: JetStream's own count (`/jsz`, message streams' state summed). Disk: "
          "`du -sb` of the message streams' directories, blocks and indexes included.\n")


def main():
    out, lease_s, partitions = sys.argv[1], sys.argv[2], sys.argv[3]
    servers = sys.argv[4] if len(sys.argv) > 4 else "1"
    nats = ("one nats-server" if servers == "1"
            else f"a NATS cluster of {servers} nats-servers")
    print(f"# Cluster figures ({os.path.basename(os.path.normpath(out))})\n")
    print(f"{nats[0].upper()}{nats[1:]} (JetStream, stream replicas {servers}), {partitions} partitions, "
          f"lease {lease_s} s; all processes on one shared 2-core box: noisy.\n")
    chat(out, nats)
    takeover(out, lease_s)
    storage(out)


if __name__ == "__main__":
    main()
