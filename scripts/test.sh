#!/usr/bin/env bash
# Mantle's test suite: the command README.md gives and CI runs. Installs what it needs (helm,
# kubectl, the test models, a Python venv with the chart checkers and moto's S3 server, llama.cpp's
# server built from source) into
# $MANTLE_CACHE (default ~/.cache/mantle).
set -euo pipefail
cd "$(dirname "$0")/.."

cache="${MANTLE_CACHE:-$HOME/.cache/mantle}"
export MANTLE_CACHE="$cache"

echo "==> tools"
tools_bin=$(bash scripts/fetch-tools.sh | tail -n 1)
venv=$(bash scripts/python-env.sh | tail -n 1)
bash scripts/fetch-models.sh >/dev/null
# llama.cpp's server, the real upstream of the external-engine tests (built once, then cached).
MANTLE_LLAMA_SERVER=$(bash scripts/fetch-llama-server.sh | tail -n 1)
export MANTLE_LLAMA_SERVER

echo "==> cargo test"
log=$(mktemp)
trap 'rm -f "$log" "${rendered:-}"' EXIT
cargo test --workspace --locked 2>&1 | tee "$log"

echo "==> chart"
"$tools_bin/helm" lint --strict charts/mantle
rendered=$(mktemp)
for values in "" "--set metrics.serviceMonitor.enabled=true --set router.auth.mode=none"; do
  # shellcheck disable=SC2086
  "$tools_bin/helm" template mantle charts/mantle --include-crds --namespace mantle-system $values >"$rendered"
  # Every rendered object against the Kubernetes 1.34 schemas, unknown fields rejected
  # (the ServiceMonitor's CRD is not among them and is only warned about).
  "$venv/bin/kubernetes-validate" --kubernetes-version 1.34.0 --strict --quiet "$rendered"
done
"$venv/bin/python" scripts/check-chart.py "$tools_bin/helm" charts/mantle

echo "==> operator render"
# What the operator creates (the golden files its tests pin) against the same schemas.
"$venv/bin/kubernetes-validate" --kubernetes-version 1.34.0 --strict --quiet operator/tests/golden/*.rendered.yaml

# One closing line over every cargo test binary (the chart checks above stop the script on failure).
awk '/^test result:/ { passed += $4; failed += $6 } END { printf "tests: %d passed, %d failed\n", passed, failed }' "$log"
