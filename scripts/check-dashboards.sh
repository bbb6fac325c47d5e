#!/usr/bin/env bash
# Every metric name a Grafana dashboard panel, an alert rule or an autoscaling example queries must
# be one the tessera binaries really export. The exported names are read from the binaries
# themselves: each one is built, started on loopback without a cluster, and its /metrics scraped.
# A binary not in this workspace is reported as NOT CHECKED (its names are listed) instead of
# failing; a binary that is here but cannot be started or scraped fails the check.
set -euo pipefail
cd "$(dirname "$0")/.."

files=(manifests/components/monitoring/dashboards/*.json
       manifests/components/monitoring/prometheusrule.yaml
       manifests/examples/runtime-keda.yaml
       manifests/examples/runtime-hpa.yaml)
work="$(mktemp -d)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/exported"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

in_workspace() { cargo metadata --no-deps --format-version 1 --offline 2>/dev/null |
  python3 -c 'import json,sys; sys.exit(0 if sys.argv[1] in {p["name"] for p in json.load(sys.stdin)["packages"]} else 1)' "$1"; }

# scrape BINARY URL READY_URL: waits up to 60 s for READY_URL, then stores BINARY's names.
scrape() {
  local bin="$1" url="$2" ready="$3" pid="$4"
  for _ in $(seq 1 120); do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "check-dashboards: $bin exited before it served $ready; its log:" >&2
      cat "$work/$bin.log" >&2
      exit 1
    fi
    curl -fsS "$ready" >/dev/null 2>&1 && break
    sleep 0.5
  done
  curl -fsS "$url" >"$work/$bin.metrics" || { echo "check-dashboards: scraping $url failed" >&2; cat "$work/$bin.log" >&2; exit 1; }
  python3 scripts/dashboard-metrics.py exported "$work/$bin.metrics" >"$work/exported/$bin.txt"
}

# start PACKAGE BINARY ARGS...: builds and starts BINARY in the background; prints its pid.
# TESSERA_BIN_DIR: use the binaries already built there (CI passes the tests' target/debug: a
# plain `cargo build` resolves other features than `cargo test` and would rebuild the tree).
if [ -n "${TESSERA_BIN_DIR:-}" ]; then
  bindir="$TESSERA_BIN_DIR"
  build() { [ -x "$bindir/$2" ] || { echo "check-dashboards: $bindir/$2 is missing (cargo build -p $1, or unset TESSERA_BIN_DIR)" >&2; exit 1; }; }
else
  build() { cargo build --quiet --locked -p "$1" --bin "$2"; }
  bindir="$(cargo metadata --no-deps --format-version 1 --offline | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/debug"
fi

# wait_for URL NAME PID: waits up to 30 s until the exposition at URL has a sample of NAME.
wait_for() {
  for _ in $(seq 1 60); do
    kill -0 "$3" 2>/dev/null || { echo "check-dashboards: the process serving $1 exited" >&2; return 1; }
    curl -fsS "$1" 2>/dev/null | grep "^$2[{ ]" >/dev/null && return 0
    sleep 0.5
  done
  echo "check-dashboards: $1 never showed $2" >&2
  return 1
}

# Node agent: fake GPUs and no Kubernetes. Labelled series exist only once something happened,
# so make each happen: a spec that creates a MIG instance (ops, instances), one device plugin
# Allocate call over its unix socket with no matching pod (allocations{result="no_assignment"}),
# then an unreadable spec (failures).
if in_workspace tessera-mig-manager; then
  curl -V | grep -w HTTP2 >/dev/null || { echo "check-dashboards: curl without HTTP/2 cannot call the device plugin" >&2; exit 1; }
  build tessera-mig-manager tessera-mig-manager
  port="$(free_port)"
  mkdir -p "$work/dp"
  echo '{"gpus":[{"index":0,"mode":"mig","instances":[{"profile":"3g.40gb","start":0}]}]}' >"$work/spec.json"
  "$bindir/tessera-mig-manager" --node-name dashboards-check --backend fake --fake-gpus h100x2:mig \
    --standalone --spec-file "$work/spec.json" --device-plugin-dir "$work/dp" \
    --metrics-addr "127.0.0.1:$port" --resync-secs 1 >"$work/tessera-mig-manager.log" 2>&1 &
  pid=$!
  pids+=("$pid")
  metrics="http://127.0.0.1:$port/metrics"
  wait_for "$metrics" tessera_node_mig_instance_info "$pid"
  # AllocateRequest{container_requests: [{devices_ids: ["x"]}]} in a gRPC frame.
  printf '\x00\x00\x00\x00\x05\x0a\x03\x0a\x01x' |
    curl -sS --http2-prior-knowledge --unix-socket "$work/dp/tessera-gpu.sock" -H 'content-type: application/grpc' \
      -H 'te: trailers' --data-binary @- -o /dev/null http://localhost/v1beta1.DevicePlugin/Allocate
  wait_for "$metrics" tessera_node_allocations_total "$pid"
  echo 'not a spec' >"$work/spec.json"
  wait_for "$metrics" tessera_node_reconcile_failures_total "$pid"
  scrape tessera-mig-manager "$metrics" "http://127.0.0.1:$port/status" "$pid"
else
  echo "tessera-mig-manager is not in this workspace yet" >"$work/exported/tessera-mig-manager.missing"
fi

# Scheduler: the in-memory demo cluster, same metrics as live mode.
if in_workspace tessera-scheduler; then
  build tessera-scheduler tessera-scheduler
  port="$(free_port)"
  "$bindir/tessera-scheduler" --demo --listen "127.0.0.1:$port" >"$work/tessera-scheduler.log" 2>&1 &
  pid=$!
  pids+=("$pid")
  metrics="http://127.0.0.1:$port/metrics"
  wait_for "$metrics" tessera_leader "$pid"
  # Per-verb series exist once a verb was called: send the extender's recorded kube-scheduler
  # requests (the demo cluster holds their pods and nodes).
  wire=scheduler/extender/tests/fixtures/wire
  for verb in filter prioritize preempt bind; do
    args="$wire/$verb-args.json"
    [ "$verb" = prioritize ] && args="$wire/filter-args.json"
    curl -fsS -o /dev/null -H 'content-type: application/json' --data-binary "@$args" "http://127.0.0.1:$port/$verb" ||
      { echo "check-dashboards: POST /$verb with $args failed" >&2; cat "$work/tessera-scheduler.log" >&2; exit 1; }
  done
  wait_for "$metrics" tessera_decisions_total "$pid"
  scrape tessera-scheduler "$metrics" "http://127.0.0.1:$port/readyz" "$pid"
else
  echo "tessera-scheduler is not in this workspace yet" >"$work/exported/tessera-scheduler.missing"
fi

# Inference runtime: the MiniLM test model from the model cache (scripts/fetch-models.sh).
if in_workspace tessera-runtime; then
  models="${TESSERA_MODEL_CACHE:-$PWD/.cache/models}"
  if [ ! -d "$models/minilm" ]; then
    echo "check-dashboards: $models/minilm is missing; run scripts/fetch-models.sh" >&2
    exit 1
  fi
  build tessera-runtime tessera-runtime
  port="$(free_port)"
  "$bindir/tessera-runtime" --model-dir "$models/minilm" --model-name minilm --listen "127.0.0.1:$port" \
    >"$work/tessera-runtime.log" 2>&1 &
  pids+=($!)
  scrape tessera-runtime "http://127.0.0.1:$port/metrics" "http://127.0.0.1:$port/health/ready" $!
else
  echo "tessera-runtime is not in this workspace yet" >"$work/exported/tessera-runtime.missing"
fi

python3 scripts/dashboard-metrics.py check "$work/exported" "${files[@]}"

# The check must be able to fail: a dashboard querying a name no binary exports is rejected.
for bin in tessera-mig-manager tessera-scheduler tessera-runtime; do
  [ -f "$work/exported/$bin.txt" ] || continue
  bogus="$(head -n1 "$work/exported/$bin.txt")_not_exported"
  printf '{"panels":[{"targets":[{"expr":"rate(%s[5m])"}]}],"templating":{"list":[]}}\n' "$bogus" >"$work/bogus.json"
  if python3 scripts/dashboard-metrics.py check "$work/exported" "$work/bogus.json" >/dev/null; then
    echo "check-dashboards: a dashboard querying $bogus passed" >&2
    exit 1
  fi
  echo "rejected as expected: $bogus"
  break
done
echo "check-dashboards: ok"
