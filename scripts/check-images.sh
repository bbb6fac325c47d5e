#!/usr/bin/env bash
# Checks the archives scripts/build-images.sh wrote: skopeo reads each as OCI and as docker
# archive, a throwaway containerd (its own root, state and socket under a temporary directory;
# the machine's containerd, if any, is not touched) imports them with `ctr images import`, runs
# each entrypoint with --version on a read-only root filesystem as the image's user, and serves
# the test models with the runtime image until its startup and readiness probes answer.
# Needs root, containerd + ctr + runc (Debian: containerd) and skopeo; models from
# scripts/fetch-models.sh.
set -euo pipefail
# Pipelines end in `grep >/dev/null`, not `grep -q`: -q exits at the first match, and the
# writer's SIGPIPE then fails the whole pipeline under pipefail.
cd "$(dirname "$0")/.."

target_dir="$(cargo metadata --format-version 1 --no-deps --locked | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
dir="${TESSERA_IMAGE_DIR:-$target_dir/images}"
repo="${TESSERA_IMAGE_REPO:-ghcr.io/tessera-sched}"
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)"
tag="${TESSERA_IMAGE_TAG:-v$version}"
models="${TESSERA_MODEL_CACHE:-$PWD/.cache/models}"
names=(tessera-scheduler tessera-mig-manager tessera-runtime)

fail() { echo "check-images: $*" >&2; exit 1; }
for tool in containerd ctr runc skopeo; do
  command -v "$tool" >/dev/null || fail "$tool is not installed (Debian: apt-get install containerd skopeo)"
done
[ "$(id -u)" -eq 0 ] || fail "containerd needs root"
# containerd 1.6's shims, runc and ctr keep their sockets, state and fifos under /run/containerd
# whatever the config says: run in a private mount namespace with tmpfs there (over /run when
# the host has no /run/containerd, so nothing is created on the host), which vanishes with it.
if [ -z "${TESSERA_CHECK_IMAGES_MOUNT_NS:-}" ]; then
  exec env TESSERA_CHECK_IMAGES_MOUNT_NS=1 unshare --mount --propagation slave bash "$PWD/scripts/check-images.sh" "$@"
fi
if [ -d /run/containerd ]; then mount -n -t tmpfs tmpfs /run/containerd; else mount -n -t tmpfs tmpfs /run; fi
for n in "${names[@]}"; do [ -f "$dir/$n.tar" ] || fail "$dir/$n.tar is missing (bash scripts/build-images.sh)"; done
[ -f "$models/minilm-onnx/model.onnx" ] || fail "$models/minilm-onnx is missing (bash scripts/fetch-models.sh)"

for n in "${names[@]}"; do
  ref="$repo/$n:$tag"
  skopeo inspect "oci-archive:$dir/$n.tar:$ref" | python3 -c '
import json, sys
i = json.load(sys.stdin)
need = ["version", "revision", "licenses", "created", "source", "title"]
missing = [k for k in need if not i["Labels"].get("org.opencontainers.image." + k)]
sys.exit(f"missing labels: {missing}" if missing else 0)' || fail "$n: labels"
  skopeo inspect --config "docker-archive:$dir/$n.tar" >/dev/null || fail "$n: skopeo cannot read it as a docker archive"
done
echo "check-images: skopeo reads all three (oci-archive and docker-archive), labels present"

work="$(mktemp -d /tmp/tessera-containerd.XXXXXX)"
cleanup() {
  if [ -f "$work/pid" ]; then
    local c=(ctr --address "$work/c.sock" -n k8s.io)
    if "${c[@]}" task ls -q 2>/dev/null | grep -x t-runtime >/dev/null; then
      "${c[@]}" task kill -s KILL t-runtime >/dev/null 2>&1 || true
      for _ in $(seq 1 50); do "${c[@]}" task ls 2>/dev/null | grep "^t-runtime .*RUNNING" >/dev/null || break; sleep 0.1; done
      "${c[@]}" task delete t-runtime >/dev/null 2>&1 || true
    fi
    "${c[@]}" containers rm t-runtime >/dev/null 2>&1 || true
    kill "$(cat "$work/pid")" 2>/dev/null || true
    wait "$(cat "$work/pid")" 2>/dev/null || true
  fi
  rm -rf "$work" 2>/dev/null || true
}
trap cleanup EXIT
cat >"$work/config.toml" <<EOF
version = 2
root = "$work/root"
state = "$work/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$work/c.sock"
[ttrpc]
  address = "$work/c.sock.ttrpc"
EOF
containerd --config "$work/config.toml" >"$work/containerd.log" 2>&1 &
echo $! >"$work/pid"
c=(ctr --address "$work/c.sock" -n k8s.io)
for _ in $(seq 1 50); do "${c[@]}" version >/dev/null 2>&1 && break; sleep 0.2; done
"${c[@]}" version >/dev/null 2>&1 || { tail -20 "$work/containerd.log" >&2; fail "the throwaway containerd did not start"; }

for n in "${names[@]}"; do
  "${c[@]}" images import "$dir/$n.tar" >/dev/null || fail "ctr images import $n.tar failed"
  for ref in "$repo/$n:$tag" "docker.io/library/$n:dev"; do
    "${c[@]}" images ls -q | grep -xF "$ref" >/dev/null || fail "$n.tar did not import as $ref"
  done
  out="$("${c[@]}" run --rm --read-only "$repo/$n:$tag" "check-$n" "/usr/local/bin/$n" --version 2>&1)" ||
    fail "$n --version in its image failed: $out"
  [ "$out" = "$n $version" ] || fail "$n --version printed '$out'"
  echo "check-images: $n imports as $repo/$n:$tag and $n:dev and runs ($out)"
done

# The runtime as its Deployment runs it: read-only root, the image's user, models from a
# read-only mount, ONNX Runtime from the image (engine=ort) and candle beside it.
port=18931
"${c[@]}" run -d --read-only --net-host \
  --mount "type=bind,src=$models,dst=/models,options=rbind:ro" \
  "$repo/tessera-runtime:$tag" t-runtime /usr/local/bin/tessera-runtime \
  --model name=embed,dir=/models/minilm-onnx,engine=ort --model name=minilm,dir=/models/minilm \
  --listen "127.0.0.1:$port" >/dev/null
ok=""
for _ in $(seq 1 150); do
  if curl -sf "http://127.0.0.1:$port/health/ready" >/dev/null; then ok=1; break; fi
  sleep 0.2
done
[ -n "$ok" ] || fail "the runtime image did not become ready on 127.0.0.1:$port"
curl -sf "http://127.0.0.1:$port/health/startup" >/dev/null || fail "runtime startup probe"
curl -sf "http://127.0.0.1:$port/health/live" >/dev/null || fail "runtime liveness probe"
curl -sf "http://127.0.0.1:$port/v2/models/embed" | grep '"engine":"ort"' >/dev/null || fail "the ORT model is not served"
curl -sf -X POST "http://127.0.0.1:$port/v1/embeddings" -H 'content-type: application/json' \
  -d '{"model":"embed","input":"hello"}' | grep '"embedding"' >/dev/null || fail "no embedding from the ORT model"
user="$("${c[@]}" containers info t-runtime | python3 -c 'import json,sys; u=json.load(sys.stdin)["Spec"]["process"]["user"]; print(u["uid"], u["gid"])')"
[ "$user" = "65532 65532" ] || fail "the runtime ran as uid/gid $user, not 65532"
echo "check-images: tessera-runtime image serves (ORT + candle) as 65532, probes answer"
echo "check-images: ok"
