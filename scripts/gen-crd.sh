#!/usr/bin/env bash
# Regenerate the SandboxTask and SandboxTaskSet CRDs from the pydantic models into the committed copies;
# tests/test_crd.py fails until they match what `python -m sandbox_operator.crd` prints.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHONPATH="agent:operator${PYTHONPATH:+:$PYTHONPATH}"

# Generate once into a temporary file so a failing generator never leaves a truncated CRD behind
# (copied with cat, not cp, so the files get normal permissions rather than mktemp's 0600).
tmp=$(mktemp)
tmpset=$(mktemp)
trap 'rm -f "$tmp" "$tmpset"' EXIT
"$PYTHON" -m sandbox_operator.crd >"$tmp"
"$PYTHON" -m sandbox_operator.crd SandboxTaskSet >"$tmpset"  # = sandboxctl crd --kind SandboxTaskSet

mkdir -p manifests charts/llm-sandbox/crds
cat "$tmp" >manifests/crd.yaml
cat "$tmp" >charts/llm-sandbox/crds/sandboxtasks.llmsandbox.io.yaml
cat "$tmpset" >manifests/crd-taskset.yaml
cat "$tmpset" >charts/llm-sandbox/crds/sandboxtasksets.llmsandbox.io.yaml
echo "gen-crd: wrote manifests/crd.yaml, manifests/crd-taskset.yaml and charts/llm-sandbox/crds/"
