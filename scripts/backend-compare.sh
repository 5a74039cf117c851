#!/usr/bin/env bash
# scripts/backend-compare.sh -- uring vs poll under chat load (issue 4, "Figures").
#
# Builds release binaries, then for every repetition and every backend starts a
# fresh `tern serve --io <backend> --shards 2 --durability memory` and runs
# `tern-loadgen chat` with a fixed connection count at increasing --msg-rate
# steps. Per step it keeps the load generator's JSON and measures the server's
# CPU (utime+stime from /proc/PID/stat: over the whole load-generator run, and
# over the chat phase alone from a 0.1 s sampler), the load generator's CPU and
# the whole box's CPU. The sweep of a backend stops at the first saturated step
# (achieved below 90% of the offered rate, a message lost or not delivered
# within the drain window, or deliver p99 over 1 s). Achieved counts only
# messages delivered within the drain window (not the load generator's
# `delivered_late`, which arrive only in its final drain). Backends alternate order between repetitions.
#
# Before every step it checks that other people's processes (tern, tern-loadgen,
# cargo, rustc, test binaries: every user process not started by this script)
# use under --busy-pct % of one core over 3 s and that no other load generator is
# ramping; if not, it waits (checking every --busy-poll-secs, up to
# --busy-wait-secs). It also measures the others' CPU during each step and
# measures a step again (at most 3 tries) when they overlapped it.
#
# At the end it writes <out>/summary.json and <out>/README.md: per backend a
# table (rate -> achieved msgs/s, ACK and DELIVER p50/p99, server CPU us/msg;
# medians over the repetitions), the highest rate whose median deliver p99 is
# below 1 ms (and below 5 ms), and the uring/poll ratios. <out>/NOTES.md, if
# present, is appended to the README verbatim (hand-written analysis survives
# a re-run).
#
# Bounded: every load-generator run has --max-time and `timeout`, every wait a
# deadline, at most STEPS_MAX steps and REPS_MAX repetitions. Processes this
# script started are stopped, and its temp dir removed, on any exit.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: scripts/backend-compare.sh [OPTIONS]

  --backends LIST        comma list, run in this order in odd repetitions and
                         reversed in even ones (default poll,uring)
  --conns N              connections held by every chat run (default 2000)
  --rates LIST           offered msgs/s steps (default
                         1000,2500,5000,10000,20000,30000,40000,60000,80000,100000,120000)
  --duration S           sending time per step, seconds (default 10)
  --reps K               whole sweeps; the tables take medians (default 3)
  --shards N             server shards (default 2)
  --port P               server port (default 17222)
  --lg-workers N         load generator worker threads (default 0 = one per core)
  --pin                  server on core 0, load generator on core 1 (taskset);
                         use with --shards 1 --lg-workers 1 so that neither
                         steals the other's core
  --uring-batch-wait-us N
                         pass --uring-batch-wait-us N to the uring server
                         (completion batching; default 0 = off)
  --busy-pct P           CPU of all other user processes, in % of one
                         core, above which a step waits (default 25)
  --busy-poll-secs S     re-check interval while waiting (default 30)
  --busy-wait-secs S     longest wait before a step; then it runs anyway and
                         is flagged (default 1800)
  --out DIR              results directory (default results/backend-compare);
                         its raw/ subdirectory is replaced
  --no-build             use the existing target/release binaries
  --report-only          only rebuild summary.json and README.md from <out>/raw
  -h, --help             this text
EOF
}

# ---- options --------------------------------------------------------------------------
backends_csv=poll,uring conns=2000
rates_csv=1000,2500,5000,10000,20000,30000,40000,60000,80000,100000,120000
duration=10 reps=3 shards=2 port=17222 lg_workers=0 uring_batch_wait_us=0 pin=0
busy_pct=25 busy_poll_secs=30 busy_wait_secs=1800
out="" build=1 report_only=0
readonly STEPS_MAX=12 REPS_MAX=9
readonly SAT_ACHIEVED_PCT=90 SAT_P99_US=1000000 ATTEMPTS_MAX=3
invocation="scripts/backend-compare.sh${*:+ $*}"

need_arg() { [ "$#" -ge 2 ] || { echo "backend-compare.sh: $1 needs a value" >&2; exit 2; }; }
while [ "$#" -gt 0 ]; do
    case "$1" in
        --backends) need_arg "$@"; backends_csv=$2; shift ;;
        --conns) need_arg "$@"; conns=$2; shift ;;
        --rates) need_arg "$@"; rates_csv=$2; shift ;;
        --duration) need_arg "$@"; duration=$2; shift ;;
        --reps) need_arg "$@"; reps=$2; shift ;;
        --shards) need_arg "$@"; shards=$2; shift ;;
        --port) need_arg "$@"; port=$2; shift ;;
        --lg-workers) need_arg "$@"; lg_workers=$2; shift ;;
        --pin) pin=1 ;;
        --uring-batch-wait-us) need_arg "$@"; uring_batch_wait_us=$2; shift ;;
        --busy-pct) need_arg "$@"; busy_pct=$2; shift ;;
        --busy-poll-secs) need_arg "$@"; busy_poll_secs=$2; shift ;;
        --busy-wait-secs) need_arg "$@"; busy_wait_secs=$2; shift ;;
        --out) need_arg "$@"; out=$2; shift ;;
        --no-build) build=0 ;;
        --report-only) report_only=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "backend-compare.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

die() { echo "backend-compare.sh: $*" >&2; exit 2; }
is_uint() { case "$1" in ''|*[!0-9]*) return 1 ;; *) return 0 ;; esac; }
for v in conns duration reps shards port lg_workers busy_pct busy_poll_secs busy_wait_secs uring_batch_wait_us; do
    is_uint "${!v}" || die "--${v//_/-} must be a whole number"
