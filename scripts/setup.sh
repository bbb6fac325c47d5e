#!/usr/bin/env bash
# Installs what the tests need on a fresh machine. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
rustup component add clippy rustfmt >/dev/null 2>&1 || true

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
