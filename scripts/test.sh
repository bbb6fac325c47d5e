#!/usr/bin/env bash
# The project's test command (the README names it).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace --locked