done
[ "$conns" -ge 2 ] || die "--conns must be at least 2"
if [ "$duration" -lt 1 ] || [ "$duration" -gt 600 ]; then die "--duration must be 1..600"; fi
if [ "$reps" -lt 1 ] || [ "$reps" -gt "$REPS_MAX" ]; then die "--reps must be 1..$REPS_MAX"; fi
[ "$busy_poll_secs" -ge 1 ] || die "--busy-poll-secs must be at least 1"
IFS=, read -r -a backends <<<"$backends_csv"
for b in "${backends[@]}"; do
    case "$b" in uring|poll) ;; *) die "--backends: '$b' is not uring or poll" ;; esac
done
IFS=, read -r -a rates <<<"$rates_csv"
if [ "${#rates[@]}" -lt 1 ] || [ "${#rates[@]}" -gt "$STEPS_MAX" ]; then die "--rates: 1..$STEPS_MAX steps"; fi
for r in "${rates[@]}"; do
    if ! is_uint "$r" || [ "$r" -lt 1 ]; then die "--rates: bad step '$r'"; fi
done

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
[ -n "$out" ] || out="$root/results/backend-compare"
mkdir -p "$out"
out=$(cd "$out" && pwd)

# ---- report (python, from raw/ only) ------------------------------------------------------
write_report() {
    python3 - "$out" <<'PY'
import glob, json, os, statistics, sys

out = sys.argv[1]
raw = os.path.join(out, "raw")
env = {}
if os.path.exists(os.path.join(out, "run.env")):
    for line in open(os.path.join(out, "run.env")):
        if "=" in line:
            k, v = line.rstrip("\n").split("=", 1)
            env.setdefault(k, v)

def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None

steps = []   # one dict per (rep, backend, rate)
for meta_path in sorted(glob.glob(os.path.join(raw, "rep*", "*", "rate-*.meta.json"))):
    meta = json.load(open(meta_path))
    lg_path = meta_path.replace(".meta.json", ".json")
    s = dict(rep=meta["rep"], backend=meta["backend"], rate=meta["rate"], ok=False,
             waited_s=meta["waited_s"], contended=meta["contended"],
             file=os.path.relpath(lg_path, out))
    hz = meta["clk_tck"]
    box_total = meta["box_ticks_after"][0] - meta["box_ticks_before"][0]
    box_idle = meta["box_ticks_after"][1] - meta["box_ticks_before"][1]
    srv_run = meta["server_ticks_after"] - meta["server_ticks_before"]
    if "server_stime_after" in meta and srv_run > 0:   # share of the server's CPU spent in the kernel
        s["srv_sys_pct"] = 100.0 * (meta["server_stime_after"] - meta["server_stime_before"]) / srv_run
    lg_run = meta["loadgen_ticks"]
    s["box_busy_pct"] = 100.0 * (box_total - box_idle) / box_total if box_total else None
    s["others_pct"] = (100.0 * max(0, box_total - box_idle - srv_run - lg_run) / box_total
                       if box_total else None)   # % of the whole box (all cores)
    s["others_before_pct_core"] = meta["others_before_pct_core"]
    s["others_during_pct_core"] = meta.get("others_during_pct_core")
    s["others_during_top"] = meta.get("others_during_top", "")
    s["polluted"] = meta.get("polluted", False)
    s["attempt"] = meta.get("attempt", 1)
    s["lg_exit"] = meta["loadgen_exit"]
    try:
        d = json.load(open(lg_path))
    except (OSError, ValueError):
        steps.append(s)
        continue
    ph = {p["phase"]: p for p in d.get("phases", [])}
    m = d["messages"]
    lat = d["latency_us"]
    chat = ph.get("chat")
    if chat is None:
        steps.append(s)
        continue
    drain_s = ph.get("drain", {}).get("seconds", 0.0)
    send_s = chat["seconds"]
    # Messages that arrived only in the final drain (after the window) do not count.
    in_window = m["delivered"] - m.get("delivered_late", 0)
    s["achieved"] = in_window / (send_s + drain_s) if send_s + drain_s > 0 else None
    s["sent_per_s"] = m["sent"] / send_s if send_s > 0 else None
    s["delivered"] = m["delivered"]
    s["lost"] = m["lost"]
    s["not_delivered_within_drain"] = m.get("not_delivered_within_drain", 0)
    s["refused"] = m["refused"]
    for k in ("ack", "deliver"):
        h = lat.get(k, {})
        s[k + "_p50"] = h.get("p50_us")
        s[k + "_p99"] = h.get("p99_us")
    # Server CPU over the chat phase (+ drain) from the sampler, interpolated.
    t0 = d["started_unix_ms"] / 1000.0 + chat["start_s"]
    t1 = t0 + send_s + drain_s
    samples = []
    spath = meta_path.replace(".meta.json", ".cpu.txt")
    if os.path.exists(spath):
        for line in open(spath):
            parts = line.split()
            if len(parts) == 2:
                samples.append((float(parts[0]), int(parts[1])))
    def at(t):
        if not samples or t < samples[0][0] or t > samples[-1][0]:
            return None
        for (ta, va), (tb, vb) in zip(samples, samples[1:]):
            if ta <= t <= tb:
                return va + (vb - va) * ((t - ta) / (tb - ta) if tb > ta else 0)
        return None
    c0, c1 = at(t0), at(t1)
    n = m["delivered"]
    if c0 is not None and c1 is not None and n:
        s["srv_us_per_msg"] = (c1 - c0) / hz * 1e6 / n
        s["srv_cores"] = (c1 - c0) / hz / (t1 - t0)
    else:
        s["srv_us_per_msg"] = s["srv_cores"] = None
    s["srv_us_per_msg_whole_run"] = srv_run / hz * 1e6 / n if n else None
    s["lg_us_per_msg"] = lg_run / hz * 1e6 / n if n else None
    s["ok"] = (m["lost"] == 0 and s["not_delivered_within_drain"] == 0 and s["achieved"] is not None
               and s["achieved"] >= 0.9 * s["rate"])
    steps.append(s)

backends = []
for s in steps:
    if s["backend"] not in backends:
        backends.append(s["backend"])
reps = sorted({s["rep"] for s in steps})

def table(b):
    rows = []
    for rate in sorted({s["rate"] for s in steps if s["backend"] == b}):
        ss = [s for s in steps if s["backend"] == b and s["rate"] == rate]
        row = dict(rate=rate, runs=len(ss), ok_runs=sum(1 for s in ss if s["ok"]))
        for k in ("achieved", "ack_p50", "ack_p99", "deliver_p50", "deliver_p99",
                  "srv_us_per_msg", "srv_us_per_msg_whole_run", "srv_cores",
                  "lg_us_per_msg", "box_busy_pct", "others_during_pct_core", "srv_sys_pct"):
            row[k] = med([s.get(k) for s in ss])
        row["lost"] = sum(s.get("lost", 0) or 0 for s in ss)
        row["contended_runs"] = sum(1 for s in ss if s["contended"] or s["polluted"])
        # A step counts only if every repetition reached it (a sweep stops when saturated).
        row["complete"] = len(ss) == len(reps)
        rows.append(row)
    return rows

def ceiling(rows, limit_us):
    best = None
    for r in rows:
        if (r["complete"] and r["ok_runs"] * 2 > r["runs"] and r["lost"] == 0
                and r["deliver_p99"] is not None and r["deliver_p99"] < limit_us):
            best = r
    return best

def rep_ceiling(b, rep, limit_us):
    best = None
    for s in sorted((s for s in steps if s["backend"] == b and s["rep"] == rep), key=lambda s: s["rate"]):
        if s["ok"] and s.get("deliver_p99") is not None and s["deliver_p99"] < limit_us:
            best = s
    return best

summary = dict(env=env, steps=steps, backends={}, ratios={})
for b in backends:
    rows = table(b)
    summary["backends"][b] = dict(
        table=rows,
        ceiling_1ms=ceiling(rows, 1000), ceiling_5ms=ceiling(rows, 5000),
        per_rep_ceiling_1ms={r: (lambda c: c and c["achieved"])(rep_ceiling(b, r, 1000)) for r in reps},
        per_rep_ceiling_5ms={r: (lambda c: c and c["achieved"])(rep_ceiling(b, r, 5000)) for r in reps},
        max_achieved=max((r["achieved"] or 0) for r in rows) if rows else None)

def ratio(a, b):
    return a / b if a and b else None

U, P = summary["backends"].get("uring"), summary["backends"].get("poll")
if U and P:
    for lim in ("1ms", "5ms"):
        cu, cp = U["ceiling_" + lim], P["ceiling_" + lim]
        summary["ratios"]["throughput_at_p99_" + lim] = ratio(cu and cu["achieved"], cp and cp["achieved"])
        summary["ratios"]["cpu_per_msg_at_ceiling_" + lim] = ratio(cu and cu["srv_us_per_msg"], cp and cp["srv_us_per_msg"])
    summary["ratios"]["max_achieved"] = ratio(U["max_achieved"], P["max_achieved"])
    # CPU per message at the same offered rate, where both delivered it in full.
    same = []
    pu = {r["rate"]: r for r in U["table"]}
    for r in P["table"]:
        u = pu.get(r["rate"])
        if u and r["complete"] and u["complete"] and r["ok_runs"] == r["runs"] and u["ok_runs"] == u["runs"]:
            same.append(dict(rate=r["rate"], poll=r["srv_us_per_msg"], uring=u["srv_us_per_msg"],
                             ratio=ratio(u["srv_us_per_msg"], r["srv_us_per_msg"])))
    summary["cpu_same_rate"] = same
    summary["ratios"]["cpu_per_msg_same_rate_median"] = med([x["ratio"] for x in same])
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1, default=str)

