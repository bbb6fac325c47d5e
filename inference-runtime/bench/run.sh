#!/usr/bin/env bash
# Interleaved benchmark of the embedding servers (docs/benchmarks.md): sentence-transformers behind
# FastAPI (the baseline), tessera-runtime on candle, on ONNX Runtime fp32 and, when PYTHON can
# quantize, on ONNX Runtime int8. All servers run at once, idle but for the one being measured;
# each round measures every server in a rotated order, so load changes on the machine hit all of
# them alike. Prints JSON lines (loadgen results, `uptime` before each round, memory, accuracy) for
# summarize.py.
#
# Needs: the model cache (scripts/fetch-models.sh) and PYTHON pointing at an interpreter with
# sentence-transformers, fastapi, uvicorn and onnx (and onnxruntime for the int8 variant).
# Loopback only; bounded request counts. Knobs: RUNS (rounds), SERVERS (subset of candle ort-fp32
# ort-fp32-padded ort-int8), LOADS (see below), MULTI=0 skips the multi-model memory step.
set -euo pipefail
cd "$(dirname "$0")/../.."
cache="${TESSERA_MODEL_CACHE:-$PWD/.cache/models}"
PYTHON="${PYTHON:-python3}"
runs="${RUNS:-3}"
cargo build --release --locked -p tessera-runtime --bins >&2
bin="${CARGO_TARGET_DIR:-target}/release"
export RAYON_NUM_THREADS=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 RUST_LOG=warn
ort_lib="$cache/onnxruntime/libonnxruntime.so.1.31.1"

# The set-up's ONNX graph runs dense ops on the real tokens only (packed); the previous graph,
# every op on the padded grid, is written beside it for comparison (PYTHON needs onnx).
if [[ ! -f "$cache/minilm-onnx-padded/export.json" ]]; then
  "$PYTHON" inference-runtime/tools/bert_to_onnx.py "$cache/minilm" "$cache/minilm-onnx-padded" --padded >&2
fi
# int8: ONNX Runtime's dynamic quantization of the padded fp32 graph's MatMuls (weights int8,
# activations quantized per batch), written once beside it.
if [[ ! -f "$cache/minilm-onnx-int8/model.onnx" ]] && "$PYTHON" -c 'import onnxruntime.quantization' 2>/dev/null; then
  "$PYTHON" inference-runtime/bench/quantize_int8.py "$cache/minilm-onnx-padded" "$cache/minilm-onnx-int8" >&2
fi

pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done' EXIT
declare -A port pid
start_runtime() { # label port model-dir [flags...]
  local label=$1 p=$2 dir=$3
  shift 3
  "$bin/tessera-runtime" --model "name=minilm,dir=$dir" --listen "127.0.0.1:$p" "$@" &
  pid[$label]=$!
  pids+=($!)
  port[$label]=$p
}
# SERVERS picks a subset (the baseline, python, always runs).
want="${SERVERS:-candle ort-fp32 ort-fp32-padded ort-int8}"
wants() { [[ " $want " == *" $1 "* ]]; }
servers=(python)
ort=(--ort-library "$ort_lib" --ort-threads 1)
if wants candle; then start_runtime candle 8002 "$cache/minilm" && servers+=(candle); fi
if wants ort-fp32; then start_runtime ort-fp32 8003 "$cache/minilm-onnx" "${ort[@]}" && servers+=(ort-fp32); fi
if wants ort-fp32-padded; then
  start_runtime ort-fp32-padded 8006 "$cache/minilm-onnx-padded" "${ort[@]}" && servers+=(ort-fp32-padded)
fi
if wants ort-int8 && [[ -f "$cache/minilm-onnx-int8/model.onnx" ]]; then
  start_runtime ort-int8 8004 "$cache/minilm-onnx-int8" "${ort[@]}" && servers+=(ort-int8)
fi
"$PYTHON" inference-runtime/bench/baseline.py "$cache/minilm" --port 8001 &
pid[python]=$!
pids+=($!)
port[python]=8001

