#!/usr/bin/env python3
"""The same MQTT 3.1.1 QoS 1 load against Tern's MQTT listener and mosquitto.

Each run starts a fresh broker (Tern: release build, `--mqtt-listen`, memory
durability, accept and rate limits off; mosquitto: a generated config on a
loopback port, anonymous, no persistence, no logging), reads its VmRSS, runs
`tern-loadgen chat --protocol mqtt` (Tern: `--broker tern`, mosquitto:
`--broker generic`) with CONNS connections, reads the broker's VmRSS once the
ramp is done (idle, subscribed connections: memory per connection), and
keeps the load generator's JSON report. The box's CPU use (all cores, from
/proc/stat) over each chat is recorded as how busy the box was.

Every process started here is stopped by its PID; every run is bounded
(`--max-time` and a timeout).

Usage (repository root, after `cargo build --release -p tern -p tern-loadgen`):
  results/mqtt/load.py --conns 15000 --rates 5000,20000 --runs 3 --out results/mqtt/chat-15k
"""

import argparse
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

TERN = "target/release/tern"
LOADGEN = "target/release/tern-loadgen"


def mosquitto_bin():
    for d in os.environ.get("PATH", "").split(":") + ["/usr/sbin", "/usr/local/sbin"]:
        p = os.path.join(d, "mosquitto")
        if os.path.isfile(p):
            return p
    sys.exit("mosquitto not installed (apt-get install mosquitto)")


