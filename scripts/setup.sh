#!/usr/bin/env bash
# Installs what the tests need on a fresh machine. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
rustup component add clippy rustfmt >/dev/null 2>&1 || true
bash scripts/fetch-models.sh
