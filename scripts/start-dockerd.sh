#!/usr/bin/env bash
# Start a Docker engine in the background on a machine without systemd (CI, dev VMs), idempotently.
#
#   bash scripts/start-dockerd.sh
#
# Exits 0 as soon as `docker info` answers (at once if an engine is already up). Otherwise starts
# /usr/sbin/dockerd detached from this shell (no stdin, output to $DOCKERD_LOG), waits up to
# $DOCKERD_WAIT seconds (default 60), and if this flag set makes dockerd exit early, retries with
# safer ones: without iptables, then with the vfs storage driver. Exits 1 with the log tail if the
# engine never comes up.
#
# Env: DOCKERD_LOG (default /var/log/dockerd.log), DOCKERD_WAIT (default 60),
#      DOCKERD_FLAGS (extra flags, tried first and kept in every attempt).
set -uo pipefail

LOG="${DOCKERD_LOG:-/var/log/dockerd.log}"
WAIT="${DOCKERD_WAIT:-60}"
EXTRA_FLAGS="${DOCKERD_FLAGS:-}"
PIDFILE=/var/run/docker.pid

say() { echo "start-dockerd: $*" >&2; }

engine_up() { timeout 10 docker info >/dev/null 2>&1; }

if ! command -v docker >/dev/null 2>&1; then
  say "no docker CLI on PATH (apt-get install docker.io)"
  exit 1
fi
if engine_up; then
  say "the Docker engine is already running"
  exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
  say "the Docker engine is not reachable (not running, or no access to its socket), and starting dockerd needs root (running as uid $(id -u))"
  exit 1
fi
DOCKERD=$(command -v dockerd || true)
[[ -z $DOCKERD && -x /usr/sbin/dockerd ]] && DOCKERD=/usr/sbin/dockerd
if [[ -z $DOCKERD ]]; then
  say "no dockerd binary found (apt-get install docker.io iptables)"
  exit 1
fi

deadline=$(( $(date +%s) + WAIT ))

# Two concurrent calls (parallel CI steps) must not both start a dockerd: serialise, then re-check.
if command -v flock >/dev/null 2>&1; then
  exec 9>/var/run/llmsandbox-start-dockerd.lock
  flock -w "$WAIT" 9 || { say "timed out waiting for another start-dockerd.sh"; exit 1; }
  if engine_up; then
    say "the Docker engine is already running"
    exit 0
  fi
fi

# Wait for the engine while dockerd ($1) lives; 0 = up, 1 = dockerd died, 2 = out of time.
wait_engine() {
  local pid=$1
  while (( $(date +%s) < deadline )); do
    engine_up && return 0
    kill -0 "$pid" 2>/dev/null || return 1
    sleep 0.5
  done
  return 2
}

# A dockerd from an earlier call may still be initialising: wait for it rather than start a
# second one, which would fail on the pid file and the socket anyway.
if [[ -f $PIDFILE ]]; then
  oldpid=$(cat "$PIDFILE" 2>/dev/null || true)
  if [[ -n $oldpid ]] && kill -0 "$oldpid" 2>/dev/null \
      && [[ $(cat "/proc/$oldpid/comm" 2>/dev/null) == dockerd ]]; then
    say "dockerd (pid $oldpid) is already starting; waiting for it"
    if wait_engine "$oldpid"; then
      say "the Docker engine is up"
      exit 0
    fi
    say "dockerd (pid $oldpid) did not come up; see $LOG"
    tail -n 30 "$LOG" >&2 2>/dev/null
    exit 1
  fi
  # A stale pid file from a dockerd that died makes the next one refuse to start.
  rm -f "$PIDFILE"
fi

# overlay2 is fast and works on ext4/xfs hosts with the overlay module; vfs works everywhere but
# copies every layer in full, so it is only the fallback.
storage=vfs
if grep -qw overlay /proc/filesystems || modprobe overlay >/dev/null 2>&1; then
  storage=overlay2
fi

attempts=(
  "--storage-driver=$storage"
  # iptables missing, or nf_tables/legacy trouble in a nested container: sandboxes run with
  # --network none by default, so a bridge without NAT rules is an acceptable loss.
  "--storage-driver=$storage --iptables=false --ip-masq=false"
)
[[ $storage != vfs ]] && attempts+=("--storage-driver=vfs --iptables=false --ip-masq=false")

mkdir -p "$(dirname "$LOG")"
for flags in "${attempts[@]}"; do
  # shellcheck disable=SC2086  # flags are deliberately word-split
  set -- $EXTRA_FLAGS $flags
  echo "=== $(date -u +%FT%TZ) start-dockerd: $DOCKERD $*" >>"$LOG"
  say "starting $DOCKERD $* (log: $LOG)"
  # setsid + nohup + no inherited fds: dockerd must outlive this script and must not keep the CI
  # step's stdout/stderr pipes open (the step would otherwise never finish).
  # Nor may it inherit the lock (fd 9), or the lock would be held for as long as dockerd runs.
  setsid nohup "$DOCKERD" "$@" </dev/null >>"$LOG" 2>&1 9>&- &
  pid=$!
  wait_engine "$pid"
  case $? in
    0)
      say "the Docker engine is up (dockerd pid $pid, flags: $*)"
      exit 0
      ;;
    1)
      say "dockerd exited early with flags: $*; log tail:"
      tail -n 8 "$LOG" >&2
      rm -f "$PIDFILE"
      ;;
    2)
      say "the Docker engine did not answer within ${WAIT}s; log tail:"
      tail -n 30 "$LOG" >&2
      exit 1
      ;;
  esac
  (( $(date +%s) < deadline )) || break
done

say "could not start the Docker engine; see $LOG"
exit 1
