"""Medians per (server, concurrency, batch) from tessera-loadgen JSON lines on stdin."""
import json
import statistics
import sys
from collections import defaultdict

runs = defaultdict(list)
for line in sys.stdin:
    line = line.strip()
    if not line.startswith("{"):
        continue
    r = json.loads(line)
    server = r["label"].split()[0]
    runs[(server, r["concurrency"], r["batch"])].append(r)

print("| server | concurrency | texts/request | req/s | embeddings/s | p50 ms | p99 ms | errors | runs |")
print("|---|---|---|---|---|---|---|---|---|")
for (server, c, b), rs in sorted(runs.items(), key=lambda kv: (kv[0][2], kv[0][1], kv[0][0])):
    med = lambda k: statistics.median(x[k] for x in rs)
    print(f"| {server} | {c} | {b} | {med('req_per_s'):.1f} | {med('embeddings_per_s'):.1f} "
          f"| {med('p50_ms'):.1f} | {med('p99_ms'):.1f} | {sum(x['errors'] for x in rs)} | {len(rs)} |")
