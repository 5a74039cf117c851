#!/usr/bin/env python3
"""Medians of the key=value lines burst.sh / queued.sh print, per group.

median.py FILE...   groups lines by their non-numeric keys (durability, held)
"""
import re, statistics, sys, collections

groups = collections.defaultdict(lambda: collections.defaultdict(list))
for path in sys.argv[1:]:
    for line in open(path):
        kv = dict(re.findall(r"(\w+)=([\w.]+)", line))
        if not kv or ("rss_before_kib" not in kv and "rss_per_msg_b" not in kv
                      and "listening_after_s" not in kv):
            continue
        key = tuple((k, v) for k, v in kv.items() if k in ("durability", "held"))
        for k, v in kv.items():
            try:
                groups[key][k].append(float(v))
            except ValueError:
                pass
for key, vals in groups.items():
    print(" ".join(f"{k}={v}" for k, v in key) or "all",
          " ".join(f"{k}={statistics.median(v):g}(n={len(v)})" for k, v in vals.items()))
