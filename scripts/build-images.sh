#!/usr/bin/env bash
# Builds the container images of tessera-scheduler, tessera-mig-manager and tessera-runtime as
# image archives (OCI layout + docker manifest.json in one tar), offline: no container engine, no
# registry, no base image. Each image is FROM scratch: the binary (debug info stripped), the shared
# libraries it links (glibc, libgcc_s; libstdc++ for ONNX Runtime), a minimal /etc and labels.
#
#   bash scripts/build-images.sh [NAME...]       NAME: tessera-scheduler tessera-mig-manager tessera-runtime
#                                                (the default), or kube-scheduler
#
# kube-scheduler is the upstream binary (static) in an image of its own, for clusters without a
# registry (the real-kubelet suite runs manifests/base's scheduler Deployment with it): from
# $KUBEBUILDER_ASSETS/kube-scheduler (scripts/setup-k8s.sh), references
# registry.k8s.io/kube-scheduler:<its version> and kube-scheduler:dev.
#
# Environment:
#   TESSERA_BIN_DIR     use the binaries already built there (e.g. target/debug) instead of
#                       `cargo build --release`
#   TESSERA_IMAGE_DIR   where the archives go (default target/images)
#   TESSERA_IMAGE_REPO  registry/namespace of the references (default ghcr.io/tessera-sched)
#   TESSERA_IMAGE_TAG   tag (default v<workspace version>, what manifests/base names)
#   TESSERA_ORT_LIBRARY libonnxruntime.so for the runtime image (default: the one
#                       scripts/fetch-models.sh unpacks into .cache/models/onnxruntime)
#
# Each archive carries two references: REPO/NAME:TAG (manifests/base and the production overlay
# run it as written) and NAME:dev (the kind-dev overlay). Import: docs/quickstart.md.
set -euo pipefail
cd "$(dirname "$0")/.."

all=(tessera-scheduler tessera-mig-manager tessera-runtime)
names=("$@")
[ ${#names[@]} -gt 0 ] || names=("${all[@]}")
for n in "${names[@]}"; do
  case " ${all[*]} kube-scheduler " in *" $n "*) ;; *) echo "build-images: unknown image $n (one of: ${all[*]} kube-scheduler)" >&2; exit 1 ;; esac
done

target_dir="$(cargo metadata --format-version 1 --no-deps --locked | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
out="${TESSERA_IMAGE_DIR:-$target_dir/images}"
repo="${TESSERA_IMAGE_REPO:-ghcr.io/tessera-sched}"
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)"
tag="${TESSERA_IMAGE_TAG:-v$version}"
source_url="$(sed -n 's/^repository = "\(.*\)"$/\1/p' Cargo.toml | head -n1)"
licence="$(sed -n 's/^license = "\(.*\)"$/\1/p' Cargo.toml | head -n1)"
if revision="$(git rev-parse HEAD 2>/dev/null)"; then
  git diff --quiet HEAD -- 2>/dev/null || revision="$revision-dirty"
  epoch="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct)}"
else
  revision=unknown
  epoch="${SOURCE_DATE_EPOCH:-0}"
fi

if [ -n "${TESSERA_BIN_DIR:-}" ]; then
  bin_dir="$TESSERA_BIN_DIR"
