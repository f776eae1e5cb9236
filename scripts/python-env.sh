#!/usr/bin/env bash
# The Python tools the tests use, in a venv outside the repository ($MANTLE_CACHE/venv):
# kubernetes-validate and PyYAML for the chart checks, moto's S3 server for the object-store
# tests, boto3 and the OpenAI client for the end-to-end test of `mantle dev`, and the `deltalake`
# package with pyarrow to read batch jobs' control tables and outputs back as a lakehouse does.
# Idempotent; prints the venv directory on its last line.
set -euo pipefail

cache="${MANTLE_CACHE:-$HOME/.cache/mantle}"
venv="$cache/venv"
requirements=("kubernetes-validate==1.37.0" "PyYAML>=6" "moto[server]==5.2.5" "boto3==1.44.5" "openai==3.51.0" "deltalake==1.6.6" "pyarrow==26.0.1")
stamp="$venv/.mantle-requirements"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "${requirements[*]}" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "${requirements[@]}" >&2
  echo "${requirements[*]}" >"$stamp"
fi
echo "$venv"
