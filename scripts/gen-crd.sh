#!/usr/bin/env bash
# Regenerate the SandboxTask CRD from the pydantic models into both committed copies;
# tests/test_crd.py fails until they match what `python -m sandbox_operator.crd` prints.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHONPATH="agent:operator${PYTHONPATH:+:$PYTHONPATH}"

# Generate once into a temporary file so a failing generator never leaves a truncated CRD behind
# (copied with cat, not cp, so the files get normal permissions rather than mktemp's 0600).
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
"$PYTHON" -m sandbox_operator.crd >"$tmp"

mkdir -p manifests charts/llm-sandbox/crds
cat "$tmp" >manifests/crd.yaml
cat "$tmp" >charts/llm-sandbox/crds/sandboxtasks.llmsandbox.io.yaml
echo "gen-crd: wrote manifests/crd.yaml and charts/llm-sandbox/crds/sandboxtasks.llmsandbox.io.yaml"
