#!/usr/bin/env bash
# Router benchmarks (results in BENCHMARKS.md):
#   1. cargo bench -p mantle-router --bench router: overhead at 1k and 10k requests/s vs direct
#      gRPC, per streamed token, fairness between tenants, overload at 3x capacity (against the
#      runner stand-in, in one process);
#   2. closed-loop throughput with wrk: mantle-router on core 0 (one tokio worker) vs LiteLLM's
#      proxy on core 0 (one worker), each in front of the same stand-in backend (gRPC for Mantle,
#      its OpenAI-compatible twin for LiteLLM), with wrk and the stand-in on core 1.
# Installs wrk (Debian) and LiteLLM (PyPI, in $MANTLE_CACHE/litellm-venv) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${MANTLE_CACHE:-$HOME/.cache/mantle}"
seconds="${SECONDS_PER_RUN:-10}"
target="${CARGO_TARGET_DIR:-target}"

command -v wrk >/dev/null || { apt-get install -y wrk >/dev/null 2>&1 || sudo apt-get install -y wrk >/dev/null; }
venv="$cache/litellm-venv"
if [ ! -x "$venv/bin/litellm" ]; then
  python3 -m venv "$venv"
  # 1.104.0: newer releases need a certifi that PyPI mirrors here do not serve yet.
  "$venv/bin/pip" install --quiet --disable-pip-version-check "litellm[proxy]==1.104.0" >&2
fi

echo "==> in-process benchmarks"
cargo bench -q -p mantle-router --features test-support --bench router -- --seconds "$seconds" 2>/dev/null

echo "==> throughput (wrk, 64 connections, ${seconds}s)"
cargo build -q --release -p mantle-router --bin mantle-router --features test-support --example stand_in
work=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
cat >"$work/model.yaml" <<'YAML'
apiVersion: mantle.dev/v1alpha1
kind: FoundationModel
metadata: {name: bench}
spec:
  modelId: acme.bench-v1:0
  provider: Acme
  modality: TEXT
  source: {uri: 's3://b/m.gguf', format: gguf}
  contextLength: 4096
YAML
printf 'runners:\n  - {model: acme.bench-v1:0, address: "http://127.0.0.1:51061"}\n' >"$work/runners.yaml"
cat >"$work/litellm.yaml" <<'YAML'
model_list:
  - model_name: acme.bench-v1:0
    litellm_params: {model: openai/acme.bench-v1:0, api_base: "http://127.0.0.1:51062/v1", api_key: none}
litellm_settings: {drop_params: true, telemetry: false}
YAML
chat='{"model":"acme.bench-v1:0","messages":[{"role":"user","content":"What is the capital of France?"}],"max_tokens":16}'
converse='{"messages":[{"role":"user","content":[{"text":"What is the capital of France?"}]}],"inferenceConfig":{"maxTokens":16}}'
lua() { # body [bearer]
  printf 'wrk.method = "POST"\nwrk.body = %s\nwrk.headers["Content-Type"] = "application/json"\n' "'$1'"
  [ -z "${2:-}" ] || printf 'wrk.headers["Authorization"] = "Bearer %s"\n' "$2"
}
lua "$chat" none >"$work/chat.lua"
lua "$chat" sk-mantle-bench-0123456789 >"$work/litellm.lua"
lua "$converse" >"$work/converse.lua"

taskset -c 1 "$target/release/examples/stand_in" 51061 51062 16 >/dev/null & pids+=($!)
RUST_LOG=warn TOKIO_WORKER_THREADS=1 taskset -c 0 "$target/release/mantle-router" --no-auth --manifests "$work" \
  --runners "$work/runners.yaml" --listen 127.0.0.1:18080 --slots-per-runner 100000 >/dev/null 2>&1 & pids+=($!)
router=$!
for _ in $(seq 100); do curl -fs localhost:18080/readyz >/dev/null && break; sleep 0.1; done
cpu() { awk '{print $14+$15}' "/proc/$1/stat"; }
measure() { # name pid url lua
  local before after rps
  taskset -c 1 wrk -t1 -c64 -d2s -s "$4" "$3" >/dev/null  # warm-up
  before=$(cpu "$2")
  local out="$work/$RANDOM.wrk"
  rps=$(taskset -c 1 wrk -t1 -c64 -d"${seconds}s" --latency -s "$4" "$3" | tee "$out" | awk '/Requests\/sec/ {print $2}')
  after=$(cpu "$2")
  local busy; busy=$(awk -v a="$before" -v b="$after" -v s="$seconds" 'BEGIN { printf "%.2f", (b - a) / 100 / s }')
  local non2xx; non2xx=$(awk '/Non-2xx/ {print $5}' "$out")
  local p99; p99=$(awk '$1 == "99%" {print $2}' "$out")
  printf '| %s | %s | %s | %s | %s | %s |\n' "$1" "$rps" "$busy" \
    "$(awk -v r="$rps" -v c="$busy" 'BEGIN { printf "%.0f", r / c }')" "$p99" "${non2xx:-0}"
}
echo "| target | requests/s | cores busy | requests/s per core | p99 | non-2xx |"
echo "|---|---:|---:|---:|---:|---:|"
measure "mantle Converse" "$router" "http://127.0.0.1:18080/model/acme.bench-v1%3A0/converse" "$work/converse.lua"
measure "mantle /v1/chat/completions" "$router" "http://127.0.0.1:18080/v1/chat/completions" "$work/chat.lua"
kill "$router"

LITELLM_MASTER_KEY=sk-mantle-bench-0123456789 taskset -c 0 "$venv/bin/litellm" --config "$work/litellm.yaml" --port 18081 --num_workers 1 >"$work/litellm.log" 2>&1 & pids+=($!)
litellm=$!
for _ in $(seq 300); do curl -fs localhost:18081/health/liveliness >/dev/null && break; sleep 0.2; done
measure "LiteLLM /v1/chat/completions" "$litellm" "http://127.0.0.1:18081/v1/chat/completions" "$work/litellm.lua"
kill "$litellm"

echo "==> overhead with the router alone on core 0 (load generator and stand-in on core 1)"
printf 'runners:\n  - {model: acme.bench-v1:0, address: "http://127.0.0.1:51071"}\n' >"$work/runners-external.yaml"
RUST_LOG=warn TOKIO_WORKER_THREADS=1 taskset -c 0 "$target/release/mantle-router" --no-auth --manifests "$work" \
  --runners "$work/runners-external.yaml" --listen 127.0.0.1:18082 --slots-per-runner 100000 >/dev/null 2>&1 & pids+=($!)
taskset -c 1 cargo bench -q -p mantle-router --features test-support --bench router -- --seconds "$seconds" \
  --external-router 127.0.0.1:18082 --stand-in-port 51071 2>/dev/null
