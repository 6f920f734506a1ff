#!/usr/bin/env bash
# Installs what sandboxctl and the test suite need: the Python package (with test extras) and,
# where the machine allows it, bubblewrap for the default local sandbox.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}

if ! command -v bwrap >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "setup: installing bubblewrap (the default local sandbox)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq </dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap </dev/null >/dev/null
  elif command -v apt-get >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    echo "setup: installing bubblewrap (the default local sandbox)"
    sudo -n env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap </dev/null >/dev/null
  else
    echo "setup: bubblewrap is not installed; install it (e.g. apt-get install bubblewrap)," \
      "or run tasks with --backend docker or --backend process" >&2
  fi
fi

"$PYTHON" -m pip install --quiet --disable-pip-version-check -e '.[test]'
