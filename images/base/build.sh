#!/usr/bin/env bash
# Build the local base image llm-sandbox/base:bookworm from a debootstrapped Debian root file
# system, because no image registry is reachable here: everything comes from the Debian mirror
# apt already uses. Skips quickly when the image exists; --force rebuilds it.
#
#   bash images/base/build.sh [--force]
#
# Env: IMAGE (default llm-sandbox/base:bookworm), SUITE (default bookworm),
#      MIRROR (default: the mirror in /etc/apt/sources.list{,.d}, else http://deb.debian.org/debian).
set -euo pipefail

IMAGE="${IMAGE:-llm-sandbox/base:bookworm}"
SUITE="${SUITE:-bookworm}"
# python3, not python3-minimal: the exec server needs http.server, socketserver, email and friends,
# which live in libpython3.11-stdlib.
PACKAGES="python3,bash,coreutils,procps,ca-certificates"

die() { echo "build.sh: error: $*" >&2; exit 1; }

force=0
for arg in "$@"; do
  case "$arg" in
    --force) force=1 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) die "unknown argument: $arg (usage: build.sh [--force])" ;;
  esac
done

command -v docker >/dev/null || die "no docker CLI on PATH (apt-get install docker.io)"
docker info >/dev/null 2>&1 \
  || die "the Docker engine is not reachable; start it with: bash scripts/start-dockerd.sh"

if [[ $force -eq 0 ]] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "build.sh: $IMAGE already exists (use --force to rebuild)"
  exit 0
fi

[[ $(id -u) -eq 0 ]] || die "debootstrap needs root"
command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"

# The mirror apt is configured with: the only Debian source known to be reachable from this machine.
detect_mirror() {
  local f uri
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -f $f ]] || continue
    # deb822: first URIs: line of a stanza whose Suites include $SUITE itself (not -security).
    uri=$(awk -v suite="$SUITE" '
      /^[[:space:]]*$/ { if (u != "" && s) { print u; exit } u = ""; s = 0; next }
      /^URIs:/ { u = $2 }
      /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == suite) s = 1 }
      END { if (u != "" && s) print u }' "$f" | head -n1)
    [[ -n $uri ]] && { echo "$uri"; return; }
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [[ -f $f ]] || continue
    uri=$(awk -v suite="$SUITE" '$1 == "deb" {
      i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
      if ($(i + 1) == suite) { print $i; exit } }' "$f")
    [[ -n $uri ]] && { echo "$uri"; return; }
  done
  echo "http://deb.debian.org/debian"
}
MIRROR="${MIRROR:-$(detect_mirror)}"

# With --force, the image being replaced; removed after the import unless something still uses it.
old_id=$(docker image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)

start=$(date +%s)
workdir=$(mktemp -d /var/tmp/llmsandbox-rootfs.XXXXXX)
# Always remove the root file system, even on failure or Ctrl-C: it is ~200 MB of throwaway files.
trap 'rm -rf --one-file-system "$workdir"' EXIT
rootfs="$workdir/rootfs"

echo "build.sh: debootstrap $SUITE from $MIRROR (packages: $PACKAGES)"
if ! debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$MIRROR" \
    >"$workdir/debootstrap.log" 2>&1; then
  tail -n 30 "$workdir/debootstrap.log" >&2
  [[ -f $rootfs/debootstrap/debootstrap.log ]] && tail -n 30 "$rootfs/debootstrap/debootstrap.log" >&2
  die "debootstrap failed (mirror: $MIRROR; override with MIRROR=...)"
fi

chroot "$rootfs" python3 -c 'import http.server, json, socketserver, subprocess, ssl' \
  || die "python3 in the new root file system lacks stdlib modules the exec server needs"

# Leaner image: package caches and lists are useless without a registry or network in the sandbox.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
       "$rootfs"/var/log/*.log "$rootfs"/debootstrap
# The host's resolver config must not be baked into the image; Docker provides its own at run time.
: >"$rootfs/etc/resolv.conf"

echo "build.sh: importing into Docker as $IMAGE"
tar --numeric-owner -C "$rootfs" -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV LC_ALL=C.UTF-8' \
  --change 'WORKDIR /' \
  --change 'CMD ["/bin/bash"]' \
  --message "debootstrap --variant=minbase $SUITE + $PACKAGES" \
  - "$IMAGE" >/dev/null \
  || die "docker import failed"

docker run --rm --network none "$IMAGE" python3 -c 'import http.server' \
  || die "the imported image $IMAGE does not run python3"

if [[ -n $old_id && $old_id != "$(docker image inspect --format '{{.Id}}' "$IMAGE")" ]]; then
  docker image rm "$old_id" >/dev/null 2>&1 || true
fi

elapsed=$(( $(date +%s) - start ))
size=$(docker image inspect --format '{{.Size}}' "$IMAGE")
echo "build.sh: built $IMAGE ($(( size / 1024 / 1024 )) MB) in ${elapsed}s"
