#!/usr/bin/env bash
# Install what building and checking aarch64 TVM libraries needs on a Debian/Ubuntu x86 host:
# the cross C and C++ compilers (aarch64-linux-gnu-gcc / -g++, with the aarch64 C library under
# /usr/aarch64-linux-gnu) and qemu-aarch64 (runs the aarch64 deploy runner in user mode).
#
# Idempotent: packages already installed are not touched, and with all of them present the
# script exits 0 without calling apt-get. Otherwise it runs `apt-get update` once and installs
# the missing ones (-y, quiet, no recommended extras). Needs root or sudo.
set -euo pipefail

PACKAGES=(gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user)

missing=()
for pkg in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    [[ "$status" == "install ok installed" ]] || missing+=("$pkg")
done

if [[ ${#missing[@]} -eq 0 ]]; then
    echo "ARM tools present: ${PACKAGES[*]}"
    exit 0
fi

if ! command -v apt-get >/dev/null; then
    echo "error: apt-get not found; install ${missing[*]} with this system's package manager" >&2
    exit 1
fi
as_root=()
if [[ $(id -u) -ne 0 ]]; then
    if ! command -v sudo >/dev/null; then
        echo "error: installing ${missing[*]} needs root (or sudo)" >&2
        exit 1
    fi
    as_root=(sudo)
fi

echo "installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -qq
"${as_root[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "ARM tools installed: ${PACKAGES[*]}"
