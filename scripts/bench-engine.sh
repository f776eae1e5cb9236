#!/usr/bin/env bash
# The engine benchmark next to its reference, in one run: Mantle's engine
# (`cargo bench -p mantle-engine --bench decode`) and llama.cpp (llama-cpp-python, built here with
# native CPU flags into a venv outside the repository) on the same GGUF, prompt, thread count and
# token budget. Usage: scripts/bench-engine.sh [TOKENS] [STREAMS] [THREADS]
set -euo pipefail
cd "$(dirname "$0")/.."

tokens="${1:-128}"
streams="${2:-1,4,16,64}"
threads="${3:-$(nproc)}"
cache="${MANTLE_CACHE:-$HOME/.cache/mantle}"
models=$(bash scripts/fetch-models.sh | tail -n 1)
model="$models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

venv="$cache/bench-venv"
if ! "$venv/bin/python" -c "import llama_cpp" 2>/dev/null; then
  python3 -m venv "$venv"
  CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_CURL=OFF" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "$venv/bin/pip" install --quiet --no-cache-dir "llama-cpp-python==0.3.36"
fi

echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores; threads: $threads; tokens: $tokens"
RAYON_NUM_THREADS="$threads" cargo bench --quiet -p mantle-engine --bench decode -- --tokens "$tokens" --streams "$streams" --threads "$threads"
"$venv/bin/python" scripts/bench_llamacpp.py --model "$model" --threads "$threads" --tokens "$tokens" --streams "$streams" 2>/dev/null
