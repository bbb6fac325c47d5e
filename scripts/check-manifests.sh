#!/usr/bin/env bash
# Renders every kustomize overlay (and the examples) with `kubectl kustomize` and validates the
# rendered objects offline against the Kubernetes OpenAPI schema, plus the consistency checks in
# scripts/validate-manifests.py. Needs kubectl and the PyPI package kubernetes-validate
# (scripts/setup.sh installs it). The CRD YAML itself is checked against the Rust types by
# `cargo test -p tessera-api`.
set -euo pipefail
cd "$(dirname "$0")/.."

# The oldest Kubernetes tessera supports (DESIGN: 1.33 and newer).
K8S_VERSION="${K8S_VERSION:-1.33}"

command -v kubectl >/dev/null || { echo "check-manifests: kubectl is not installed (scripts/setup.sh)" >&2; exit 1; }
python3 -c 'import kubernetes_validate' 2>/dev/null ||
  { echo "check-manifests: the Python package kubernetes-validate is missing (scripts/setup.sh)" >&2; exit 1; }

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

renders=()
targets=(manifests/overlays/* manifests/examples)
for dir in "${targets[@]}"; do
  [ -f "$dir/kustomization.yaml" ] || { echo "check-manifests: $dir has no kustomization.yaml" >&2; exit 1; }
  name="${dir#manifests/}"
  file="$out/${name//\//_}.yaml"
  if ! kubectl kustomize "$dir" >"$file"; then
    echo "check-manifests: kubectl kustomize $dir failed" >&2
    exit 1
  fi
  echo "rendered $dir ($(grep -c '^kind:' "$file") objects)"
  renders+=("$name=$file")
done

python3 scripts/validate-manifests.py "$K8S_VERSION" "${renders[@]}"

# The checks must be able to fail: each broken copy of the kind-dev render must be rejected with
# the expected message.
good="$out/overlays_kind-dev.yaml"
gpunode='---
apiVersion: tessera.dev/v1alpha1
kind: GpuNode
metadata:
  name: gpu-node-1
spec:
  gpus:
    - index: 0
      mode: '
expect_failure() {
  local what="$1" message="$2" broken="$out/broken.yaml"
  cat >"$broken"
  if log="$(python3 scripts/validate-manifests.py "$K8S_VERSION" "broken=$broken" 2>&1)"; then
    echo "check-manifests: a render with $what passed validation" >&2
    exit 1
  fi
  if ! grep -qF -- "$message" <<<"$log"; then
    echo "check-manifests: a render with $what failed without \"$message\":" >&2
    echo "$log" >&2
    exit 1
  fi
  echo "rejected as expected: $what"
}
sed 's/^  replicas: 1$/  replicaz: 1/' "$good" | expect_failure "an unknown field" "'replicaz' was unexpected"
sed 's/percentageOfNodesToScore: 100/percentageOfNodesToScore: 50/' "$good" |
  expect_failure "percentageOfNodesToScore 50" "percentageOfNodesToScore must be 100"
sed 's/--listen=127.0.0.1:8888/--listen=127.0.0.1:9999/' "$good" |
  expect_failure "an extender URL that misses --listen" "must be the loopback --listen"
sed 's/resourceName: tessera-scheduler/resourceName: kube-scheduler/' "$good" |
  expect_failure "the default scheduler's Lease" "leaderElection needs its own resourceName"
sed '0,/readOnlyRootFilesystem: true/s//readOnlyRootFilesystem: false/' "$good" |
  expect_failure "a writable root filesystem" "readOnlyRootFilesystem must be true"
sed 's/--read-auth=kubernetes/--read-auth=none/' "$good" |
  expect_failure "an unauthenticated read-only surface on 0.0.0.0" "it needs --read-auth=kubernetes"
sed 's/name: system:auth-delegator$/name: system:auth-delegatr/' "$good" |
  expect_failure "no TokenReview/SubjectAccessReview grant" "bound to ClusterRole system:auth-delegator"
sed 's/^  maxUnavailable: 1$/  minAvailable: 1/' "$good" |
  expect_failure "a PodDisruptionBudget of minAvailable 1 over one replica" "blocks every voluntary disruption"
sed 's/^  maxUnavailable: 1$/  maxUnavailable: 0/' "$good" |
  expect_failure "a PodDisruptionBudget of maxUnavailable 0" "maxUnavailable 0 blocks every voluntary disruption"
sed 's/^  maxUnavailable: 1$/  minAvailable: 2/' "$out/examples.yaml" |
  expect_failure "the runtime example's PodDisruptionBudget at minAvailable 2 of 2 replicas" "minAvailable 2 with 2 replica(s) blocks"
sed '/^kind: PodDisruptionBudget$/,/^---$/s/name: tessera-scheduler$/name: tessera-schedulr/' "$good" |
  expect_failure "a PodDisruptionBudget that selects nothing" "matches no pod template"
{ cat "$good"; printf '%s%s\n' "$gpunode" "half"; } | expect_failure "a GpuNode with mode 'half'" "'half' is not one of"
{ cat "$good"; printf '%s%s\n' "$gpunode" "mig"; } >"$out/gpunode-ok.yaml"
python3 scripts/validate-manifests.py "$K8S_VERSION" "gpunode=$out/gpunode-ok.yaml" | grep '1 against tessera CRDs' >/dev/null ||
  { echo "check-manifests: a valid GpuNode was not validated against its CRD" >&2; exit 1; }
{ cat "$good"; printf -- '---\napiVersion: example.com/v1\nkind: Widget\nmetadata:\n  name: w\n'; } |
  expect_failure "a kind without a schema" "not in SKIPPED"
echo "check-manifests: ok"
