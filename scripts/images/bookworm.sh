#!/bin/bash
# Image recipe "bookworm": Debian 12 minbase + python3 and ipykernel (a
# Jupyter kernel to run in an image), with numpy and pandas (the values a
# kernel's saved session must carry: docs/user/kernel-state.md), for tests
# and demos. No cloudpickle: chspawner brings its own to the kernel.
# Usage: bookworm.sh TARGET_DIR   (TARGET_DIR exists and is empty; run as root)
# Any change to this file changes the cache key in scripts/build-image.sh.
set -euo pipefail
t=${1:?usage: bookworm.sh TARGET_DIR}
[[ -d $t ]] || { echo "bookworm.sh: $t: not a directory" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "bookworm.sh: debootstrap missing (apt-get install debootstrap)" >&2; exit 1; }
umask 022

# The machine's own Debian mirror, from its apt sources (the only network
# reachable on some build hosts).
source "$(dirname "${BASH_SOURCE[0]}")/../build-image.sh"
mirror=$(debian_mirror bookworm)

debootstrap --variant=minbase bookworm "$t" "$mirror"

# Run a command in the chroot with a clean environment.
in_chroot() {
    env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive LC_ALL=C \
        chroot "$t" "$@"
}
# --include can't resolve python3's virtual dependencies, so use apt-get.
# Some maintainer scripts want /proc; mount it only for this step, if we can.
if mount -t proc proc "$t/proc" 2>/dev/null; then
    trap 'umount "$t/proc"' EXIT
    trap 'exit 130' INT TERM HUP   # run the EXIT trap when interrupted too
fi
in_chroot apt-get update
in_chroot apt-get install -y --no-install-recommends python3 python3-ipykernel \
    python3-numpy python3-pandas
in_chroot apt-get clean
if mountpoint -q "$t/proc"; then umount "$t/proc"; trap - EXIT INT TERM HUP; fi

rm -rf "$t"/var/cache/apt/archives/*.deb "$t"/var/lib/apt/lists/* \
       "$t"/var/cache/apt/*.bin "$t"/var/log/bootstrap.log
# debootstrap creates device nodes (as root); ch-run bind-mounts the host's /dev.
find "$t/dev" -mindepth 1 -delete
mkdir -p "$t"/{dev,proc,sys,tmp,home,etc,ch}
chmod 1777 "$t/tmp"
touch "$t"/etc/{passwd,group,hosts}
# debootstrap copied the build host's resolver config; ch-run binds the real one.
: > "$t/etc/resolv.conf"
# A file only this image has: tests read it to prove code runs in the image.
echo "chspawner test image: Debian bookworm" > "$t/etc/chspawner-test-image"
printf '%s\n' 'PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
              'LANG=C.UTF-8' > "$t/ch/environment"

# Make everything readable for unprivileged ch-run, except password hashes.
# ! -type l: chmod follows symlinks, and absolute ones would hit the host.
find "$t" \( -path "$t/etc/shadow*" -o -path "$t/etc/gshadow*" \) -prune \
     -o ! -type l -exec chmod a+rX {} +
