#!/usr/bin/env python3
"""Checks that every metric a Grafana panel or an alert queries is one a tessera binary exports.

  dashboard-metrics.py queried FILE...          print the metric names FILEs query, one a line
  dashboard-metrics.py exported EXPOSITION      print the sample names a /metrics text exposes
  dashboard-metrics.py check EXPORTED_DIR FILE...
        EXPORTED_DIR holds <binary>.txt (names the binary exported, one a line) or
        <binary>.missing (one line: why the binary could not be run). Fails when a queried name
        belongs to a binary that ran and is not exported by it, or belongs to no binary at all.

FILEs are Grafana dashboard JSON (every panel "expr" and query variable) or YAML with PromQL
under "expr" or "query" keys (PrometheusRule, KEDA ScaledObject) or HPA custom metric names.
"""

import json
import os
import re
import sys

import yaml

# Which binary exports a name, by prefix; the first match wins.
OWNERS = [
    ("tessera_node_", "tessera-mig-manager"),
    ("tessera_runtime:", "tessera-runtime"),
    ("nv_inference_", "tessera-runtime"),
    ("tessera_", "tessera-scheduler"),
]
# Series Prometheus itself makes for every target.
PROMETHEUS_BUILTIN = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}

FUNCTIONS_AND_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or", "unless",
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values", "group",
    "inf", "nan", "e",
}

IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def promql_metrics(expr):
    """Metric names in a PromQL expression (no full parser: strings, label matchers, ranges and
    grouping clauses are removed first, then identifiers not followed by '(' are names)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"'(?:[^'\\]|\\.)*'", "''", s)
    s = re.sub(r"\{[^}]*\}", "", s)
    s = re.sub(r"\[[^\]]*\]", "", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", s)
    s = re.sub(r"\$\{?\w+\}?", "", s)
    names = set()
    for m in IDENT.finditer(s):
        word = m.group(0)
        rest = s[m.end():].lstrip()
        if rest.startswith("("):
            continue  # a function call or aggregation
        if word.lower() in FUNCTIONS_AND_KEYWORDS or re.fullmatch(r"\d.*", word):
            continue
        # Numbers such as 1e6 are matched as "e6"-less idents only when they start with a letter.
        if m.start() > 0 and (s[m.start() - 1].isdigit() or s[m.start() - 1] == "."):
            continue
        names.add(word)
    return names


def template_metrics(query):
    m = re.match(r"\s*label_values\(\s*([^,)]+)", query)
    if m:
        return promql_metrics(m.group(1))
    m = re.match(r"\s*query_result\((.*)\)\s*$", query)
    if m:
        return promql_metrics(m.group(1))
    return set()


def walk(node, fn):
    if isinstance(node, dict):
        for k, v in node.items():
            fn(k, v)
            walk(v, fn)
    elif isinstance(node, list):
        for v in node:
            walk(v, fn)


def queried(path):
    """{metric name: [where it is queried]} for one dashboard or rules file."""
    found = {}

    def add(names, where):
        for n in names:
            found.setdefault(n, []).append(where)

    with open(path) as f:
        if path.endswith(".json"):
            dash = json.load(f)
            panels_exprs = []
            walk(dash.get("panels", []), lambda k, v: panels_exprs.append(v) if k == "expr" and isinstance(v, str) else None)
            for e in panels_exprs:
                add(promql_metrics(e), f"{os.path.basename(path)}: {e[:90]}")
            for var in dash.get("templating", {}).get("list", []):
                if var.get("type") != "query":
                    continue
                q = var.get("query")
                q = q.get("query", "") if isinstance(q, dict) else (q or "")
                add(template_metrics(q), f"{os.path.basename(path)}: variable {var.get('name')}: {q[:80]}")
            return found
        docs = [d for d in yaml.safe_load_all(f) if d]
    exprs = []
    for d in docs:
        walk(d, lambda k, v: exprs.append(v) if k in ("expr", "query") and isinstance(v, str) else None)
    for e in exprs:
        add(promql_metrics(e), f"{os.path.basename(path)}: {e[:90]}")
    # An HPA's Pods/Object metric served by prometheus-adapter under the series' own name.
    for d in docs:
        if d.get("kind") == "HorizontalPodAutoscaler":
            for m in d.get("spec", {}).get("metrics", []):
                name = (m.get("pods") or m.get("object") or {}).get("metric", {}).get("name")
                if name:
                    add({name}, f"{os.path.basename(path)}: HPA metric {name}")
    return found


def exported(text):
    """Sample names a text exposition (Prometheus or OpenMetrics) offers to queries."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            parts = line.split()
            if len(parts) < 4:
                continue
            name, typ = parts[2], parts[3]
            if typ == "counter":
                names.add(name if name.endswith("_total") else name + "_total")
            elif typ in ("histogram", "gaugehistogram"):
                names.update({name + "_bucket", name + "_sum", name + "_count"})
            elif typ == "summary":
                names.update({name, name + "_sum", name + "_count"})
            elif typ == "info":
                names.add(name + "_info")
            else:
                names.add(name)
        elif line and not line.startswith("#"):
            m = IDENT.match(line)
            if m:
                names.add(m.group(0))
    return names


def owner(name):
    for prefix, binary in OWNERS:
        if name.startswith(prefix):
            return binary
    return None


def check(exported_dir, files):
    wanted = {}
    for p in files:
        for n, where in queried(p).items():
            wanted.setdefault(n, []).extend(where)
    if not wanted:
        print("check-dashboards: no metric names found in the queries; the extraction is broken")
        return 1
    have, missing = {}, {}
    for f in sorted(os.listdir(exported_dir)):
        binary, ext = os.path.splitext(f)
        with open(os.path.join(exported_dir, f)) as fh:
            if ext == ".txt":
                have[binary] = {ln.strip() for ln in fh if ln.strip()}
            elif ext == ".missing":
                missing[binary] = fh.read().strip()
    problems, unchecked, checked = [], {}, 0
    for n in sorted(wanted):
        if n in PROMETHEUS_BUILTIN:
            continue
        b = owner(n)
        if b is None:
            problems.append(f"{n}: no tessera binary exports this prefix ({wanted[n][0]})")
        elif b in have:
            checked += 1
            if n not in have[b]:
                problems.append(f"{n}: not exported by {b} (queried in {wanted[n][0]})")
        elif b in missing:
            unchecked.setdefault(b, []).append(n)
        else:
            problems.append(f"{n}: {b} was neither run nor reported missing")
    for b, names in sorted(unchecked.items()):
        print(f"NOT CHECKED: {len(names)} name(s) of {b}: {missing[b]}")
        for n in names:
            print(f"  {n}")
    for b in sorted(have):
        print(f"{b}: {len(have[b])} exported names")
    print(f"checked {checked} queried name(s) against the binaries that ran")
    for p in problems:
        print(f"ERROR {p}")
    return 1 if problems else 0


def main():
    cmd = sys.argv[1]
    if cmd == "queried":
        names = set()
        for p in sys.argv[2:]:
            names.update(queried(p))
        print("\n".join(sorted(names)))
        return 0
    if cmd == "exported":
        with open(sys.argv[2]) as f:
            print("\n".join(sorted(exported(f.read()))))
        return 0
    if cmd == "check":
        return check(sys.argv[2], sys.argv[3:])
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main())