# Every server answers a first embedding once its model is loaded.
for s in "${servers[@]}"; do
  for _ in $(seq 900); do
    curl -sf -H 'content-type: application/json' -d '{"model":"minilm","input":"x"}' \
      "http://127.0.0.1:${port[$s]}/v1/embeddings" >/dev/null 2>&1 && break
    sleep 0.2
  done
done

uptime_json() { printf '{"uptime": "%s", "round": "%s"}\n' "$(uptime | sed 's/^ *//')" "$1"; }

# LOADS: "concurrency texts/request requests" settings, ';'-separated.
IFS=';' read -ra loads <<<"${LOADS:-32 1 1000;1 32 60}"
for r in $(seq "$runs"); do
  uptime_json "$r"
  n=${#servers[@]}
  for cfg in "${loads[@]}"; do
    read -r c b req <<<"$cfg"
    for k in $(seq 0 $((n - 1))); do
      s=${servers[$(((k + r) % n))]}
      "$bin/tessera-loadgen" --url "http://127.0.0.1:${port[$s]}" --requests "$req" \
        --concurrency "$c" --batch "$b" --label "$s run=$r"
    done
  done
done
uptime_json end

# Resident memory of each server process (one model each) after the load.
for s in "${servers[@]}"; do
  rss=$(awk '/^VmRSS/ {print $2}' "/proc/${pid[$s]}/status")
  hwm=$(awk '/^VmHWM/ {print $2}' "/proc/${pid[$s]}/status")
  printf '{"memory": "%s", "rss_kib": %s, "peak_kib": %s}\n' "$s" "$rss" "$hwm"
done

# Accuracy of each server against sentence-transformers in this process, same texts.
urls=()
for s in "${servers[@]}"; do urls+=("$s=http://127.0.0.1:${port[$s]}"); done
"$PYTHON" inference-runtime/bench/accuracy.py "$cache/minilm" "${urls[@]}"

[[ "${MULTI:-1}" == 1 ]] || exit 0

# Memory per model inside one process: the same embedders and the chat model served together,
# RSS after one request to each, beside each model's reservation (its plan).
for s in "${servers[@]}"; do kill "${pid[$s]}" 2>/dev/null || true; wait "${pid[$s]}" 2>/dev/null || true; done
multi=(--model "name=candle,dir=$cache/minilm" --model "name=ort-fp32,dir=$cache/minilm-onnx")
[[ -f "$cache/minilm-onnx-int8/model.onnx" ]] && multi+=(--model "name=ort-int8,dir=$cache/minilm-onnx-int8")
multi+=(--model "name=chat,dir=$cache/smollm2")
"$bin/tessera-runtime" "${multi[@]}" --ort-library "$ort_lib" --ort-threads 1 --listen 127.0.0.1:8005 &
mp=$!
pids+=($mp)
for _ in $(seq 900); do curl -sf http://127.0.0.1:8005/health/ready >/dev/null 2>&1 && break; sleep 0.2; done
for m in candle ort-fp32 ort-int8; do
  curl -sf -H 'content-type: application/json' -d "{\"model\":\"$m\",\"input\":[\"a warm-up text\"]}" \
    http://127.0.0.1:8005/v1/embeddings >/dev/null 2>&1 || true
done
curl -sf -H 'content-type: application/json' \
  -d '{"model":"chat","max_tokens":8,"temperature":0,"messages":[{"role":"user","content":"hi"}]}' \
  http://127.0.0.1:8005/v1/chat/completions >/dev/null
printf '{"multi_model_process": {"rss_kib": %s, "index": %s}}\n' \
  "$(awk '/^VmRSS/ {print $2}' "/proc/$mp/status")" \
  "$(curl -sf -X POST http://127.0.0.1:8005/v2/repository/index)"
kill -TERM "$mp"
wait "$mp" 2>/dev/null || true