def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def cpu_ticks():
    """(busy, total) jiffies of all cores."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v) - idle, sum(v)


def wait_port(port, timeout=10):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def start_broker(target, tmp, conns, secret):
    # Below the ephemeral range (32768-60999), where earlier client ports
    # may linger.
    port = 20000 + random.randrange(6000)
    log = open(os.path.join(tmp, "server.log"), "w")
    if target == "mosquitto":
        conf = os.path.join(tmp, "mosquitto.conf")
        with open(conf, "w") as f:
            f.write(
                f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                "max_connections -1\nlog_dest none\n"
            )
        cmd = [mosquitto_bin(), "-c", conf]
    else:
        cmd = [
            TERN, "serve", "--io", os.environ.get("IO", "auto"), "--shards", "2",
            "--listen", f"127.0.0.1:{port + 6000}", "--mqtt-listen", f"127.0.0.1:{port}",
            "--stats-socket", os.path.join(tmp, "tern.sock"),
            "--data-dir", os.path.join(tmp, "data"), "--durability", "memory",
            "--accept-rate-per-s-max", "0", "--conns-max", str(conns + conns // 10 + 2000),
            "--idle-timeout-ms", "900000", "--addr-conns-per-s-max", "0",
            "--addr-pending-max", "0", "--pending-max", "0",
            "--sends-per-s-max", "0", "--receipts-per-s-max", "0",
        ]
    env = dict(os.environ, TERN_TOKEN_SECRET=secret)
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    wait_port(port)
    return p, port, cmd


def stop(p):
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def one_run(target, conns, rate, secs, settle, tmp, extra):
    secret = secrets.token_hex(16)
    broker, port, server_cmd = start_broker(target, tmp, conns, secret)
    try:
        time.sleep(1)
        rss0 = rss_bytes(broker.pid)
        report = os.path.join(tmp, "report.json")
        cmd = [
            LOADGEN, "chat", "--protocol", "mqtt",
            "--broker", "generic" if target == "mosquitto" else "tern",
            "--server", f"127.0.0.1:{port}", "--conns", str(conns), "--rate", "20000/s",
            "--msg-rate", f"{rate}/s", "--duration", f"{secs}s", "--settle", f"{settle}s",
            "--drain", "20s", "--ping-every", "60s", "--max-time", "300s",
            "--quiet", "--json", report,
        ] + extra
        env = dict(os.environ, TERN_TOKEN_SECRET=secret)
        err = open(os.path.join(tmp, "loadgen.err"), "w+")
        lg = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
        held_rss = None
        busy = None
        end = time.time() + 330
        while lg.poll() is None and time.time() < end:
            err.seek(0)
            text = err.read()
            if held_rss is None and re.search(r"^ramp: ", text, re.M):
                time.sleep(settle / 2)
                held_rss = rss_bytes(broker.pid)
            if busy is None and re.search(r"^chat: ", text, re.M):
                c0 = cpu_ticks()
                time.sleep(secs)
                c1 = cpu_ticks()
                busy = (c1[0] - c0[0]) / max(1, c1[1] - c0[1])
            time.sleep(0.05)
        if lg.poll() is None:
            lg.kill()
            lg.wait()
            raise RuntimeError("load generator overran its timeout")
        with open(report) as f:
            r = json.load(f)
        up = r["connections"].get("up_max")
        m, lat = r["messages"], r["latency_us"]
        return {
            "target": target, "conns": conns, "rate": rate, "secs": secs,
            "status": lg.returncode, "up": up,
            "idle_bytes_per_conn": None if held_rss is None else round((held_rss - rss0) / conns),
            "sent": m["sent"], "acked": m["acked"], "delivered": m["delivered"],
            "lost": m["lost"], "unverified": m["unverified"], "duplicates": m["duplicates"],
            "ack_p50_us": lat["ack"]["p50_us"], "ack_p99_us": lat["ack"]["p99_us"],
            "deliver_p50_us": lat["deliver"]["p50_us"], "deliver_p99_us": lat["deliver"]["p99_us"],
            "box_cpu_busy": None if busy is None else round(busy, 3),
            "loadavg_before": open("/proc/loadavg").read().split()[0],
            "server_cmd": " ".join(server_cmd), "loadgen_cmd": " ".join(cmd),
        }
    finally:
        stop(broker)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--conns", type=int, default=15000)
    ap.add_argument("--rates", default="5000,20000")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--secs", type=int, default=10)
    ap.add_argument("--settle", type=int, default=4)
    ap.add_argument("--targets", default="tern,mosquitto")
    ap.add_argument("--out", required=True)
    ap.add_argument("extra", nargs="*", help="more tern-loadgen options (after --)")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    rows = []
    for run in range(1, a.runs + 1):
        for rate in [int(x) for x in a.rates.split(",")]:
            for target in a.targets.split(","):
                tmp = tempfile.mkdtemp(prefix="mqtt-load-")
                try:
                    row = one_run(target, a.conns, rate, a.secs, a.settle, tmp, a.extra)
                    shutil.copy(os.path.join(tmp, "report.json"),
                                os.path.join(a.out, f"{target}-{rate}-run{run}.json"))
                except Exception as e:  # one failed run is reported, not fatal
                    row = {"target": target, "conns": a.conns, "rate": rate, "error": str(e)}
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
                row["run"] = run
                rows.append(row)
                print(json.dumps(row), flush=True)
    summary = {}
    for row in rows:
        if "error" in row:
            continue
        summary.setdefault((row["target"], row["rate"]), []).append(row)
    print("\n# medians over runs")
    print("target     rate/s  runs  idle B/conn  acked/sent  delivered  lost  "
          "ack p50/p99 ms   deliver p50/p99 ms  box busy")
    for (target, rate), rs in sorted(summary.items()):
        med = lambda k: statistics.median(r[k] for r in rs if r[k] is not None)
        print(f"{target:<10} {rate:>6} {len(rs):>5}  {med('idle_bytes_per_conn'):>11.0f}  "
              f"{sum(r['acked'] for r in rs)}/{sum(r['sent'] for r in rs)}  "
              f"{sum(r['delivered'] for r in rs):>9}  {sum(r['lost'] for r in rs):>4}  "
              f"{med('ack_p50_us') / 1000:>6.2f}/{med('ack_p99_us') / 1000:<8.2f}  "
              f"{med('deliver_p50_us') / 1000:>6.2f}/{med('deliver_p99_us') / 1000:<8.2f}  "
              f"{med('box_cpu_busy'):.2f}")


if __name__ == "__main__":
    main()