else
  packages=()
  for n in "${names[@]}"; do [ "$n" = kube-scheduler ] || packages+=(-p "$n"); done
  [ ${#packages[@]} -eq 0 ] || cargo build --release --locked "${packages[@]}"
  bin_dir="$target_dir/release"
fi

ort_lib="${TESSERA_ORT_LIBRARY:-${TESSERA_MODEL_CACHE:-$PWD/.cache/models}/onnxruntime/libonnxruntime.so.1.31.1}"

mkdir -p "$out"
for n in "${names[@]}"; do
  if [ "$n" = kube-scheduler ]; then
    bin="${KUBEBUILDER_ASSETS:-}/kube-scheduler"
    [ -n "${KUBEBUILDER_ASSETS:-}" ] && [ -x "$bin" ] \
      || { echo "build-images: no kube-scheduler in KUBEBUILDER_ASSETS='${KUBEBUILDER_ASSETS:-}' (scripts/setup-k8s.sh)" >&2; exit 1; }
    # `Kubernetes v1.36.2`
    k8s_version="$("$bin" --version | awk '{print $2}')"
    [[ "$k8s_version" == v* ]] || { echo "build-images: $bin --version printed '$k8s_version'" >&2; exit 1; }
    # Static: no libraries. Non-root; the Deployment mounts its configuration and an emptyDir /tmp.
    python3 scripts/oci-image.py --output "$out/$n.tar" \
      --ref "registry.k8s.io/kube-scheduler:$k8s_version" --ref "kube-scheduler:dev" --epoch "$epoch" \
      --elf "$bin=/usr/local/bin/kube-scheduler" --entrypoint /usr/local/bin/kube-scheduler \
      --user 65532:65532 --port 10259/tcp \
      --label "org.opencontainers.image.title=kube-scheduler" \
      --label "org.opencontainers.image.version=$k8s_version" \
      --label "org.opencontainers.image.licenses=Apache-2.0" \
      --label "org.opencontainers.image.source=https://github.com/kubernetes/kubernetes" \
      --label "org.opencontainers.image.description=upstream kube-scheduler, packaged offline by tessera's build-images.sh"
    continue
  fi
  bin="$bin_dir/$n"
  [ -x "$bin" ] || { echo "build-images: $bin is missing (cargo build -p $n, or unset TESSERA_BIN_DIR)" >&2; exit 1; }
  common=(
    --output "$out/$n.tar" --ref "$repo/$n:$tag" --ref "$n:dev" --epoch "$epoch" --strip
    --elf "$bin=/usr/local/bin/$n" --entrypoint "/usr/local/bin/$n"
    --file "LICENSE=/usr/share/doc/tessera/LICENSE"
    --label "org.opencontainers.image.title=$n"
    --label "org.opencontainers.image.version=$version"
    --label "org.opencontainers.image.revision=$revision"
    --label "org.opencontainers.image.licenses=$licence"
    --label "org.opencontainers.image.source=$source_url"
    --label "org.opencontainers.image.created=$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)"
  )
  case "$n" in
    tessera-scheduler)
      # Non-root; talks only to the API server, verified with the ServiceAccount's ca.crt.
      extra=(--user 65532:65532 --port 8889/tcp
        --label "org.opencontainers.image.description=tessera kube-scheduler extender (run beside kube-scheduler)")
      ;;
    tessera-mig-manager)
      # Root: its device-plugin socket lives in kubelet's root-owned directory. NVML
      # (libnvidia-ml.so.1) comes from the host driver at run time (docs/operations.md).
      # libnvidia-ml.so.1 needs glibc's compatibility sonames, which the binary itself does not.
      extra=(--user 0:0 --port 9400/tcp
        --system-lib libdl.so.2 --system-lib libpthread.so.0 --system-lib librt.so.1
        --label "org.opencontainers.image.description=tessera node agent: NVML, MIG, kubelet device plugin")
      ;;
    tessera-runtime)
      # Non-root. ONNX Runtime (engine=ort) is loaded at run time: it is in the image with its
      # licence; models are not (they come from a volume, see docs/runtime.md).
      [ -f "$ort_lib" ] || { echo "build-images: $ort_lib is missing (bash scripts/fetch-models.sh, or set TESSERA_ORT_LIBRARY)" >&2; exit 1; }
      ort_dir="$(dirname "$ort_lib")"
      extra=(--user 65532:65532 --port 8000/tcp
        --elf "$ort_lib=/usr/local/lib/libonnxruntime.so.1.31.1"
        --env ORT_DYLIB_PATH=/usr/local/lib/libonnxruntime.so.1.31.1
        --label "org.opencontainers.image.description=tessera inference runtime (candle and ONNX Runtime, CPU build)")
      for f in LICENSE ThirdPartyNotices.txt; do
        [ -f "$ort_dir/$f" ] && extra+=(--file "$ort_dir/$f=/usr/share/doc/onnxruntime/$f")
      done
      ;;
  esac
  python3 scripts/oci-image.py "${common[@]}" "${extra[@]}"
done
for n in "${names[@]}"; do printf 'build-images: %s %s bytes\n' "$out/$n.tar" "$(stat -c %s "$out/$n.tar")"; done
