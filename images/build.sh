#!/usr/bin/env bash
# Builds the project's images locally: the Debian base (debootstrap), then the sandbox, agent and
# operator images on it. Layers are cached, so a second run takes seconds.
# Usage: bash images/build.sh [sandbox|agent|operator ...] [TAG]
#   no names: all three; `bash images/build.sh sandbox` is all `sandboxctl run --backend docker`
#   needs (llm-sandbox/sandbox-python:TAG, its default image). TAG defaults to 0.1.0.
set -euo pipefail
cd "$(dirname "$0")/.."
wanted=" "
tag=0.1.0
for arg in "$@"; do
  case "$arg" in
    sandbox|agent|operator) wanted+="$arg " ;;
    -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
    -*) echo "images/build.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
    *) tag=$arg ;;
  esac
done
names=()
for name in sandbox agent operator; do  # in this order: the operator image builds on the agent's
  if [[ $wanted == " " || $wanted == *" $name "* ]]; then names+=("$name"); fi
done
bash images/base/build.sh
if [[ " ${names[*]} " != " sandbox " ]]; then
  # The project and its dependencies as wheels, fetched with this machine's pip settings, so the
  # agent and operator image builds install offline (the sandbox image needs none).
  rm -rf images/.wheels
  python3 -m pip wheel --quiet --disable-pip-version-check --wheel-dir images/.wheels '.[operator,grading]'
fi
built=()
for name in "${names[@]}"; do
  image="llm-sandbox/${name}:${tag}"
  [ "$name" = sandbox ] && image="llm-sandbox/sandbox-python:${tag}"
  echo "images: building ${image}"
  docker build --network host -q --build-arg "AGENT_IMAGE=llm-sandbox/agent:${tag}" \
    -f "images/${name}/Dockerfile" -t "${image}" . >/dev/null
  built+=("$image")
done
echo "images: ${built[*]}"
