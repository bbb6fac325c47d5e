#!/usr/bin/env bash
# Set-up for the real-cluster suite (e2e/). Idempotent; prints the KUBEBUILDER_ASSETS folder on its
# last line when the binaries are there.
set -euo pipefail
cd "$(dirname "$0")/.."

# Kubernetes v1.36.2 server binaries for the real-cluster suite (e2e/): unpacked from
# ../shared/k8s (or $TESSERA_K8S_ARCHIVE) into a cache, checked against SHA256SUMS, with Debian's
# etcd beside them (the envtest layout: one folder, $KUBEBUILDER_ASSETS). The kubelet node needs
# containerd, runc, the CNI plugins and a static busybox for its test images.
K8S_VERSION=v1.36.2
K8S_ARCHIVE="${TESSERA_K8S_ARCHIVE:-../shared/k8s/kubernetes-$K8S_VERSION-linux-amd64.tar.xz}"
K8S_CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/tessera/k8s-$K8S_VERSION"
sudo=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then sudo="sudo"; fi
missing=""
for pkg in etcd-server containerd runc containernetworking-plugins busybox-static iproute2; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
  if command -v apt-get >/dev/null 2>&1; then
    $sudo apt-get update -qq
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $missing >/dev/null
  else
    echo "setup: missing packages for the real-cluster suite:$missing (apt-get is not available)" >&2
  fi
fi
if [ -f "$K8S_ARCHIVE" ]; then
  # Absolute, because the checks below run from other folders.
  K8S_ARCHIVE="$(cd "$(dirname "$K8S_ARCHIVE")" && pwd)/$(basename "$K8S_ARCHIVE")"
  sums="$(dirname "$K8S_ARCHIVE")/SHA256SUMS"
  if [ ! -f "$K8S_CACHE/.unpacked" ] || ! (cd "$K8S_CACHE" && grep -v '\.tar\.xz$' "$sums" | sha256sum --quiet -c - >/dev/null 2>&1); then
    if [ -f "$sums" ]; then
      (cd "$(dirname "$K8S_ARCHIVE")" && grep "$(basename "$K8S_ARCHIVE")\$" SHA256SUMS | sha256sum --quiet -c -)
    fi
    rm -rf "$K8S_CACHE.tmp" && mkdir -p "$K8S_CACHE.tmp"
    tar -xJf "$K8S_ARCHIVE" -C "$K8S_CACHE.tmp"
    # The archive may hold the binaries at its top or under one folder.
    bin_dir="$(dirname "$(find "$K8S_CACHE.tmp" -name kube-apiserver -type f | head -n1)")"
    if [ -f "$sums" ]; then
      (cd "$bin_dir" && grep -v '\.tar\.xz$' "$sums" | sha256sum --quiet -c -)
    fi
    rm -rf "$K8S_CACHE" && mkdir -p "$K8S_CACHE"
    mv "$bin_dir"/kube-apiserver "$bin_dir"/kube-scheduler "$bin_dir"/kube-controller-manager "$bin_dir"/kubelet "$K8S_CACHE"/
    rm -rf "$K8S_CACHE.tmp"
    touch "$K8S_CACHE/.unpacked"
  fi
  if command -v etcd >/dev/null 2>&1; then ln -sf "$(command -v etcd)" "$K8S_CACHE/etcd"; fi
  echo "setup: Kubernetes $K8S_VERSION binaries in $K8S_CACHE (KUBEBUILDER_ASSETS)"
elif [ -z "${KUBEBUILDER_ASSETS:-}" ]; then
  echo "setup: no Kubernetes binaries: $K8S_ARCHIVE is missing and KUBEBUILDER_ASSETS is unset." >&2
  echo "setup: get them the envtest way and point KUBEBUILDER_ASSETS at the folder, e.g." >&2
  echo "setup:   go install sigs.k8s.io/controller-runtime/tools/setup-envtest@latest" >&2
  echo "setup:   export KUBEBUILDER_ASSETS=\"\$(setup-envtest use 1.36.x -p path)\"   # plus kubelet for the node tests" >&2
fi
