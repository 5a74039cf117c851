#!/usr/bin/env python3
"""Time `tern serve` from exec to `listening on` on an existing data dir.

recovery.py DATA_DIR RUNS [--cold]
  --cold: before each run, write back and evict the log files from the page
          cache (fsync + posix_fadvise DONTNEED on each file: no global
          drop_caches), so the replay reads from disk.
Prints one line per run and each shard's `store recovered:` line.
"""
import os, subprocess, sys, time, pathlib, tempfile, statistics

root = pathlib.Path(__file__).resolve().parents[2]
tern = root / "target/release/tern"
data, runs, cold = pathlib.Path(sys.argv[1]), int(sys.argv[2]), "--cold" in sys.argv
log_bytes = sum(f.stat().st_size for f in data.glob("shard-*/*.log"))
gib = log_bytes / 2**30

def evict():
    for f in data.glob("shard-*/*"):
        fd = os.open(f, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)

times = []
for run in range(runs):
    if cold:
        evict()
    sock = tempfile.mktemp(prefix="tern-rec-", suffix=".sock")
    t0 = time.monotonic()
    p = subprocess.Popen([str(tern), "serve", "--io", "poll", "--shards", "2",
                          "--listen", "127.0.0.1:0", "--data-dir", str(data),
                          "--stats-socket", sock],
                         stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                         env=dict(os.environ, RUST_LOG="info"))
    recovered = []
    for line in p.stderr:
        if "store recovered:" in line:
            recovered.append(line.strip().split("] ", 1)[-1])
        if "listening on" in line:
            t = time.monotonic() - t0
            break
    else:
        sys.exit("tern serve exited before listening")
    rss = next((l.split()[1] for l in open(f"/proc/{p.pid}/status") if l.startswith("VmRSS")), "?")
    p.terminate()
    p.communicate(timeout=60)
    times.append(t)
    print(f"run {run + 1} ({'cold' if cold else 'warm'} cache): {log_bytes / 2**20:.0f} MiB of log, "
          f"listening after {t:.3f} s = {t / gib:.2f} s/GiB, RSS {int(rss) // 1024} MiB")
    for r in recovered:
        print("   ", r)
print(f"median: {statistics.median(times):.3f} s = {statistics.median(times) / gib:.2f} s/GiB")
