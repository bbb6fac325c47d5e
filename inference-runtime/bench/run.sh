#!/usr/bin/env bash
# Side-by-side benchmark of tessera-runtime and the Python baseline (docs/benchmarks.md).
# Needs: the model cache (scripts/fetch-models.sh) and PYTHON pointing at an interpreter with
# sentence-transformers, fastapi and uvicorn. Loopback only; bounded request counts.
set -euo pipefail
cd "$(dirname "$0")/../.."
cache="${TESSERA_MODEL_CACHE:-$PWD/.cache/models}"
PYTHON="${PYTHON:-python3}"
runs="${RUNS:-1}"
cargo build --release --locked -p tessera-runtime --bins
bin="${CARGO_TARGET_DIR:-target}/release"
export RAYON_NUM_THREADS=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 RUST_LOG=warn

wait_ready() { for _ in $(seq 600); do curl -sf "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done; return 1; }

matrix() { # label port
  for r in $(seq "$runs"); do
    for c in 1 8 32; do
      "$bin/tessera-loadgen" --url "http://127.0.0.1:$2" --requests $((c == 1 ? 300 : 1000)) \
        --concurrency "$c" --batch 1 --label "$1 run=$r"
    done
    for b in 1 32; do
      "$bin/tessera-loadgen" --url "http://127.0.0.1:$2" --requests $((b == 1 ? 300 : 60)) \
        --concurrency 1 --batch "$b" --label "$1 run=$r"
    done
  done
}

"$bin/tessera-runtime" --model-dir "$cache/minilm" --model-name minilm --listen 127.0.0.1:8000 &
rt=$!
trap 'kill $rt 2>/dev/null || true' EXIT
wait_ready http://127.0.0.1:8000/health/ready
matrix tessera 8000
kill -TERM $rt; wait $rt || true

"$PYTHON" inference-runtime/bench/baseline.py "$cache/minilm" --port 8001 &
py=$!
trap 'kill $py 2>/dev/null || true' EXIT
# The baseline has no readiness route; a first embedding answers once the model is loaded.
for _ in $(seq 600); do
  curl -sf -H 'content-type: application/json' -d '{"model":"minilm","input":"x"}' \
    http://127.0.0.1:8001/v1/embeddings >/dev/null 2>&1 && break
  sleep 0.2
done
matrix python 8001
kill $py; wait $py 2>/dev/null || true
