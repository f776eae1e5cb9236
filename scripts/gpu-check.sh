#!/usr/bin/env bash
# The engine's CUDA checks on an NVIDIA machine: the tensor-backend tests on the GPU (greedy
# answers equal the CPU kernels', device KV blocks swap and checksum), then the decode benchmark
# on the GPU interleaved with Hugging Face transformers (eager, fp16) on the same GPU as the
# reference, and the engine's CPU kernels on the same machine.
#
#   [ROUNDS=2] scripts/gpu-check.sh [BIN_DIR]
#
# BIN_DIR holds `tensor_backend` and `decode` built with `--features cuda` elsewhere (a GPU box
# without a Rust toolchain); without it they are built here with cargo (needs nvcc). The model
# comes from $MANTLE_CACHE/models (scripts/fetch-models.sh). Exits with the tests' status.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
bin=${1:-}
if [ -z "$bin" ]; then
  build=$(cargo test -p mantle-engine --features cuda --test tensor_backend --bench decode --no-run --message-format=json 2>/dev/null)
  bin=$(mktemp -d)
  for t in tensor_backend decode; do
    exe=$(printf '%s\n' "$build" | grep -o "\"executable\":\"[^\"]*/deps/$t-[^\"]*\"" | tail -1 | cut -d'"' -f4)
    ln -sf "$exe" "$bin/$t"
  done
fi
# CUDA's libraries wherever this machine keeps them (the toolkit, Python wheels); the driver's
# libcuda comes from the system's own path (the toolkit's compat and stubs copies must not).
libs=$(find /usr/local/cuda* /opt /usr/local/lib -maxdepth 7 \
  \( -name 'libcublas.so.1*' -o -name 'libcurand.so.1*' -o -name 'libcudart.so.1*' \) \
  2>/dev/null | grep -v -e /compat/ -e /stubs/ | xargs -r -n1 dirname | sort -u | tr '\n' ':')
export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:-}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
export MANTLE_CACHE=${MANTLE_CACHE:-$HOME/.cache/mantle}
export MANTLE_MODELS_DIR=$MANTLE_CACHE/models CARGO_MANIFEST_DIR=$root/dataplane/engine
model=$MANTLE_MODELS_DIR/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
log() { echo "== $*"; }

log "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
lscpu | grep -E '^(Model name|CPU\(s\)|L3)'
date -u

log "tensor-backend tests on cuda"
MANTLE_TEST_DEVICE=cuda "$bin/tensor_backend" --test-threads 1
tests=$?

for round in $(seq "${ROUNDS:-2}"); do
  log "round $round: mantle, cuda"
  (cd "$root/dataplane/engine" && "$bin/decode" --device cuda --tokens 128 --streams 1,16,64,256 --constrained-rounds 0)
  log "round $round: hf transformers, cuda"
  timeout 150 python3 "$root/scripts/hf_reference_decode.py" "$model" --tokens 128 --streams 1,16,64,256
done
log "mantle, cpu kernels on this machine"
(cd "$root/dataplane/engine" && "$bin/decode" --device cpu --tokens 128 --streams 1,16,64 --constrained-rounds 0)
exit $tests
