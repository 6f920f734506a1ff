#!/usr/bin/env bash
# The whole check: lint, types, then the test suite. Container tests run when a Docker engine
# can be started here; they skip (and say so) otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

ruff check .
ruff format --check .
mypy

if [ "${SKIP_CONTAINER_SETUP:-0}" != 1 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  missing=()
  command -v dockerd >/dev/null 2>&1 || missing+=(docker.io iptables)
  command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
  # The bwrap sandbox's own python3 is the host's: the "ordinary work" test imports numpy there.
  if [ -x /usr/bin/python3 ] && ! /usr/bin/python3 -c 'import numpy' 2>/dev/null; then
    missing+=(python3-numpy)
  fi
  if [ ${#missing[@]} -gt 0 ]; then
    echo "test: installing ${missing[*]} for the container and sandbox tests"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq </dev/null || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" </dev/null >/dev/null || true
  fi
fi
if [ "${SKIP_CONTAINER_SETUP:-0}" != 1 ] && [ "$(id -u)" = 0 ] && command -v dockerd >/dev/null 2>&1; then
  if bash scripts/start-dockerd.sh && bash images/base/build.sh; then
    echo "test: Docker engine up, base image ready: container tests will run"
  else
    echo "test: Docker engine or base image unavailable: container tests will skip" >&2
  fi
fi

# A real Prometheus and promtool for the alert-rule and dashboard tests (tests/test_prometheus.py,
# which skip, saying so, without them).
if ! command -v promtool >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "test: installing prometheus (promtool and the server) for the monitoring tests"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus \
    </dev/null >/dev/null || { DEBIAN_FRONTEND=noninteractive apt-get update -qq </dev/null || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus \
      </dev/null >/dev/null || echo "test: prometheus not installed: its tests will skip" >&2; }
fi

# The exec server must run on the oldest python3 a sandbox image may have: where a Python 3.8 is
# found, the exec server tests run under it (tests/test_py38_compat.py says so when none is).
if [ -z "${EXECD_TEST_PYTHON:-}" ]; then
  for candidate in python3.8 "$HOME"/.pyenv/versions/3.8*/bin/python3.8; do
    if "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 8))' 2>/dev/null; then
      export EXECD_TEST_PYTHON="$candidate"
      echo "test: the exec server tests run under $candidate"
      break
    fi
  done
fi

# pytest exits 5 when it collected nothing; that is a failure here, not a pass.
"$PYTHON" -m pytest "$@"
