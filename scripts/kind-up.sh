#!/usr/bin/env bash
# Stands the whole system up on a local kind cluster and runs one example task:
# builds the images, loads them into kind, installs the chart, submits examples/maths-by-code.yaml
# and waits for its result.
#
# Needs docker, kind, kubectl and helm on PATH, the project installed (`make setup`, for
# sandboxctl), and an OpenAI-compatible endpoint that pods in the cluster can reach:
#   OPENAI_BASE_URL=http://<host-ip>:8000/v1 OPENAI_MODEL=<model> [OPENAI_API_KEY=...] bash scripts/kind-up.sh
# (kind's default CNI does not enforce NetworkPolicies; on other clusters set inferenceEgress.)
set -euo pipefail
cd "$(dirname "$0")/.."

cluster=${KIND_CLUSTER:-llm-sandbox}
tag=${IMAGE_TAG:-0.1.0}
namespace=${TASK_NAMESPACE:-default}

for tool in docker kind kubectl helm sandboxctl; do
  command -v "$tool" >/dev/null 2>&1 || { echo "kind-up: $tool is required on PATH" >&2; exit 1; }
done
: "${OPENAI_BASE_URL:?kind-up: set OPENAI_BASE_URL to an endpoint that pods in the cluster can reach}"
: "${OPENAI_MODEL:?kind-up: set OPENAI_MODEL to the model to use}"

if ! kind get clusters 2>/dev/null | grep -qx "$cluster"; then
  kind create cluster --name "$cluster"
fi
kubectl config use-context "kind-${cluster}" >/dev/null

bash images/build.sh "$tag"
for image in "llm-sandbox/operator:${tag}" "llm-sandbox/agent:${tag}" "llm-sandbox/sandbox-python:${tag}"; do
  kind load docker-image "$image" --name "$cluster"
done

# The label marks the Secret as one tasks may use as their API key (apiKeySecretLabel).
kubectl -n "$namespace" create secret generic llm-key \
  --from-literal=apiKey="${OPENAI_API_KEY:-EMPTY}" --dry-run=client -o yaml |
  kubectl label --local -f - llmsandbox.io/api-key=true -o yaml | kubectl apply -f -

helm upgrade --install llm-sandbox charts/llm-sandbox \
  --namespace llm-sandbox --create-namespace \
  --set operator.image.tag="$tag" --set operator.image.pullPolicy=IfNotPresent \
  --set agent.image.tag="$tag" --set sandbox.defaultImage="llm-sandbox/sandbox-python:${tag}" \
  --set inference.baseURL="$OPENAI_BASE_URL" --set inference.model="$OPENAI_MODEL" \
  --set inference.apiKeySecret.name=llm-key --wait

sandboxctl submit examples/maths-by-code.yaml -n "$namespace"
sandboxctl wait maths-by-code -n "$namespace" --timeout 1200
