#!/usr/bin/env bash
# Installs what the tests need on a fresh machine. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
rustup component add clippy rustfmt >/dev/null 2>&1 || true
bash scripts/fetch-models.sh

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