# ---- README ---------------------------------------------------------------------------
def f(x, nd=0, unit=""):
    if x is None:
        return "-"
    return (f"{x:,.{nd}f}" if nd else f"{x:,.0f}") + unit

def us(x):
    if x is None:
        return "-"
    return f"{x / 1000:,.2f} ms" if x >= 1000 else f"{x:,.0f} µs"

L = []
L.append("# uring vs poll under chat load (issue 4, \"Figures\")\n")
L.append("Produced by `scripts/backend-compare.sh`; every number below is computed from the "
         "files in `raw/` (re-run `scripts/backend-compare.sh --report-only` to recompute).\n")
L.append("## Setup\n")
L.append(f"- Box: {env.get('cpus', '?')} cores, kernel {env.get('kernel', '?')}, "
         f"{int(env.get('mem_total_kb', '0')) // 1048576} GiB; run started {env.get('date_utc', '?')}, "
         f"finished {env.get('date_end_utc', '?')}.")
L.append(f"- Server: `--shards {env.get('shards', '?')} --durability memory`, one fresh server per backend per repetition. "
         f"Load generator on the same box, same 2 cores, `--engine uring` (its default) for both backends, "
         f"`--workers {env.get('lg_workers', '0')}` (0 = one per core), {env.get('conns', '?')} connections, "
         f"{env.get('duration', '?')} s of sending per step, 32-byte bodies, random sender/recipient pairs.")
if env.get("pin", "0") == "1":
    L.append("- Pinned: the server on core 0, the load generator on core 1 (`taskset`), so the two do not "
             "compete for a core; other processes and the kernel's own work still run anywhere.")
