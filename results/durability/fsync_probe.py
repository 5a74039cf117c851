#!/usr/bin/env python3
"""fdatasync latency of the disk under DIR (default /tmp): 200 appends of
200 bytes, each followed by fdatasync, like a group commit of one message."""
import os, sys, time
path = os.path.join(sys.argv[1] if len(sys.argv) > 1 else "/tmp", "fsync_probe")
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
ts = []
for _ in range(200):
    os.write(fd, b"x" * 200)
    t = time.perf_counter()
    os.fdatasync(fd)
    ts.append(time.perf_counter() - t)
os.close(fd)
os.remove(path)
ts.sort()
print(f"fdatasync p50 {ts[100] * 1e3:.2f} ms  p90 {ts[180] * 1e3:.2f} ms  "
      f"p99 {ts[198] * 1e3:.2f} ms  max {ts[-1] * 1e3:.2f} ms")
