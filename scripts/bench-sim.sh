#!/usr/bin/env bash
# Times one openb replay (`tessera-sim openb ... --seeds 42`) per policy with a release build and
# prints seconds per run. The trace folder (with openb_node_list_gpu_node.csv and the pod lists)
# is the first argument or $TESSERA_TRACE_DIR.
#
#   scripts/bench-sim.sh [TRACE_DIR]
#   POLICIES="tessera fgd" TRACE=multigpu30 RUNS=5 scripts/bench-sim.sh /data/openb
#
# Uses hyperfine when it is installed, otherwise /usr/bin/time (or the shell's time).
set -euo pipefail
cd "$(dirname "$0")/.."

dir="${1:-${TESSERA_TRACE_DIR:-}}"
[ -n "$dir" ] || { echo "bench-sim: give the trace folder as an argument or in TESSERA_TRACE_DIR" >&2; exit 2; }
nodes="$dir/openb_node_list_gpu_node.csv"
pods="$dir/openb_pod_list_${TRACE:-default}.csv"
for f in "$nodes" "$pods"; do
  [ -f "$f" ] || { echo "bench-sim: $f not found" >&2; exit 2; }
done
policies=(${POLICIES:-tessera fgd bestfit})
runs="${RUNS:-3}"

cargo build --release -q -p tessera-sim
bin=./target/release/tessera-sim
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

echo "trace $(basename "$pods"), seed 42, $runs runs per policy"
printf '%-16s %10s %10s\n' policy "s/run" "cpu s/run"
for p in "${policies[@]}"; do
  cmd=("$bin" openb --nodes "$nodes" --pods "$pods" --policy "$p" --seeds 42)
  if command -v hyperfine >/dev/null; then
    hyperfine -N --style none --warmup 1 --runs "$runs" --export-json "$work/$p.json" \
      "$(printf '%q ' "${cmd[@]}")" >/dev/null
    read -r wall cpu < <(python3 -c 'import json,sys; r=json.load(open(sys.argv[1]))["results"][0]; print(r["mean"], r["user"])' "$work/$p.json")
  else
    wall=0 cpu=0
    for _ in $(seq "$runs"); do
      if [ -x /usr/bin/time ]; then
        /usr/bin/time -f '%e %U' -o "$work/t" "${cmd[@]}" >/dev/null
      else
        { TIMEFORMAT='%R %U'; time "${cmd[@]}" >/dev/null; } 2>"$work/t"
      fi
      read -r w u <"$work/t"
      wall=$(python3 -c "print($wall + $w)") cpu=$(python3 -c "print($cpu + $u)")
    done
    wall=$(python3 -c "print($wall / $runs)") cpu=$(python3 -c "print($cpu / $runs)")
  fi
  printf '%-16s %10.2f %10.2f\n' "$p" "$wall" "$cpu"
done
