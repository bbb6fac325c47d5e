"""Tables for docs/benchmarks.md from run.sh's JSON lines on stdin: medians with the spread over
runs, each server's ratio to the baseline measured in the same round, memory, accuracy, load."""
import json
import statistics
import sys
from collections import defaultdict

BASELINE = "python"
runs = defaultdict(list)  # (server, concurrency, batch) -> [result]
by_round = defaultdict(dict)  # (concurrency, batch, round) -> server -> result
memory, accuracy, load, multi = [], [], [], None
for line in sys.stdin:
    line = line.strip()
    if not line.startswith("{"):
        continue
    r = json.loads(line)
    if "uptime" in r:
        load.append(r)
    elif "memory" in r:
        memory.append(r)
    elif "accuracy" in r:
        accuracy.append(r)
    elif "multi_model_process" in r:
        multi = r["multi_model_process"]
    elif "label" in r:
        server, rnd = r["label"].split()
        runs[(server, r["concurrency"], r["batch"])].append(r)
        by_round[(r["concurrency"], r["batch"], rnd)][server] = r


def spread(xs, fmt="{:.1f}"):
    med = statistics.median(xs)
    return f"{fmt.format(med)} ({fmt.format(min(xs))}–{fmt.format(max(xs))})" if len(xs) > 1 else fmt.format(med)


print("| server | concurrency | texts/request | req/s | embeddings/s | p50 ms | p99 ms | errors | runs |")
print("|---|---|---|---|---|---|---|---|---|")
for (server, c, b), rs in sorted(runs.items(), key=lambda kv: (kv[0][2], kv[0][1], kv[0][0])):
    med = lambda k: statistics.median(x[k] for x in rs)
    print(f"| {server} | {c} | {b} | {spread([x['req_per_s'] for x in rs])} "
          f"| {spread([x['embeddings_per_s'] for x in rs])} | {med('p50_ms'):.1f} | {med('p99_ms'):.1f} "
          f"| {sum(x['errors'] for x in rs)} | {len(rs)} |")

print()
print(f"Ratio to `{BASELINE}` in the same round (embeddings/s; median, min–max over rounds):")
print()
print("| server | concurrency 32, 1 text | concurrency 1, 32 texts |")
print("|---|---|---|")
servers = sorted({s for (s, _, _) in runs if s != BASELINE})
for s in servers:
    cells = []
    for c, b in [(32, 1), (1, 32)]:
        ratios = [
            v[s]["embeddings_per_s"] / v[BASELINE]["embeddings_per_s"]
            for (cc, bb, _), v in by_round.items()
            if (cc, bb) == (c, b) and s in v and BASELINE in v and v[BASELINE]["embeddings_per_s"] > 0
        ]
        cells.append(spread(ratios, "{:.2f}×") if ratios else "—")
    print(f"| {s} | {cells[0]} | {cells[1]} |")

if memory:
    print()
    print("| server (one model) | RSS after the load, MiB | peak RSS, MiB |")
    print("|---|---|---|")
    for m in memory:
        print(f"| {m['memory']} | {m['rss_kib'] / 1024:.0f} | {m['peak_kib'] / 1024:.0f} |")
if multi:
    print()
    print(f"One process serving {', '.join(r['name'] for r in multi['index'])}: "
          f"RSS {multi['rss_kib'] / 1024:.0f} MiB; reservations: "
          + ", ".join(f"{r['name']} {r['memory_bytes'] / 2**20:.0f} MiB" for r in multi["index"] if r.get("memory_bytes")))
if accuracy:
    print()
    print("| server | texts | min cosine to sentence-transformers | mean cosine | max abs diff |")
    print("|---|---|---|---|---|")
    for a in accuracy:
        print(f"| {a['accuracy']} | {a['texts']} | {a['min_cosine']:.6f} | {a['mean_cosine']:.6f} | {a['max_abs_diff']:.2e} |")
if load:
    print()
    print("Load (`uptime` before each round and at the end):")
    for l in load:
        print(f"- round {l['round']}: {l['uptime']}")
