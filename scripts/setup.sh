#!/usr/bin/env bash
# Installs what the tests need on a fresh machine. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
rustup component add clippy rustfmt >/dev/null 2>&1 || true
bash scripts/fetch-models.sh
# nvcc 13.0 from PyPI for the runtime's CUDA build check in .ci/run (into .cache/cuda).
bash inference-runtime/scripts/cuda-check.sh install

# Manifest checks (scripts/check-manifests.sh): kubectl with its built-in kustomize, and the
# Kubernetes OpenAPI schemas for offline validation.
if ! command -v kubectl >/dev/null; then
  echo "setup: kubectl is required (it renders manifests/ with its built-in kustomize)." >&2
  echo "setup: install it from https://kubernetes.io/docs/tasks/tools/ and run this again." >&2
  exit 1
fi
KUBERNETES_VALIDATE_VERSION=1.37.0
if [ "$(python3 -c 'import kubernetes_validate.version as v; print(v.__version__)' 2>/dev/null)" != "$KUBERNETES_VALIDATE_VERSION" ]; then
  python3 -m pip install --quiet --disable-pip-version-check "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
fi

# Headless Chromium (Debian's package) for the dashboard's browser test; installed only when missing.
if ! command -v chromium >/dev/null 2>&1; then
  sudo=""
  if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then sudo="sudo"; fi
  if command -v apt-get >/dev/null 2>&1; then
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
  else
    echo "setup: chromium is missing and apt-get is not available; the dashboard browser test needs it" >&2
  fi
fi

# containerd (with ctr and runc) and skopeo (Debian's packages) for scripts/check-images.sh, which
# imports and runs the images scripts/build-images.sh writes; installed only when missing.
if ! command -v containerd >/dev/null 2>&1 || ! command -v skopeo >/dev/null 2>&1; then
  sudo=""
  if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then sudo="sudo"; fi
  if command -v apt-get >/dev/null 2>&1; then
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq containerd skopeo >/dev/null
  else
    echo "setup: containerd or skopeo is missing and apt-get is not available; scripts/check-images.sh needs them" >&2
  fi
fi

# Kubernetes server binaries, etcd and the kubelet node's packages for the real-cluster test.
bash scripts/setup-k8s.sh