if env.get("uring_batch_wait_us", "0") != "0":
    L.append(f"- The uring server ran with `--uring-batch-wait-us {env['uring_batch_wait_us']}` (completion batching).")
L.append(f"- {len(reps)} repetitions of the whole sweep; backend order alternates "
         f"({env.get('backends', '?')} first in odd repetitions). Figures are medians over repetitions. "
         "A sweep stops at its first saturated step (achieved < 90% of offered, a loss, or deliver p99 > 1 s).")
L.append("- Latency is the load generator's, from each message's *intended* send time (coordinated-omission safe): "
         "ACK = send->ACK from the server, DELIVER = send->DELIVER at the recipient.")
L.append("- Achieved = messages delivered / (sending phase + drain) seconds. Server CPU µs/msg = server utime+stime "
         "over the sending phase and drain (from a 0.1 s sampler of /proc/PID/stat, interpolated) / messages delivered; "
         "`whole run` also counts the 2000-connection ramp and the close (before/after the load-generator run); "
         "`server in kernel` is the stime share of that (recorded since the second version of the script). "
         "LG = the load generator's own CPU per message.")
L.append("")
L.append("## Exact commands\n")
L.append("```sh")
L.append(env.get("invocation", "scripts/backend-compare.sh"))
L.append("# which runs, per repetition and backend:")
L.append("cargo build --release -p tern -p tern-loadgen")
L.append(env.get("server_cmd_example", ""))
L.append(env.get("loadgen_cmd_example", ""))
L.append("```")
L.append("All commands as run are in `commands.txt`; the full log in `run.log`.\n")

L.append("## Headline\n")
if U and P:
    r = summary["ratios"]
    for lim in ("1ms", "5ms"):
        cu, cp = U["ceiling_" + lim], P["ceiling_" + lim]
        L.append(f"- Highest step with median deliver p99 < {lim[:-2]} ms: "
                 f"**uring {f(cu and cu['achieved'])} msgs/s** (offered {f(cu and cu['rate'])}), "
                 f"**poll {f(cp and cp['achieved'])} msgs/s** (offered {f(cp and cp['rate'])}); "
                 f"throughput ratio uring/poll = **{f(r['throughput_at_p99_' + lim], 2)}**"
                 f"; server CPU per message at those ceilings: uring {f(cu and cu['srv_us_per_msg'], 1)} µs, "
                 f"poll {f(cp and cp['srv_us_per_msg'], 1)} µs (ratio {f(r['cpu_per_msg_at_ceiling_' + lim], 2)}).")
        L.append(f"  Per-repetition ceilings ({lim[:-2]} ms), achieved msgs/s: uring "
                 + ", ".join(f(v) for v in U["per_rep_ceiling_" + lim].values())
                 + "; poll " + ", ".join(f(v) for v in P["per_rep_ceiling_" + lim].values()) + ".")
    L.append(f"- Server CPU per message at the same offered rate (steps both delivered in full in every "
             f"repetition), median of uring/poll: **{f(r['cpu_per_msg_same_rate_median'], 2)}** "
             "(below 1 = uring cheaper).")
    L.append(f"- Highest achieved rate at any latency: uring {f(U['max_achieved'])}, poll {f(P['max_achieved'])} "
             f"msgs/s (ratio {f(r['max_achieved'], 2)}).")
    t = r["throughput_at_p99_1ms"]
    if t is None:
        L.append("- **Target (uring >= 1.5x poll's msgs/s at p99 < 1 ms): not measurable here** -- at least one "
                 "backend never held deliver p99 under 1 ms on this box at the steps tried.")
    elif t >= 1.5:
        # A ratio of medians on a coarse step grid can come from one noisy
        # repetition; call it met only if every uring repetition beat every poll one.
        u_reps = [v or 0 for v in U["per_rep_ceiling_1ms"].values()]
        p_reps = [v or 0 for v in P["per_rep_ceiling_1ms"].values()]
        if u_reps and p_reps and min(u_reps) >= 1.5 * max(p_reps):
            L.append(f"- **Target (uring >= 1.5x poll at p99 < 1 ms): met on this box ({t:.2f}x), "
                     "in every pairing of repetitions.**")
        else:
            L.append(f"- **Target (uring >= 1.5x poll at p99 < 1 ms): NOT shown.** The ratio of medians is "
                     f"{t:.2f}x, but the per-repetition ceilings overlap (uring's lowest {f(min(u_reps))} "
                     f"< 1.5 x poll's highest {f(max(p_reps))}): noise on this step grid, not a difference.")
    else:
        L.append(f"- **Target (uring >= 1.5x poll at p99 < 1 ms): NOT met on this box ({t:.2f}x).** See the notes below.")
    if same:
        L.append("\nServer CPU µs/msg at equal offered rates:\n")
        L.append("| offered msgs/s | poll | uring | uring/poll |")
        L.append("|---:|---:|---:|---:|")
        for x in same:
            L.append(f"| {f(x['rate'])} | {f(x['poll'], 1)} | {f(x['uring'], 1)} | {f(x['ratio'], 2)} |")
L.append("")

