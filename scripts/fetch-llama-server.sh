#!/usr/bin/env bash
# Builds llama.cpp's `llama-server` (the OpenAI-compatible server the external-engine tests and
# benchmarks run in front of), with no network beyond PyPI: the llama-cpp-python sdist vendors
# llama.cpp's sources, and cmake and ninja come as wheels. CPU only, no web UI, static.
# Idempotent; the binary lands in $MANTLE_CACHE/tools/llama.cpp (default ~/.cache/mantle) and the
# script prints its path. A first build takes about 5 minutes on 2 cores.
set -euo pipefail

cache="${MANTLE_CACHE:-$HOME/.cache/mantle}"
version="0.3.36"
dir="$cache/tools/llama.cpp"
bin="$dir/llama-server"
stamp="$dir/.llama-cpp-python-$version"

if [ -x "$bin" ] && [ -f "$stamp" ]; then
  echo "$bin"
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet "cmake>=3.28,<5" "ninja>=1.11" "scikit-build-core>=0.10" >&2
"$work/venv/bin/pip" download --quiet --no-deps --no-binary :all: --no-build-isolation \
  --dest "$work" "llama-cpp-python==$version" >&2
tar -xzf "$work/llama_cpp_python-$version.tar.gz" -C "$work"
src="$work/llama_cpp_python-$version/vendor/llama.cpp"
export PATH="$work/venv/bin:$PATH"
cmake -S "$src" -B "$work/build" -G Ninja >&2 \
  -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_SHARED_LIBS=OFF \
  -DGGML_NATIVE=ON \
  -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_UI=OFF \
  -DLLAMA_USE_PREBUILT_UI=OFF \
  -DLLAMA_OPENSSL=OFF \
  -DLLAMA_CURL=OFF
cmake --build "$work/build" --target llama-server -j "$(nproc)" >&2
mkdir -p "$dir"
install -m 0755 "$work/build/bin/llama-server" "$bin.tmp"
mv "$bin.tmp" "$bin"
rm -f "$dir"/.llama-cpp-python-*
touch "$stamp"
echo "$bin"
