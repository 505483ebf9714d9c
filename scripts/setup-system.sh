#!/usr/bin/env bash
# Installs the Debian packages x2x's tests and demos use (NBD clients, fuse, ext4 tools, PostgreSQL for the database crash test and benchmark,
# and Java 17 with Maven for the Apache Kafka broker), when run as root and they are missing. Without root it says what is missing; the tests
# that need those tools then skip with that reason.
set -euo pipefail
packages=(qemu-utils libnbd-bin nbdkit fuse3 e2fsprogs rsync postgresql)
missing=()
# Java and Maven may come from elsewhere than Debian (a JDK in /opt, SDKMAN): only ask for
# Debian's when there is none at all.
command -v java >/dev/null || [ -n "${JAVA_HOME:-}" ] || missing+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || missing+=(maven)
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "x2x: missing Debian packages: ${missing[*]} (run as root, or: sudo apt-get install ${missing[*]})" >&2
  exit 0
fi
echo "x2x: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