for b in backends:
    B = summary["backends"][b]
    L.append(f"## {b}\n")
    L.append("| offered msgs/s | achieved msgs/s | ACK p50 | ACK p99 | DELIVER p50 | DELIVER p99 | server µs/msg | "
             "(whole run) | server in kernel | server cores | LG µs/msg | box busy | others (% of a core) | runs ok |")
    L.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in B["table"]:
        L.append(f"| {f(r['rate'])} | {f(r['achieved'])} | {us(r['ack_p50'])} | {us(r['ack_p99'])} | "
                 f"{us(r['deliver_p50'])} | {us(r['deliver_p99'])} | {f(r['srv_us_per_msg'], 1)} | "
                 f"{f(r['srv_us_per_msg_whole_run'], 1)} | {f(r.get('srv_sys_pct'), 0, '%')} | {f(r['srv_cores'], 2)} | {f(r['lg_us_per_msg'], 1)} | "
                 f"{f(r['box_busy_pct'], 0, '%')} | {f(r['others_during_pct_core'], 1)} | "
                 f"{r['ok_runs']}/{r['runs']}{'' if r['complete'] else ' (not every sweep got here)'}"
                 f"{' lost ' + str(r['lost']) if r['lost'] else ''}"
                 f"{' (' + str(r['contended_runs']) + ' run(s) overlapped others)' if r['contended_runs'] else ''} |")
    L.append("")

L.append("## Every run\n")
L.append("| rep | backend | offered | achieved | ACK p99 | DELIVER p50 | DELIVER p99 | server µs/msg | "
         "waited before | others before (% of a core) | others during (% of a core) | try | lg exit | file |")
L.append("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
for s in sorted(steps, key=lambda s: (s["rep"], s["backend"], s["rate"])):
    L.append(f"| {s['rep']} | {s['backend']} | {f(s['rate'])} | {f(s.get('achieved'))} | {us(s.get('ack_p99'))} | "
             f"{us(s.get('deliver_p50'))} | {us(s.get('deliver_p99'))} | {f(s.get('srv_us_per_msg'), 1)} | "
             f"{s['waited_s']} s{' (gave up waiting)' if s['contended'] else ''} | "
             f"{f(s['others_before_pct_core'], 1)} | {f(s.get('others_during_pct_core'), 1)} {s.get('others_during_top', '')}"
             f"{' **(overlapped)**' if s['polluted'] else ''} | {s['attempt']} | {s['lg_exit']} | `{s['file']}` |")
L.append("")
L.append("## How busy the box was\n")
waits = [s["waited_s"] for s in steps]
L.append(f"- Other engineers' benchmarks ran on this box during this run. Before every step the script waited "
         f"(checking every {env.get('busy_poll_secs', '?')} s, at most {env.get('busy_wait_secs', '?')} s) while "
         f"someone else's tern-loadgen was probably ramping (a connect/storm started under 60 s before, "
         f"any other under 10 s), or while all other user "
         f"processes together (tern, tern-loadgen, cargo, rustc, test binaries, ...) used {env.get('busy_pct', '?')}% of one core or more over 3 s. It also measured the "
         f"other processes' CPU during each step; a step they overlapped at {env.get('busy_pct', '?')}% of a core or "
         "more was measured again (at most 3 tries; the overlapped tries are kept in `raw/discarded/`).")
L.append(f"- Steps: {len(steps)}; total waited {sum(waits)} s; steps that waited: {sum(1 for w in waits if w > 0)}; "
         f"steps run although the box never went quiet: {sum(1 for s in steps if s['contended'])}.")
ot = [s.get("others_during_pct_core") for s in steps if s.get("others_during_pct_core") is not None]
if ot:
    L.append(f"- CPU of all other user processes during the kept steps, % of one core: median "
             f"{statistics.median(ot):.1f}, max {max(ot):.1f}; kept steps still overlapped: "
             f"{sum(1 for s in steps if s['polluted'])}; tries discarded and measured again: "
             f"{len(glob.glob(os.path.join(raw, 'discarded', '*', '*', '*.meta.json')))}.")
bb = [s.get("box_busy_pct") for s in steps if s.get("box_busy_pct") is not None]
if bb:
    L.append(f"- Whole box busy during the kept steps (all processes and kernel, % of both cores): median "
             f"{statistics.median(bb):.0f}%, max {max(bb):.0f}%.")
L.append("- `busy.log` has each check and the `ps aux --sort=-%cpu | head` seen before every step.")
L.append("")
notes = os.path.join(out, "NOTES.md")
if os.path.exists(notes):
    L.append(open(notes).read().rstrip() + "\n")
open(os.path.join(out, "README.md"), "w").write("\n".join(L) + "\n")
print(os.path.join(out, "README.md"))
PY
}

if [ "$report_only" = 1 ]; then
    [ -d "$out/raw" ] || die "no $out/raw to report on"
    write_report
    exit 0
fi

t_start=$(date +%s)
: >"$out/run.log"
: >"$out/busy.log"
log() { printf '[backend-compare %s] %s\n' "$(date -u +%H:%M:%S)" "$*" | tee -a "$out/run.log" >&2; }

# ---- state and cleanup ----------------------------------------------------------------
tmp="" server_pid="" lg_pid="" sampler_pid="" cleaned=0

stop_pid() {   # stop_pid PID SECS: TERM, wait up to SECS, then KILL
    local pid=$1 secs=$2 i
    [ -n "$pid" ] || return 0
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < secs * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null || true
}
cleanup() {
    [ "$cleaned" = 1 ] && return 0
    cleaned=1
    set +e
    stop_pid "$sampler_pid" 2; sampler_pid=""
    stop_pid "$lg_pid" 20; lg_pid=""
    stop_pid "$server_pid" 15; server_pid=""
    if [ -n "$tmp" ]; then rm -rf "$tmp"; tmp=""; fi
}
on_signal() {
    log "interrupted ($1): stopping what this script started"
    cleanup
    exit 130
}
trap cleanup EXIT
trap 'on_signal INT' INT
trap 'on_signal TERM' TERM
trap 'on_signal HUP' HUP

