#!/usr/bin/env bash
# Mantle on a real (local) cluster: kind, the three images, the chart, the examples, a boto3 smoke.
# Needs docker, kind, kubectl and helm (scripts/fetch-tools.sh installs helm and kubectl), and
# Python with boto3 (scripts/python-env.sh). It cannot run on machines without a container engine
# (CI's); run it where you have one:  bash tests/e2e/kind.sh   (KEEP=1 keeps the cluster).
set -euo pipefail
cd "$(dirname "$0")/../.."
cache="${MANTLE_CACHE:-$HOME/.cache/mantle}"
cluster=mantle
tag=dev
work=$(mktemp -d)
trap 'rm -rf "$work"; [ -n "${forward:-}" ] && kill "$forward" 2>/dev/null; [ -n "${KEEP:-}" ] || kind delete cluster --name "$cluster"' EXIT

echo "==> cluster"
kind get clusters | grep -qx "$cluster" || kind create cluster --name "$cluster" --config kind-config.yaml

echo "==> images"
for image in operator router runner; do
  docker build --target "$image" -t "mantle/$image:$tag" .
  kind load docker-image "mantle/$image:$tag" --name "$cluster"
done

echo "==> models on the workers"
# kind nodes reach no object store: the weights are copied into each worker's node cache, and
# the manifests point at them with file:// URIs inside the runner pods' cache mount.
models=$(bash scripts/fetch-models.sh | tail -n 1)
for node in $(kind get nodes --name "$cluster" | grep worker); do
  docker exec "$node" mkdir -p /var/cache/mantle/weights/seed
  docker cp "$models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$node:/var/cache/mantle/weights/seed/"
  docker cp "$models/all-minilm-l6-v2" "$node:/var/cache/mantle/weights/seed/"
  docker exec "$node" chown -R 65532:65532 /var/cache/mantle/weights
done
seed=file:///var/cache/mantle/weights/seed
for f in cells foundationmodel-smollm2 foundationmodel-minilm provisionedthroughput; do
  sed -e "s#s3://mantle-models/smollm2-135m-instruct/#$seed/#" \
      -e "s#s3://mantle-models/all-minilm-l6-v2/#$seed/all-minilm-l6-v2/#" \
      -e '/credentialsSecretRef:/,+1d' \
      -e 's/pinInHostMemory: true/pinInHostMemory: false/' \
      "examples/$f.yaml" >"$work/$f.yaml"
done

echo "==> chart"
helm upgrade --install mantle charts/mantle -n mantle-system --create-namespace --wait --timeout 5m \
  --set operator.image.tag=$tag --set router.image.tag=$tag --set operator.runnerImage.tag=$tag \
  --set image.pullPolicy=Never --set router.auth.mode=none --set router.replicas=1 \
  --set 'runnerAuth.namespaces={default}'

echo "==> the examples"
kubectl apply -f "$work"
kubectl wait --for=condition=Available foundationmodel --all --timeout=15m
kubectl get foundationmodels,provisionedthroughputs,deployments,endpointslices -o wide

echo "==> boto3 through the router"
kubectl -n mantle-system port-forward svc/mantle-router 18080:8080 >/dev/null 2>&1 &
forward=$!
sleep 3
"$cache/venv/bin/python" - <<'PY'
import boto3
runtime = boto3.client("bedrock-runtime", endpoint_url="http://127.0.0.1:18080", region_name="us-east-1",
                       aws_access_key_id="kind", aws_secret_access_key="kind")
reply = runtime.converse(modelId="huggingfacetb.smollm2-135m-instruct-v1:0",
                         messages=[{"role": "user", "content": [{"text": "What is the capital of France?"}]}])
text = reply["output"]["message"]["content"][0]["text"]
assert "Paris" in text, text
print("converse:", text)
PY
echo "kind walkthrough passed"
