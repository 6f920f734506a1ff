#!/usr/bin/env bash
# Builds the project's images locally: the Debian base (debootstrap), then the sandbox, agent and
# operator images on it. Layers are cached, so a second run takes seconds.
# Usage: bash images/build.sh [TAG]   (default tag 0.1.0)
set -euo pipefail
cd "$(dirname "$0")/.."
tag=${1:-0.1.0}
bash images/base/build.sh
# The project and its dependencies as wheels, fetched with this machine's pip settings, so the
# image builds install offline.
rm -rf images/.wheels
python3 -m pip wheel --quiet --disable-pip-version-check --wheel-dir images/.wheels '.[operator]'
for name in sandbox agent operator; do
  image="llm-sandbox/${name}:${tag}"
  [ "$name" = sandbox ] && image="llm-sandbox/sandbox-python:${tag}"
  echo "images: building ${image}"
  docker build --network host -q --build-arg "AGENT_IMAGE=llm-sandbox/agent:${tag}" \
    -f "images/${name}/Dockerfile" -t "${image}" . >/dev/null
done
echo "images: llm-sandbox/sandbox-python:${tag} llm-sandbox/agent:${tag} llm-sandbox/operator:${tag}"
