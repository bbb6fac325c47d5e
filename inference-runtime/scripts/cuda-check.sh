#!/usr/bin/env bash
# The runtime's CUDA build, checked without a GPU (docs/runtime.md, "GPU build").
#
#   cuda-check.sh install   nvcc 13.0 and the headers it needs, from PyPI wheels pinned by sha256,
#                           into $TESSERA_CUDA_DIR (default <repo>/.cache/cuda). Idempotent.
#   cuda-check.sh check     cargo check -p tessera-runtime --features cuda with that toolchain.
#
# nvcc 13.0.x because driver 580 (CUDA 13.0) rejects PTX from newer compilers; compute
# capability 90 (H100/H200) because there is no GPU to ask; CUDARC_CUDA_VERSION because cudarc
# would otherwise parse `nvcc --version`. A check compiles the kernels with nvcc but links
# nothing, so no driver or CUDA library is needed.
set -euo pipefail
cd "$(dirname "$0")/../.."
cuda="${TESSERA_CUDA_DIR:-$PWD/.cache/cuda}"
nvcc="$cuda/nvidia/cu13/bin/nvcc"

install() {
  if [[ -x "$nvcc" ]] && "$nvcc" --version | grep -q 'release 13.0'; then
    echo "cuda-check: nvcc present in $cuda"
    return
  fi
  local req
  req="$(mktemp)"
  cat >"$req" <<'EOF'
nvidia-cuda-nvcc==13.0.88 --hash=sha256:56fe502eb77625a12f25172caa3cdddb4e4c8ba2c8c17dba44b164761b380f03
nvidia-cuda-runtime==13.0.96 --hash=sha256:7f82250d7782aa23b6cfe765ecc7db554bd3c2870c43f3d1821f1d18aebf0548
nvidia-nvvm==13.0.88 --hash=sha256:c5f41ffeb6466944a026dfa5317d7d85355c119bbec279205d22f1869d1054e0
nvidia-cuda-crt==13.0.88 --hash=sha256:2c8043c7c9e02492716426e9919fc78d2c5b3b2a7a768a88e952676b08aa55a4
nvidia-cuda-cccl==13.0.85 --hash=sha256:e0da7ad981f3a8aff08241b5bfc1af868742a63e2762f53a5171c492ef242649
EOF
  rm -rf "$cuda"
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps --only-binary=:all: \
    --require-hashes -r "$req" --target "$cuda"
  rm -f "$req"
  "$nvcc" --version | tail -2
}

check() {
  if [[ ! -x "$nvcc" ]]; then
    echo "cuda-check: $nvcc is missing; run 'bash inference-runtime/scripts/cuda-check.sh install' (scripts/setup.sh does)" >&2
    exit 1
  fi
  local start=$SECONDS
  PATH="$cuda/nvidia/cu13/bin:$PATH" CUDA_HOME="$cuda/nvidia/cu13" CUDA_PATH="$cuda/nvidia/cu13" \
    CUDA_COMPUTE_CAP=90 CUDARC_CUDA_VERSION=13000 \
    cargo check -p tessera-runtime --features cuda --locked
  echo "cuda-check: passed in $((SECONDS - start)) s"
}

case "${1:-}" in
  install) install ;;
  check) check ;;
  *)
    echo "usage: $0 install|check" >&2
    exit 2
    ;;
esac
