#!/bin/bash
# Image recipe "busybox": a tiny static-busybox image for tests and demos.
# Usage: busybox.sh TARGET_DIR   (TARGET_DIR exists and is empty; run as root)
# Any change to this file changes the cache key in scripts/build-image.sh.
set -euo pipefail
t=${1:?usage: busybox.sh TARGET_DIR}
[[ -d $t ]] || { echo "busybox.sh: $t: not a directory" >&2; exit 1; }
[[ -x /bin/busybox ]] || { echo "busybox.sh: /bin/busybox missing (apt-get install busybox-static)" >&2; exit 1; }
umask 022

mkdir -p "$t"/{bin,dev,proc,sys,tmp,home,etc,root,usr/bin,mnt,ch}
chmod 1777 "$t/tmp"
cp /bin/busybox "$t/bin/busybox"
# One relative symlink per applet, all in /bin (PATH covers only /bin, /usr/bin).
for applet in $(/bin/busybox --list); do
    [[ $applet == busybox ]] || ln -sf busybox "$t/bin/$applet"
done

echo 'root:x:0:0:root:/root:/bin/sh' > "$t/etc/passwd"
echo 'root:x:0:' > "$t/etc/group"
# ch-run bind-mounts the host's hosts/resolv.conf over these, so they must exist.
echo '127.0.0.1 localhost' > "$t/etc/hosts"
: > "$t/etc/resolv.conf"
# Charliecloud's image environment file (ch-run --set-env=/ch/environment).
echo 'PATH=/bin:/usr/bin' > "$t/ch/environment"

chown -R -h 0:0 "$t"
chmod -R a+rX "$t"   # -R ignores symlinks, so nothing outside $t is touched
