#!/usr/bin/env bash
# Installs the Debian packages x2x's tests and demos use (NBD clients, fuse, ext4 tools, PostgreSQL for the database crash test and benchmark, QEMU for cutover,
# and Java 17 with Maven for the Apache Kafka broker), when run as root and they are missing. Without root it says what is missing; the tests
# that need those tools then skip with that reason.
set -euo pipefail
# qemu-system-x86 and busybox-static: x2x cutover boots targets, and its tests build a small
# Debian guest (kernel .deb fetched by the test with apt-get download, busybox initramfs).
# fio: bench/nbd_capture.py's random writes of random data (its nbd engine).
packages=(qemu-utils libnbd-bin nbdkit fuse3 e2fsprogs rsync postgresql qemu-system-x86 busybox-static fio)
missing=()
# Java and Maven may come from elsewhere than Debian (a JDK in /opt, SDKMAN): only ask for
# Debian's when there is none at all.
command -v java >/dev/null || [ -n "${JAVA_HOME:-}" ] || missing+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || missing+=(maven)
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# The cutover tests' guest boots Debian's kernel: its .deb is fetched once into a cache
# (not installed), where tests/guest.py finds it.
guest_kernel() {
  local cache="${X2X_GUEST_CACHE:-/var/tmp/x2x-guest}" name=""
  ls "$cache"/linux-image-*-amd64_*.deb >/dev/null 2>&1 && return 0
  { [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; } || return 0
  name=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}')
  if [ -z "$name" ]; then
    apt-get update -qq >/dev/null
    name=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}')
  fi
  mkdir -p "$cache"
  if [ -z "$name" ] || ! (cd "$cache" && apt-get download -qq "$name" >/dev/null 2>&1); then
    echo "x2x: could not fetch Debian's kernel for the cutover tests' guest; they will try again" >&2
  fi
}
if [ ${#missing[@]} -eq 0 ]; then guest_kernel; exit 0; fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "x2x: missing Debian packages: ${missing[*]} (run as root, or: sudo apt-get install ${missing[*]})" >&2
  exit 0
fi
echo "x2x: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
guest_kernel
