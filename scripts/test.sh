#!/usr/bin/env bash
# The project's test command (the README names it): the set-up, then every test, with the
# Kubernetes binaries the set-up unpacked as KUBEBUILDER_ASSETS. TESSERA_SKIP_SETUP=1 skips the
# set-up (.ci/run has just run it).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${TESSERA_SKIP_SETUP:-}" ]; then
  bash scripts/setup.sh
fi
K8S_CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/tessera/k8s-v1.36.2"
if [ -z "${KUBEBUILDER_ASSETS:-}" ] && [ -x "$K8S_CACHE/kube-apiserver" ]; then
  export KUBEBUILDER_ASSETS="$K8S_CACHE"
fi
cargo test --workspace --locked