# ---- /proc readers ----------------------------------------------------------------------
clk_tck=$(getconf CLK_TCK)
# utime+stime of a process (all its threads); fields 14 and 15 of /proc/PID/stat
proc_ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat" 2>/dev/null || echo 0; }
proc_stime() { awk '{ sub(/^.*\) /, ""); print $13 }' "/proc/$1/stat" 2>/dev/null || echo 0; }   # kernel part
# cutime+cstime of this shell: CPU of the children it has waited for
children_ticks() { awk '{ sub(/^.*\) /, ""); print $14 + $15 }' "/proc/$$/stat"; }
# "total idle" ticks of the whole box (idle + iowait)
box_ticks() { awk '$1 == "cpu" { t = 0; for (i = 2; i <= NF; i++) t += $i; print t, $5 + $6 }' /proc/stat; }

# sampler PID FILE: "epoch_seconds ticks" of PID every 0.1 s until PID is gone or
# the sampler is stopped. Builtins only in the loop, apart from sleep.
sampler() {
    local pid=$1 file=$2 line rest
    local -a f
    while [ -r "/proc/$pid/stat" ]; do
        read -r line <"/proc/$pid/stat" || break
        rest=${line##*) }
        read -r -a f <<<"$rest"
        printf '%s %d\n' "$EPOCHREALTIME" "$((f[11] + f[12]))"
        sleep 0.1
    done >"$file"
}

# others_snapshot: "pid ticks comm" (utime+stime) of every user-space process that
# is not ours: not this shell or its children, not our server, not our load
# generator (a child of the `timeout` whose pid is lg_pid). Kernel threads
# (children of kthreadd, pid 2) are left out: their softirq work is anyone's.
others_snapshot() {
    local d pid line rest comm
    local -a f
    for d in /proc/[0-9]*; do
        pid=${d#/proc/}
        read -r line 2>/dev/null <"$d/stat" || continue
        comm=${line#*(}
        comm=${comm%) *}
        rest=${line##*) }
        read -r -a f <<<"$rest"
        if [ "$pid" = 2 ] || [ "${f[1]}" = 2 ]; then continue; fi
        case " $$ $server_pid $lg_pid " in *" $pid "* | *" ${f[1]} "*) continue ;; esac
        echo "$pid $((f[11] + f[12])) ${comm// /_}"
    done
}
# others_cpu FILE_A FILE_B SECS: "PCT | top..." -- others' CPU between two snapshots,
# in % of one core, then the biggest users (comm:pct). A process that started in
# between counts from 0; one that ended in between is missed.
others_cpu() {
    awk -v hz="$clk_tck" -v secs="$3" '
        NR == FNR { t[$1] = $2; next }
        { d = $2 - (($1 in t) ? t[$1] : 0); if (d > 0) { sum += d; by[$3] += d } }
        END {
            printf "%.1f |", 100 * sum / hz / secs
            for (c in by) if (100 * by[c] / hz / secs >= 2) printf " %s:%.0f%%", c, 100 * by[c] / hz / secs
            printf "\n"
        }' "$1" "$2"
}
# others_loadgen_ramping: names someone else's load generator that is probably
# still ramping up (its CPU is about to rise): a `connect` or `storm` started under
# 60 s ago (they open up to millions of connections), any other under 10 s ago.
# Empty if none. One running longer counts through its CPU alone.
others_loadgen_ramping() {
    local d pid comm line rest cmd up age
    local -a f
    read -r up _ </proc/uptime
    up=${up%.*}
    for d in /proc/[0-9]*; do
        pid=${d#/proc/}
        read -r comm 2>/dev/null <"$d/comm" || continue
        [ "$comm" = tern-loadgen ] || continue
        read -r line 2>/dev/null <"$d/stat" || continue
        rest=${line##*) }
        read -r -a f <<<"$rest"
        case " $lg_pid " in *" ${f[1]} "*) continue ;; esac
        age=$((up - f[19] / clk_tck))
        [ "$age" -lt 60 ] || continue
        cmd=$(tr '\0' ' ' 2>/dev/null <"$d/cmdline") || continue
        case " $cmd " in
            *" connect "* | *" storm "*) ;;
            *) [ "$age" -lt 10 ] || continue ;;
        esac
        echo "tern-loadgen $pid started ${age} s ago: ${cmd:0:100}"
        return 0
    done
}

# wait_quiet WHAT: wait (every --busy-poll-secs, at most --busy-wait-secs) until
# nobody else's load generator is ramping and all other user processes together
# use under --busy-pct % of one core over 3 s. Sets waited_s, contended, others_before.
wait_quiet() {
    local what=$1 start deadline reason p
    start=$(date +%s)
    deadline=$((start + busy_wait_secs))
    contended=0
    while :; do
        reason=$(others_loadgen_ramping)
        others_snapshot >"$tmp/snap-a"
        sleep 3
        others_snapshot >"$tmp/snap-b"
        p=$(others_cpu "$tmp/snap-a" "$tmp/snap-b" 3)
        {
            echo "== $(date -u +%H:%M:%S) $what: others at ${p%% *}% of a core (biggest:${p#*|}); ${reason:-no other load generator ramping}"
            ps aux --sort=-%cpu | head -8
        } >>"$out/busy.log"
        if [ -z "$reason" ] && awk -v p="${p%% *}" -v l="$busy_pct" 'BEGIN { exit !(p < l) }'; then break; fi
        if [ "$(date +%s)" -ge "$deadline" ]; then
            log "$what: box still busy after ${busy_wait_secs} s of waiting; running anyway (flagged)"
            contended=1
            break
        fi
        log "$what: busy (others at ${p%% *}% of a core, biggest:${p#*|}${reason:+; $reason}); waiting ${busy_poll_secs} s"
        sleep "$busy_poll_secs"
    done
    others_before=${p%% *}
    waited_s=$(($(date +%s) - start))
}
# ---- build -------------------------------------------------------------------------------
tmp=$(mktemp -d "${TMPDIR:-/tmp}/tern-bcompare.XXXXXX")
if [ "$build" = 1 ]; then
    log "building release binaries"
    built=0
    for attempt in 1 2 3; do   # src/ is edited by others: a mid-edit tree may not compile
        if (cd "$root" && timeout 900 cargo build --release -p tern -p tern-loadgen) >"$tmp/build.log" 2>&1; then
            built=1; break
        fi
        log "build attempt $attempt failed; retrying in 30 s"
        sleep 30
    done
    [ "$built" = 1 ] || { cat "$tmp/build.log" >&2; log "build failed"; exit 1; }
fi
# Private copies: someone else's rebuild must not swap binaries mid-run.
cp "$root/target/release/tern" "$root/target/release/tern-loadgen" "$tmp/"
tern="$tmp/tern" lg="$tmp/tern-loadgen"

if ss -Hltn "sport = :$port" | grep -q .; then
    die "port $port is in use on this host; pick --port"
fi

rm -rf "$out/raw"
mkdir -p "$out/raw"
export TERN_TOKEN_SECRET
TERN_TOKEN_SECRET=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')   # per-run secret, shared with the load generator

pin_server=() pin_lg=()
if [ "$pin" = 1 ]; then
    command -v taskset >/dev/null || die "--pin needs taskset (util-linux)"
    pin_server=(taskset -c 0) pin_lg=(taskset -c 1)
fi
server_cmd_for() {   # server_cmd_for BACKEND DIR: sets server_cmd
    server_cmd=("${pin_server[@]}" "$tern" serve --io "$1" --shards "$shards" --durability memory
        --listen "127.0.0.1:$port" --stats-socket "$2/s.sock" --data-dir "$2/d"
        --accept-rate-per-s-max 0
        # The abuse limits (docs/HARDENING.md) are off: this measures the
        # backends at rates one user and one address would not be allowed.
        --sends-per-s-max 0 --receipts-per-s-max 0 --addr-conns-per-s-max 0
        --addr-pending-max 0 --pending-max 0)
    if [ "$1" = uring ] && [ "$uring_batch_wait_us" != 0 ]; then
        server_cmd+=(--uring-batch-wait-us "$uring_batch_wait_us")
    fi
}
lg_args_for() {   # lg_args_for RATE: sets lg_args (without --json and --max-time)
    lg_args=(chat --server "127.0.0.1:$port" --conns "$conns" --rate 0 --workers "$lg_workers"
        --msg-rate "$1/s" --duration "${duration}s" --settle 1s --drain 10s --ping-every 0 --quiet)
}
server_cmd_for BACKEND "<tmp>"; lg_args_for RATE
{
    echo "invocation=$invocation"
    echo "date_utc=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host=$(hostname)"
    echo "kernel=$(uname -r)"
    echo "cpus=$(nproc)"
    echo "mem_total_kb=$(awk '$1 == "MemTotal:" { print $2 }' /proc/meminfo)"
    echo "backends=$backends_csv"
    echo "conns=$conns"
    echo "rates=$rates_csv"
    echo "duration=$duration"
    echo "reps=$reps"
    echo "shards=$shards"
    echo "lg_workers=$lg_workers"
    echo "uring_batch_wait_us=$uring_batch_wait_us"
    echo "pin=$pin"
    echo "busy_pct=$busy_pct"
    echo "busy_poll_secs=$busy_poll_secs"
    echo "busy_wait_secs=$busy_wait_secs"
    echo "tern_sha256=$(sha256sum "$tern" | cut -c1-16)"
    echo "loadgen_sha256=$(sha256sum "$lg" | cut -c1-16)"
    echo "server_cmd_example=${pin_server[*]}${pin_server[*]:+ }target/release/tern ${server_cmd[*]:$((${#pin_server[@]} + 1))}"
    echo "loadgen_cmd_example=${pin_lg[*]}${pin_lg[*]:+ }target/release/tern-loadgen ${lg_args[*]} --max-time <duration+60s> --json raw/rep<K>/<backend>/rate-<RATE>.json"
} >"$out/run.env"
echo "# every command as run (binaries are private copies of target/release/*)" >"$out/commands.txt"
echo "cargo build --release -p tern -p tern-loadgen" >>"$out/commands.txt"

stats_field() { "$tern" stats --socket "$1" show info 2>/dev/null | awk -v k="$2:" '$1 == k { print $2 }'; }
server_alive() { [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; }

# ---- the sweeps ---------------------------------------------------------------------------
lg_max_s=$((duration + 60))
for ((rep = 1; rep <= reps; rep++)); do
    order=("${backends[@]}")
    if ((rep % 2 == 0)); then
        order=()
        for ((i = ${#backends[@]} - 1; i >= 0; i--)); do order+=("${backends[i]}"); done
    fi
    for b in "${order[@]}"; do
        dir="$out/raw/rep$rep/$b"
        mkdir -p "$dir"
        sdir="$tmp/srv-$rep-$b"
        mkdir -p "$sdir"
        server_cmd_for "$b" "$sdir"
        echo "${server_cmd[*]}" >>"$out/commands.txt"
        "${server_cmd[@]}" >"$dir/server.log" 2>&1 &
        server_pid=$!
        for ((i = 0; i < 100; i++)); do
            server_alive || break
            [ -n "$(stats_field "$sdir/s.sock" Conns)" ] && break
            sleep 0.1
        done
        server_alive || { cat "$dir/server.log" >&2; log "server ($b) exited at start-up"; exit 1; }
        running=$(stats_field "$sdir/s.sock" Backend)
        log "rep $rep/$reps: server $b pid $server_pid (reports backend '${running:-?}')"
        echo "$running" >"$dir/backend.txt"

        high_p99=0
        for rate in "${rates[@]}"; do
            if [ $(($(date +%s) - t_start)) -ge $((6 * 3600)) ]; then
                log "run past 6 h: stopping"; break 3
            fi
            name="$dir/rate-$rate"
            lg_args_for "$rate"
            for ((attempt = 1; attempt <= ATTEMPTS_MAX; attempt++)); do
                server_alive || break
                wait_quiet "rep $rep $b $rate/s"
                echo "${lg##*/} ${lg_args[*]} --max-time ${lg_max_s}s --json ${name#"$out"/}.json" >>"$out/commands.txt"
                sampler "$server_pid" "$name.cpu.txt" &
                sampler_pid=$!
                others_snapshot >"$tmp/step-a"
                s0=$(proc_ticks "$server_pid"); k0=$(children_ticks); read -r bt0 bi0 < <(box_ticks)
                y0=$(proc_stime "$server_pid")
                w0=$EPOCHREALTIME
                rc=0
                timeout --kill-after=15 "$((lg_max_s + 30))" "${pin_lg[@]}" "$lg" "${lg_args[@]}" --max-time "${lg_max_s}s" \
                    --json "$name.json" >"$name.out" 2>"$name.err" &
                lg_pid=$!
                wait "$lg_pid" || rc=$?
                s1=$(proc_ticks "$server_pid"); k1=$(children_ticks); read -r bt1 bi1 < <(box_ticks)
                y1=$(proc_stime "$server_pid")
                w1=$EPOCHREALTIME
                others_snapshot >"$tmp/step-b"
                lg_pid=""
                stop_pid "$sampler_pid" 2; sampler_pid=""
                wall=$(awk -v a="$w0" -v b="$w1" 'BEGIN { printf "%.3f", b - a }')
                during=$(others_cpu "$tmp/step-a" "$tmp/step-b" "$wall")
                polluted=false
                if ! awk -v p="${during%% *}" -v l="$busy_pct" 'BEGIN { exit !(p < l) }'; then polluted=true; fi
                cat >"$name.meta.json" <<JSON
{"rep": $rep, "backend": "$b", "rate": $rate, "conns": $conns, "duration_s": $duration,
 "clk_tck": $clk_tck, "server_pid": $server_pid, "wall_s": $wall, "attempt": $attempt,
 "server_ticks_before": $s0, "server_ticks_after": $s1, "loadgen_ticks": $((k1 - k0)),
 "server_stime_before": $y0, "server_stime_after": $y1,
 "box_ticks_before": [$bt0, $bi0], "box_ticks_after": [$bt1, $bi1],
 "waited_s": $waited_s, "contended": $([ "$contended" = 1 ] && echo true || echo false),
 "others_before_pct_core": $others_before,
 "others_during_pct_core": ${during%% *}, "others_during_top": "${during#*| }",
 "polluted": $polluted, "loadgen_exit": $rc}
JSON
                # Delivered within the drain window: late ones arrived only in the final drain.
                line=$(jq -r '[((.messages.delivered // 0) - (.messages.delivered_late // 0)), (.messages.lost // 0),
                    (.latency_us.deliver.p50_us // 0), (.latency_us.deliver.p99_us // 0),
                    ([.phases[] | select(.phase == "chat" or .phase == "drain") | .seconds] | add // 0),
                    (.messages.not_delivered_within_drain // 0)] | @tsv' \
                    "$name.json" 2>/dev/null || echo "")
                read -r delivered lost dp50 dp99 secs overdue <<<"${line:-0 0 0 0 0 0}"
                ach=$(awk -v n="${delivered:-0}" -v s="${secs:-0}" 'BEGIN { printf "%d", ((s > 0) ? n / s : 0) }')
                log "rep $rep $b $rate/s (try $attempt): exit $rc, achieved $ach/s, deliver p50 ${dp50}us p99 ${dp99}us, lost $lost, not delivered within the drain window $overdue, server $(((s1 - s0) * 1000 / clk_tck)) ms CPU; others during: ${during%% *}% of a core (biggest:${during#*|})"
                if [ "$polluted" = true ] && [ "$attempt" -lt "$ATTEMPTS_MAX" ]; then
                    # Someone else's work overlapped this step: keep the files aside, measure again.
                    mkdir -p "$out/raw/discarded/rep$rep/$b"
                    for f in "$name".*; do
                        bn=${f##*/}
                        mv "$f" "$out/raw/discarded/rep$rep/$b/${bn/rate-$rate/rate-$rate.try$attempt}"
                    done
                    log "rep $rep $b $rate/s: others used ${during%% *}% of a core during the step; measuring it again"
                    continue
                fi
                break
            done
            server_alive || { log "server $b died at rate $rate (see $dir/server.log)"; break; }
            if [ "$rc" -ne 0 ] && [ "$rc" -ne 1 ]; then
                log "load generator exit $rc (see ${name#"$out"/}.err); stopping this sweep"; break
            fi
            # Saturated: not delivered at 90% of the offered rate, a loss, messages
            # not delivered within the drain window, or deliver p99 above 1 s at two
            # steps in a row (one alone can be a stall of the box).
            if [ "${dp99:-0}" -gt "$SAT_P99_US" ]; then high_p99=$((high_p99 + 1)); else high_p99=0; fi
            if [ "${lost:-0}" != 0 ] || [ "${overdue:-0}" != 0 ] || [ "$ach" -lt $((rate * SAT_ACHIEVED_PCT / 100)) ] || [ "$high_p99" -ge 2 ]; then
                log "rep $rep $b: saturated at $rate/s; sweep ends here"; break
            fi
        done
        stop_pid "$server_pid" 15
        server_pid=""
        rm -rf "$sdir"
    done
done
echo "date_end_utc=$(date -u +%Y-%m-%dT%H:%M:%SZ)" >>"$out/run.env"
log "sweeps done in $(($(date +%s) - t_start)) s; writing the report"
write_report
